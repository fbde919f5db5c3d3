"""The perturbation rank each token draws (tokpost_fast/ops/philox.py is the contract; shared by the scan and
the re-rank kernels)."""

import triton
import triton.language as tl

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
