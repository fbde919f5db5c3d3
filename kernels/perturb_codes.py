"""Triton latent perturbation (METHOD.md A2; `perturb_codes` of docs/INTERFACES.md), fused with the exact search.

Shapes and dtypes
  z              [N, D]  fp32 / fp16 / bf16;  codebook [K, D] same dtype
  topk           int in [1, min(K, 1024)];  threshold int in [0, 2**32];  seed int in [0, 2**63)
  idx            [N] int64: the nearest code (rank 0)
  idx_perturbed  [N] int64: the rank-th nearest code, rank drawn per token from Philox4x32-10

The random contract (tokpost_fast/ops/philox.py, shared with csrc/): key = (seed lo32, seed hi32), counter =
(p lo32, p hi32, PERTURB_STREAM = 0, 0) for the token position p = position_offset + row; r0, r1 = the first two
outputs; the token resamples iff r0 < threshold (64-bit compare, so threshold 2**32 always resamples) and then takes
rank (r1 * topk) >> 32 (exact in 64 bits), else rank 0. Only integers decide, so every backend agrees bit for bit.

The search is nearest_codes.run_search with the rank drawn inside the scan kernel (kernels/_rank.py): each row
searches only as deep as its own rank. A row that keeps its code (rank 0) is settled like k = 1 (one candidate, no
second pass when nothing else is within the bound); a resampled row collects the candidates under the threshold of
its (rank + 1)-th tracked value, and the exact re-rank picks rank 0 and rank r from one sorted list.
"""

import torch

from tokpost_fast.kernels.nearest_codes import check_inputs, run_search


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def perturb_codes_triton(z: torch.Tensor, codebook: torch.Tensor, topk: int, threshold: int, seed: int,
                         position_offset: int = 0, config=None):
    """(idx [N], idx_perturbed [N]) int64: nearest code and its A2 replacement for every row of z.

    config: as for knn_codes_triton (None / "heuristic", or a dict forcing the scan tiles)."""
    z, codebook = check_inputs(z, codebook, topk, k_name="topk")
    threshold = _check_int("threshold", threshold, 0, 2**32)
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    N = z.shape[0]
    position_offset = _check_int("position_offset", position_offset, 0, 2**63 - 1 - max(N, 1))
    idx = torch.empty(N, dtype=torch.int64, device=z.device)
    idx_perturbed = torch.empty(N, dtype=torch.int64, device=z.device)
    if N > 0:
        # The random arguments go through as Python ints; Triton types each as i32, u32 or i64 by value, and the
        # kernel widens them to int64 (zero-extending the u32 case) before it mixes them.
        run_search(z, codebook, topk, True, config, idx, idx_perturbed, (seed, threshold, position_offset, topk))
    return idx, idx_perturbed
