"""nearest_codes: the k nearest codebook rows of every vector, never materializing the N x K distances.

# z: [..., D], codebook: [K, D] -> dist: [..., k] fp32 (ascending), idx: [..., k] int64
The exact-nearest contract (docs/INTERFACES.md "Exact nearest codes"): dist is the squared L2 distance in the
difference form, fp32, summed in index order with no fused multiply-add,
    t_d = fl(z_d - c_d);  s = 0;  s = fl(s + fl(t_d * t_d)) for d = 0 .. D-1,
on the inputs upcast to fp32 (with metric="cosine" both sides are l2-normalised first), so it is >= 0 and
bit-identical on every backend. Codes are ordered by (dist, index): ties go to the lowest index. A backend may
search in any faster form (the expanded ||z||^2 - 2 z.c + ||c||^2, bf16 tensor cores) only with a stated error
bound and an exact re-rank of every code within twice that bound of the k-th best, so on near-tie data every
backend returns the same, truly nearest codes. NaN: a NaN or inf in the z row or the code makes that distance
+inf, ordered after every finite code in index order; a token whose latent has a NaN or inf gets codes 0..k-1 at
+inf. Inputs large enough for fp32 squares to overflow (|x| ~ 1e19) are outside the contract.
"""

from __future__ import annotations

import torch

from tokpost_fast.ops import _backends
from tokpost_fast.ops._validate import check_k, check_metric, check_z_codebook, common_dtype, l2_normalize

# Rows per block in the reference: bounds its memory at about REFERENCE_BLOCK_ROWS x K fp32 (kmeans uses it too).
REFERENCE_BLOCK_ROWS = 1024
# The exact reference materialises a [rows, K] block per dimension step; keep it near 4M elements.
EXACT_BLOCK_ELEMENTS = 1 << 22


def squared_distances_reference(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """[N, D], [K, D] -> [N, K] fp32 distances in the expanded (search) form; NaN -> +inf.

    Fast but cancelling: two codes within ~(D + 2) * 2**-24 * (||z|| + ||c||)^2 of each other may come out in the
    wrong order. nearest_codes_reference does not use it (see exact_distances_reference); the tests use it as
    the control that near-tie data are hard."""
    z32, c32 = z.float(), codebook.float()
    dist = (z32 * z32).sum(1, keepdim=True) - 2.0 * (z32 @ c32.T) + (c32 * c32).sum(1)[None, :]
    return torch.where(dist.isnan(), float("inf"), dist)


def exact_distances_reference(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """[N, D], [K, D] -> [N, K] fp32 distances in the contract's difference form; NaN -> +inf.

    One elementwise subtract, multiply and add per dimension, in increasing d: separate torch ops, so nothing can
    contract them into a fused multiply-add, and the fp32 result is bit-identical to every kernel's re-rank."""
    z32, c32 = z.float(), codebook.float()
    dist = torch.zeros(z32.shape[0], c32.shape[0], dtype=torch.float32, device=z.device)
    for d in range(z32.shape[1]):
        diff = z32[:, d, None] - c32[None, :, d]
        dist = dist + diff * diff
    return torch.where(dist.isnan(), float("inf"), dist)


def nearest_codes_reference(z: torch.Tensor, codebook: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch ground truth for the `knn_codes` kernels: z [N, D], codebook [K, D] (l2 metric).

    Every distance in the exact difference form, then a stable sort: (dist, index) order."""
    n = z.shape[0]
    dist_out = torch.empty(n, k, dtype=torch.float32, device=z.device)
    idx_out = torch.empty(n, k, dtype=torch.int64, device=z.device)
    rows = max(1, min(REFERENCE_BLOCK_ROWS, EXACT_BLOCK_ELEMENTS // codebook.shape[0]))
    for start in range(0, n, rows):
        dist = exact_distances_reference(z[start : start + rows], codebook)
        # A stable sort keeps equal distances in index order: ties go to the lowest index.
        sorted_dist, order = torch.sort(dist, dim=1, stable=True)
        dist_out[start : start + rows] = sorted_dist[:, :k]
        idx_out[start : start + rows] = order[:, :k]
    return dist_out, idx_out


def knn_codes(z: torch.Tensor, codebook: torch.Tensor, k: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a backend on 2-D, same-dtype inputs (no validation; the custom op calls this).

    The backend is resolved here, inside the custom op, so torch.compile never traces the discovery code."""
    backend = _backends.resolve_backend(backend, z.device, "nearest_codes")
    if backend == "reference":
        return nearest_codes_reference(z, codebook, k)
    if backend in ("cpu", "cuda"):
        return torch.ops.tokpost_fast.knn_codes(z.contiguous(), codebook.contiguous(), k)
    if backend == "triton":
        from tokpost_fast.kernels.nearest_codes import knn_codes_triton

        return knn_codes_triton(z, codebook, k)
    raise ValueError(f"unknown backend {backend!r}")


@torch.library.custom_op("tokpost_fast::nearest_codes", mutates_args=())
def _nearest_codes_op(z: torch.Tensor, codebook: torch.Tensor, k: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return knn_codes(z, codebook, k, backend)


@_nearest_codes_op.register_fake
def _(z, codebook, k, backend):
    return z.new_empty(z.shape[0], k, dtype=torch.float32), z.new_empty(z.shape[0], k, dtype=torch.int64)


def nearest_codes(
    z: torch.Tensor, codebook: torch.Tensor, k: int = 1, metric: str = "l2", backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest codes of each vector, sorted by distance.

    # z: [..., D], codebook: [K, D] -> dist: [..., k] fp32, idx: [..., k] int64
    Not differentiable (indices are discrete; use codebook_lookup for gradients to the codebook).
    """
    check_z_codebook(z, codebook)
    k = check_k("k", k, codebook.shape[0])
    check_metric(metric)
    _backends.check_backend_name(backend)
    lead_shape = z.shape[:-1]
    z, codebook = common_dtype(z.detach(), codebook.detach())
    if metric == "cosine":
        z, codebook = l2_normalize(z), l2_normalize(codebook)
    dist, idx = _nearest_codes_op(z.reshape(-1, z.shape[-1]), codebook, k, backend)
    return dist.reshape(*lead_shape, k), idx.reshape(*lead_shape, k)
