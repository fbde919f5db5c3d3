"""Philox4x32-10 counter-based random numbers, in plain PyTorch.

This is the generator every backend uses for the latent perturbation (METHOD.md A2, B2), so the same seed gives
bit-identical draws on the reference, the C++ CPU kernel, the CUDA kernel and the Triton kernel. The round
function is Random123's Philox4x32-10, the same one `triton.language.philox` implements.

The contract (shared with csrc/ and kernels/; change all of them together):
  key     = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)          seed: int in [0, 2**63)
  counter = (p & 0xFFFFFFFF, (p >> 32) & 0xFFFFFFFF, STREAM, 0)     p: the token's flat position
  r0, r1, r2, r3 = philox4x32_10(counter, key)                       uint32 each
  resample  = r0 < threshold,  threshold = rate_threshold(rate)      (an integer in [0, 2**32])
  rank      = (r1 * topk) >> 32 if resample else 0                   (exact in 64-bit integers)
Only integer arithmetic decides the outcome, so no backend can round differently.
"""

from __future__ import annotations

import torch

# Random123 constants.
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
N_ROUNDS = 10
# c2 of the counter: which random stream this is, so later uses of the generator never reuse these numbers.
PERTURB_STREAM = 0
_MASK32 = 0xFFFFFFFF


def rate_threshold(rate: float) -> int:
    """The integer threshold t with P(r0 < t) = rate for a uniform uint32 r0 (to 2**-32)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate!r}")
    return min(int(rate * 4294967296.0), 4294967296)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # a * b for a uint32 constant a and uint32 values b held in int64; the full product can exceed int64,
    # so multiply by 16-bit halves of b.
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo  # < 2**48
    p_hi = a * b_hi  # < 2**48
    low_sum = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2**49
    lo = low_sum & _MASK32
    hi = ((p_hi >> 16) + (low_sum >> 32)) & _MASK32
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, n_rounds: int = N_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values; returns four such tensors."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK32 for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(n_rounds):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def split_seed(seed: int) -> tuple[int, int]:
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    seed = int(seed)
    return seed & _MASK32, (seed >> 32) & _MASK32


def ranks_for_threshold(seed: int, positions: torch.Tensor, threshold: int, topk: int) -> torch.Tensor:
    """The rank (0 = the nearest code) each token takes; int64, shape of positions. threshold in [0, 2**32]."""
    k0, k1 = split_seed(seed)
    positions = positions.to(torch.int64)
    r0, r1, _, _ = philox4x32(positions & _MASK32, positions >> 32, PERTURB_STREAM, 0, k0, k1)
    rank = (r1 * int(topk)) >> 32
    return torch.where(r0 < int(threshold), rank, torch.zeros_like(rank))


def perturb_ranks(seed: int, positions: torch.Tensor, rate: float, topk: int) -> torch.Tensor:
    """The rank each token takes under the A2 operator at resampling probability `rate`."""
    return ranks_for_threshold(seed, positions, rate_threshold(rate), topk)
