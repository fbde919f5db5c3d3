"""quantize: the full vector-quantizer step of METHOD.md A1 with the latent perturbation of A2.

# z: [..., D], codebook: [K, D] -> QuantizeOutput(z_q [..., D], indices [...], perturbed_indices [...],
#                                                 codebook_loss [], commit_loss [])
metric="cosine" (the paper's quantizer): z and the codebook rows are l2-normalised, the nearest code by squared
L2 is the max-cosine code, and z_q is the normalised code. Straight-through: z_q = z + sg(code - z), so the
gradient of z_q flows to z unchanged. Losses use the clean (unperturbed) code (A2 step 4):
codebook_loss = mean((code - sg(z))^2), commit_loss = beta_commit * mean((sg(code) - z)^2).
With rate > 0 and topk > 1, z_q holds the perturbed codes for the tokens of the first `perturb_samples` entries of
the leading dim (all of them when None).
NaN / inf: a token with a NaN or inf entry gets code 0 (perturbed: its drawn rank, as in perturb_codes); NaN then
propagates, so its z_q row and both losses (means over all tokens) are not finite, on every backend. Arguments are
checked up front (beta_commit: a finite float >= 0; seed: None or an int in [0, 2**63), even when unused).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from tokpost_fast.ops._validate import (
    check_beta_commit,
    check_k,
    check_metric,
    check_rate,
    check_seed,
    check_z_codebook,
)
from tokpost_fast.ops.codebook_lookup import codebook_lookup
from tokpost_fast.ops.perturb_codes import perturb_codes


class QuantizeOutput(NamedTuple):
    z_q: torch.Tensor
    indices: torch.Tensor
    perturbed_indices: torch.Tensor
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor


def quantize(
    z: torch.Tensor,
    codebook: torch.Tensor,
    rate: float = 0.0,
    topk: int = 1,
    beta_commit: float = 0.25,
    metric: str = "cosine",
    seed: Optional[int] = None,
    backend: str = "auto",
    perturb_samples: Optional[int] = None,
) -> QuantizeOutput:
    """One quantizer step. Pass `seed` explicitly under torch.compile (drawing one is a graph break)."""
    check_z_codebook(z, codebook)
    check_metric(metric)
    rate = check_rate(rate)
    topk = check_k("topk", topk, codebook.shape[0])
    beta_commit = check_beta_commit(beta_commit)
    # Checked even when nothing is perturbed (the seed is then unused): a bad seed is a caller bug either way.
    if seed is not None:
        seed = check_seed(seed)
    if perturb_samples is not None:
        if isinstance(perturb_samples, bool) or not isinstance(perturb_samples, int) or perturb_samples < 0:
            raise ValueError(f"perturb_samples must be None or a non-negative int, got {perturb_samples!r}")
        if z.dim() < 2:
            raise ValueError("perturb_samples needs z with a leading sample dim: [B, ..., D]")
    if metric == "cosine":
        z = F.normalize(z, dim=-1)
        codebook = F.normalize(codebook, dim=-1)
    if z.dtype != codebook.dtype:
        codebook = codebook.to(z.dtype)

    perturbing = rate > 0.0 and topk > 1 and perturb_samples != 0
    if perturbing and seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    if perturbing:
        n_pert = z.shape[0] if perturb_samples is None else min(perturb_samples, z.shape[0])
        # The perturbed samples come first, so their tokens' positions are the same as in a whole-batch call.
        idx_head, pert_head = perturb_codes(z[:n_pert], codebook, rate, topk, seed, metric="l2", backend=backend)
        if n_pert < z.shape[0]:
            idx_tail, pert_tail = perturb_codes(z[n_pert:], codebook, 0.0, 1, 0, metric="l2", backend=backend)
            indices = torch.cat([idx_head, idx_tail])
            perturbed = torch.cat([pert_head, idx_tail])
        else:
            indices, perturbed = idx_head, pert_head
    else:
        indices, perturbed = perturb_codes(z, codebook, 0.0, 1, 0, metric="l2", backend=backend)

    code = codebook_lookup(indices, codebook, backend=backend, validate=False)
    codebook_loss = torch.mean((code - z.detach()) ** 2)
    commit_loss = beta_commit * torch.mean((code.detach() - z) ** 2)
    if perturbing:
        code_used = codebook_lookup(perturbed, codebook, backend=backend, validate=False)
    else:
        code_used = code
    z_q = z + (code_used - z).detach()
    return QuantizeOutput(z_q, indices, perturbed, codebook_loss, commit_loss)
