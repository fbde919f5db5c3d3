"""Triton latent perturbation (SPEC A2; `perturb_codes` of docs/INTERFACES.md), fused with the top-k search.

Shapes and dtypes
  z              [N, D]  fp32 / fp16 / bf16;  codebook [K, D] same dtype
  topk           int in [1, min(K, 1024)];  threshold int in [0, 2**32];  seed int in [0, 2**63)
  idx            [N] int64: the nearest code (rank 0)
  idx_perturbed  [N] int64: the rank-th nearest code, rank drawn per token from Philox4x32-10

The random contract (tokpost_fast/ops/philox.py, shared with csrc/): key = (seed lo32, seed hi32), counter =
(p lo32, p hi32, PERTURB_STREAM = 0, 0) for the token position p = position_offset + row; r0, r1 = the first two
outputs; the token resamples iff r0 < threshold (64-bit compare, so threshold 2**32 always resamples) and then takes
rank (r1 * topk) >> 32 (exact in 64 bits), else rank 0. Only integers decide, so every backend agrees bit for bit.

The scan is nearest_codes.scan_codebook (KP = next_pow2(topk) sorted keys per row); only the epilogue differs:
draw the rank, pick two entries of the sorted list. Split-K for small N works as in nearest_codes.
"""

import torch
import triton
import triton.language as tl

from tokpost_fast.kernels._keys import key_to_index, select_rank
from tokpost_fast.kernels.nearest_codes import (
    TUNE_CONFIGS,
    _prune,
    cdiv,
    check_inputs,
    launch_scan,
    merge_partials,
    scan_codebook,
    store_partial,
    MERGE_BLOCK_N,
)

# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------

# c2 of the Philox counter; must equal tokpost_fast.ops.philox.PERTURB_STREAM (a test checks it).
PERTURB_STREAM = tl.constexpr(0)
# Random123's Philox4x32-10 (tl.philox's default round count is the same 10; spelled out so a change there
# cannot silently change our draws).
PHILOX_ROUNDS = tl.constexpr(10)


@triton.jit
def perturb_rank(rows, position_offset, seed, threshold, topk):
    """The rank (0 = nearest) each row takes: int64 [BLOCK_N]. rows int64 [BLOCK_N]."""
    p = rows + position_offset.to(tl.int64)  # int64 token positions
    c0 = (p & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((p >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros_like(c0) + PERTURB_STREAM
    c3 = tl.zeros_like(c0)
    # tl.philox splits the 64-bit seed into key (lo32, hi32), the order of the contract.
    r0, r1, _, _ = tl.philox(seed, c0, c1, c2, c3, PHILOX_ROUNDS)
    # uint32 -> int64 zero-extends; the product r1 * topk < 2**32 * 2**31 cannot overflow int64.
    resample = r0.to(tl.int64) < threshold.to(tl.int64)
    rank = (r1.to(tl.int64) * topk) >> 32
    return tl.where(resample, rank, 0)


@triton.jit
def store_perturbed(running, rows, row_mask, idx_ptr, idx_perturbed_ptr, position_offset, seed, threshold, topk,
                    KP: tl.constexpr):
    rank = perturb_rank(rows, position_offset, seed, threshold, topk)
    nearest = select_rank(running, tl.zeros_like(rank), KP)
    chosen = select_rank(running, rank, KP)
    tl.store(idx_ptr + rows, key_to_index(nearest), mask=row_mask)
    tl.store(idx_perturbed_ptr + rows, key_to_index(chosen), mask=row_mask)


# ----------------------------------------------------------------------------------------------------------------
# Tuning: the scan's grid and prune predicate (nearest_codes.TUNE_CONFIGS / _prune) apply unchanged.
# ----------------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


# The random arguments change every training step: no value specialization (and no recompiles) for them.
@triton.jit(do_not_specialize=["seed", "threshold", "position_offset"])
def _perturb_kernel(
    z_ptr,  # *fp32|fp16|bf16 [N, D]
    c_ptr,  # *same [K, D]
    csq_ptr,  # *fp32 [K] ||c||^2
    idx_ptr,  # *int64 [N] nearest code (written when SPLITS == 1)
    idx_perturbed_ptr,  # *int64 [N] rank-th nearest code (written when SPLITS == 1)
    part_ptr,  # *int64 [SPLITS, N, KP] ascending partial keys (written when SPLITS > 1)
    N, K, D, topk, stride_zn, stride_cn, CODES_PER_SPLIT,
    N_BUCKET,  # next_pow2(N): only an autotuning key
    seed, threshold, position_offset,
    KP: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, IS_FP32: tl.constexpr,
    UPCAST_DOT: tl.constexpr, WRITE_PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    k_lo = split * CODES_PER_SPLIT
    k_hi = tl.minimum(k_lo + CODES_PER_SPLIT, K)
    running = scan_codebook(z_ptr, c_ptr, csq_ptr, rows, row_mask, k_lo, k_hi, D, stride_zn, stride_cn,
                            KP, BLOCK_N, BLOCK_K, BLOCK_D, D_CHUNKS, IS_FP32, UPCAST_DOT)
    if WRITE_PARTIAL:
        store_partial(running, rows, row_mask, part_ptr, split, N, KP)
    else:
        store_perturbed(running, rows, row_mask, idx_ptr, idx_perturbed_ptr, position_offset, seed, threshold, topk,
                        KP)


@triton.jit(do_not_specialize=["seed", "threshold", "position_offset"])
def _perturb_merge_kernel(
    part_ptr,  # *int64 [SPLITS, N, KP] ascending partial keys
    idx_ptr,  # *int64 [N]
    idx_perturbed_ptr,  # *int64 [N]
    N, topk, SPLITS, seed, threshold, position_offset, KP: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    running = merge_partials(part_ptr, rows, row_mask, N, SPLITS, KP, BLOCK_N)
    store_perturbed(running, rows, row_mask, idx_ptr, idx_perturbed_ptr, position_offset, seed, threshold, topk, KP)


_perturb_kernel_autotuned = triton.autotune(
    TUNE_CONFIGS, key=["N_BUCKET", "K", "D", "KP", "WRITE_PARTIAL"], prune_configs_by={"early_config_prune": _prune}
)(_perturb_kernel)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def perturb_codes_triton(z: torch.Tensor, codebook: torch.Tensor, topk: int, threshold: int, seed: int,
                         position_offset: int = 0, config=None):
    """(idx [N], idx_perturbed [N]) int64: nearest code and its A2 replacement for every row of z.

    config: as for knn_codes_triton (None / "heuristic", "autotune", or a dict forcing the tiles and SPLIT_K).
    """
    z, codebook = check_inputs(z, codebook, topk, k_name="topk")
    threshold = _check_int("threshold", threshold, 0, 2**32)
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    N = z.shape[0]
    position_offset = _check_int("position_offset", position_offset, 0, 2**63 - 1 - max(N, 1))
    idx = torch.empty(N, dtype=torch.int64, device=z.device)
    idx_perturbed = torch.empty(N, dtype=torch.int64, device=z.device)
    if N == 0:
        return idx, idx_perturbed
    # The random arguments go through as Python ints; Triton types each as i32, u32 or i64 by value, and the
    # kernel widens them to int64 (zero-extending the u32 case) before it mixes them.
    randoms = (seed, threshold, position_offset)
    splits, part, KP = launch_scan(_perturb_kernel, _perturb_kernel_autotuned, z, codebook, topk, config, randoms,
                                   (idx, idx_perturbed))
    if splits > 1:
        _perturb_merge_kernel[(cdiv(N, MERGE_BLOCK_N),)](part, idx, idx_perturbed, N, topk, splits, *randoms, KP=KP,
                                                         BLOCK_N=MERGE_BLOCK_N)
    return idx, idx_perturbed
