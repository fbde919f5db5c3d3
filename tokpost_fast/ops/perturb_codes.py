"""perturb_codes: the latent-perturbation operator of METHOD.md A2, fused with the nearest-code search.

# z: [..., D], codebook: [K, D] -> idx: [...] int64 (nearest), idx_perturbed: [...] int64
With probability `rate` a token takes a code drawn uniformly from its `topk` nearest codes, itself included, so it
really changes with probability rate * (topk - 1) / topk. The draws are Philox4x32-10 keyed by (seed, token
position), computed inside the kernel (tokpost_fast/ops/philox.py has the contract), so the same seed gives the
same draws on every backend. The token at flat position n of z has position `position_offset + n`: calling on a
slice z[a:b] with position_offset=a (in flat tokens) reproduces that slice of the whole call, which is what makes
results independent of how a batch is split across steps or ranks.
Positions are int64 on every backend: position_offset + max(N, 1) must stay below 2**63 (a ValueError otherwise,
on every backend).
Ranks follow the exact-nearest contract of nearest_codes (fp32 difference-form distance, ties to the lowest
index), so every backend picks the same code for the same draw, near-ties included.
NaN / inf follow nearest_codes' order: a token with a NaN or inf entry ranks the codes 0..K-1 in index order, so
it gets idx 0 and idx_perturbed = its drawn rank; codes with a NaN or inf entry rank after every finite code.
"""

from __future__ import annotations

import math

import torch

from tokpost_fast.ops import _backends
from tokpost_fast.ops._validate import (
    check_k,
    check_metric,
    check_position_offset,
    check_rate,
    check_seed,
    check_z_codebook,
    common_dtype,
    l2_normalize,
)
from tokpost_fast.ops.nearest_codes import knn_codes, nearest_codes_reference
from tokpost_fast.ops.philox import rate_threshold, ranks_for_threshold


def perturb_codes_reference(
    z: torch.Tensor, codebook: torch.Tensor, topk: int, threshold: int, seed: int, position_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch ground truth for the `perturb_codes` kernels: z [N, D], codebook [K, D] (l2 metric)."""
    positions = torch.arange(z.shape[0], dtype=torch.int64, device=z.device) + position_offset
    ranks = ranks_for_threshold(seed, positions, threshold, topk)
    _, knn = nearest_codes_reference(z, codebook, topk)
    return knn[:, 0].clone(), knn.gather(1, ranks[:, None]).squeeze(1)


def perturb_kernel(z, codebook, topk: int, threshold: int, seed: int, position_offset: int, backend: str):
    """Run a backend on 2-D, same-dtype inputs (no validation; the custom op calls this)."""
    backend = _backends.resolve_backend(backend, z.device, "perturb_codes")
    if backend == "reference":
        return perturb_codes_reference(z, codebook, topk, threshold, seed, position_offset)
    if backend in ("cpu", "cuda"):
        return torch.ops.tokpost_fast.perturb_codes(z.contiguous(), codebook.contiguous(), topk, threshold, seed, position_offset)
    if backend == "triton":
        from tokpost_fast.kernels.perturb_codes import perturb_codes_triton

        return perturb_codes_triton(z, codebook, topk, threshold, seed, position_offset)
    raise ValueError(f"unknown backend {backend!r}")


@torch.library.custom_op("tokpost_fast::perturb_nearest_codes", mutates_args=())
def _perturb_op(
    z: torch.Tensor, codebook: torch.Tensor, topk: int, threshold: int, seed: int, position_offset: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if threshold == 0 or topk == 1:
        # Nothing is resampled: the plain nearest-code search is all there is to do.
        _, idx = knn_codes(z, codebook, 1, backend)
        idx = idx[:, 0].contiguous()
        return idx, idx.clone()
    return perturb_kernel(z, codebook, topk, threshold, seed, position_offset, backend)


@_perturb_op.register_fake
def _(z, codebook, topk, threshold, seed, position_offset, backend):
    return z.new_empty(z.shape[0], dtype=torch.int64), z.new_empty(z.shape[0], dtype=torch.int64)


def perturb_codes(
    z: torch.Tensor,
    codebook: torch.Tensor,
    rate: float,
    topk: int,
    seed: int,
    metric: str = "l2",
    backend: str = "auto",
    position_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code and its A2-perturbed replacement for every vector of z.

    # z: [..., D], codebook: [K, D] -> idx: [...], idx_perturbed: [...] (int64)
    """
    check_z_codebook(z, codebook)
    rate = check_rate(rate)
    topk = check_k("topk", topk, codebook.shape[0])
    seed = check_seed(seed)
    check_metric(metric)
    check_position_offset(position_offset, math.prod(z.shape[:-1]))
    _backends.check_backend_name(backend)
    lead_shape = z.shape[:-1]
    z, codebook = common_dtype(z.detach(), codebook.detach())
    if metric == "cosine":
        z, codebook = l2_normalize(z), l2_normalize(codebook)
    idx, idx_perturbed = _perturb_op(
        z.reshape(-1, z.shape[-1]), codebook, topk, rate_threshold(rate), seed, position_offset, backend
    )
    return idx.reshape(lead_shape), idx_perturbed.reshape(lead_shape)
