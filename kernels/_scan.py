"""The two streaming passes over the codebook (kernels/_search.py builds their operands).

Pass 1, `_scan_kernel` (every row): each of the BLOCK_K columns of the search tile is a "slot"; per slot it keeps
the R smallest search values seen over all code tiles (R running minima: 2R - 1 FMNMX per element). For k = 1 the
tile number is packed into the low PACK_BITS mantissa bits first (one LOP3), so the slot minimum also names its
code. At the end, per row:
  k_i = 1: best = the row minimum, second = the smallest value of any other candidate group. If second >
           best + 2 margin, nothing else is in the window and the row is settled (status 1), else it needs pass 2
           with threshold best + 2 margin (status 0). Two ways, by the plan:
           packed (PACK_BITS > 0, wide D): R = 2; the winning slot's minimum names its code (packed tile number),
             second = the other slots' minima and the winner slot's second minimum; buf[row, 0] = the code.
           slot mode (PACK_BITS = 0, D' <= 32): R = 1, one FMNMX per element; second = the other slots' minima;
             buf[row, 0] = the winning slot, whose K / BLOCK_K codes the re-rank scans exactly (cheaper than two
             more instructions per element while D is small).
  k_i > 1: U = the k_i-th smallest of the R * BLOCK_K tracked values (a bisection per program, after the loop):
           k_i distinct codes lie at or under U, so the threshold U + 2 margin holds every true top-k_i code.
  (perturbation: k_i = drawn rank + 1, per row.) A row with a NaN / inf entry gets status -1.
Pass 2, `_collect_kernel` (the rows of a list: status <= 0): compares every search value with the row threshold
and appends the hits to buf[row, :CAP] (an atomic counter per row gives each hit its slot; count[row] may exceed
CAP, which the re-rank then answers with a full exact scan of that row).
"""

import triton
import triton.language as tl

from tokpost_fast.kernels._rank import perturb_rank
from tokpost_fast.kernels._search import FAR, load_resident, search_tile

HALF_FAR = tl.constexpr(FAR / 2)


@triton.jit
def _pack(x, tile, PACK_BITS: tl.constexpr):
    # The tile number into the low mantissa bits: |packed - x| < 2**(PACK_BITS - 23) |x| (the PACK_REL bound).
    # Search values are finite (padded codes sit at FAR), so the packed value is too.
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits & ~((1 << PACK_BITS) - 1)) | tile
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _margin(value, err, pack_rel):
    # Half-width of the candidate window around a tracked value (see kernels/_search.py).
    return err + pack_rel * (tl.abs(value) + 2.0 * err)


@triton.jit
def _ordered(x):
    # fp32 -> int32 with the same order (negative values: flip the magnitude bits); x is never NaN.
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _count_at_most(m, t):
    return tl.sum((_ordered(m) <= t[:, None]).to(tl.int32), axis=1)


@triton.jit
def _kth_tracked(m0, m1, m2, m3, row_k, R: tl.constexpr):
    """The row_k-th smallest (1-based) of the R * BLOCK_K tracked values of each row: fp32 [BLOCK_N].

    A bisection over the values' order-preserving int32 images: 32 rounds of "how many are <= t" halve the range
    from (min, max] to the exact row_k-th value. A loop of compares and sums, so it compiles to a small kernel at
    any R * BLOCK_K (a sorting network of 1024 values per row took ptxas minutes and megabytes of code)."""
    lo = _ordered(tl.min(m0, axis=1)).to(tl.int64)
    top = tl.max(m0, axis=1)
    if R >= 2:
        top = tl.maximum(top, tl.max(m1, axis=1))
    if R >= 4:
        top = tl.maximum(tl.maximum(top, tl.max(m2, axis=1)), tl.max(m3, axis=1))
    hi = _ordered(top).to(tl.int64)
    for _ in range(32):
        mid = (lo + (hi - lo) // 2).to(tl.int32)
        count = _count_at_most(m0, mid)
        if R >= 2:
            count += _count_at_most(m1, mid)
        if R >= 4:
            count += _count_at_most(m2, mid) + _count_at_most(m3, mid)
        enough = count >= row_k
        hi = tl.where(enough, mid.to(tl.int64), hi)
        lo = tl.where(enough, lo, mid.to(tl.int64) + 1)
    # hi is the image of the row_k-th value; undo the order map (it is its own inverse).
    return _ordered_inverse(hi.to(tl.int32))


@triton.jit
def _ordered_inverse(o):
    return (o ^ ((o >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["seed", "threshold", "position_offset"])
def _scan_kernel(
    z_ptr,  # *bf16 [NPAD, DPAD] augmented z
    c_ptr,  # *bf16 [KPAD, DPAD] augmented codebook
    err_ptr,  # *fp32 [N] search bound E_i (NaN: the row has a NaN / inf entry)
    status_ptr,  # *int32 [N] out: 1 one candidate (in buf[row, 0]), 0 needs pass 2, -1 non-finite row
    thr_ptr,  # *fp32 [N] out: pass 2 threshold
    buf_ptr,  # *int32 [N, buf_stride] out: column 0 = the single candidate (slot mode: slot) when status == 1
    rank_ptr,  # *int32 [N] out when PERTURB: the drawn rank
    N, k, num_tiles, buf_stride, pack_rel, seed, threshold, position_offset, topk,
    DPAD: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, D_CHUNKS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R: tl.constexpr, PACK_BITS: tl.constexpr,
    NEED_KTH: tl.constexpr, PERTURB: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    z_main, z_tail = load_resident(z_ptr, rows, DPAD, D_MAIN, D_TAIL, D_CHUNKS)

    m0 = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
    m1 = m0
    m2 = m0
    m3 = m0
    for tile in range(num_tiles):
        x = search_tile(z_main, z_tail, z_ptr, c_ptr, rows, tile * BLOCK_K, DPAD, D_MAIN, D_TAIL, D_CHUNKS,
                        BLOCK_N, BLOCK_K, UPCAST_DOT)
        if PACK_BITS > 0:
            x = _pack(x, tile, PACK_BITS)
        # Insert x into the per-slot sorted list m0 <= m1 <= ... (x is never NaN: see FAR in kernels/_search.py).
        if R >= 4:
            m3 = tl.minimum(m3, tl.maximum(m2, x))
            m2 = tl.minimum(m2, tl.maximum(m1, x))
        if R >= 2:
            m1 = tl.minimum(m1, tl.maximum(m0, x))
        m0 = tl.minimum(m0, x)

    err = tl.load(err_ptr + rows, mask=row_mask, other=0.0)
    if PERTURB:
        from_rank = perturb_rank(rows, position_offset, seed, threshold, topk)
        tl.store(rank_ptr + rows, from_rank.to(tl.int32), mask=row_mask)
        row_k = from_rank.to(tl.int32) + 1
    else:
        row_k = tl.zeros([BLOCK_N], tl.int32) + k

    slots = tl.arange(0, BLOCK_K)
    best = tl.min(m0, axis=1)
    best_slot = tl.argmin(m0, axis=1)
    if PACK_BITS > 0:
        # The runner-up: the other slots' minima and the winning slot's second minimum.
        second = tl.min(tl.where(slots[None, :] == best_slot[:, None], m1, m0), axis=1)
    else:
        # Slot mode: the re-rank scans the winning slot's codes exactly, so only the other slots count here.
        second = tl.min(tl.where(slots[None, :] == best_slot[:, None], float("inf"), m0), axis=1)
    thr = tl.minimum(best + 2.0 * _margin(best, err, pack_rel), HALF_FAR)
    single = (second > thr) & (best < HALF_FAR) & (row_k == 1)
    if PACK_BITS > 0:
        tile_of_best = best.to(tl.int32, bitcast=True) & ((1 << PACK_BITS) - 1)
        code = tile_of_best * BLOCK_K + best_slot.to(tl.int32)
    else:
        code = best_slot.to(tl.int32)  # the slot: the re-rank tries its every code

    if NEED_KTH:
        if tl.max(tl.where(row_mask, row_k, 1), axis=0) > 1:
            kth = _kth_tracked(m0, m1, m2, m3, row_k, R)
            thr = tl.where(row_k > 1, tl.minimum(kth + 2.0 * _margin(kth, err, pack_rel), HALF_FAR), thr)

    status = tl.where(err != err, -1, tl.where(single, 1, 0))
    tl.store(status_ptr + rows, status, mask=row_mask)
    tl.store(thr_ptr + rows, tl.where(err != err, float("nan"), thr), mask=row_mask)
    tl.store(buf_ptr + rows * buf_stride, code, mask=row_mask & single)


@triton.jit
def _collect_kernel(
    z_ptr,  # *bf16 [NPAD, DPAD] augmented z
    c_ptr,  # *bf16 [KPAD, DPAD] augmented codebook
    thr_ptr,  # *fp32 [N] threshold per row (NaN: collect nothing)
    list_ptr,  # *int32 [N] rows to collect for, first n_list entries
    n_list_ptr,  # *int32 [1]
    buf_ptr,  # *int32 [N, CAP] out: candidate codes
    count_ptr,  # *int32 [N] out: number of hits (may exceed CAP: overflow)
    num_tiles,
    DPAD: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, D_CHUNKS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CAP: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    start = tl.program_id(0) * BLOCK_N
    n_list = tl.load(n_list_ptr)
    if start < n_list:
        offs = start + tl.arange(0, BLOCK_N)
        in_list = offs < n_list
        # Padding entries point at row 0 with a NaN threshold: they load valid memory and hit nothing (NaN <= x is
        # false), as do the non-finite rows, whose threshold pass 1 set to NaN.
        rows = tl.load(list_ptr + offs, mask=in_list, other=0).to(tl.int64)
        thr = tl.load(thr_ptr + rows, mask=in_list, other=float("nan"))
        z_main, z_tail = load_resident(z_ptr, rows, DPAD, D_MAIN, D_TAIL, D_CHUNKS)
        # count[row] (zeroed by the launcher) hands out buffer slots: one atomic per hit, none per miss, so the
        # candidates land in an arbitrary order, which the re-rank's sort makes irrelevant.
        counter = count_ptr + rows[:, None] + tl.zeros([BLOCK_N, BLOCK_K], tl.int64)
        for tile in range(num_tiles):
            x = search_tile(z_main, z_tail, z_ptr, c_ptr, rows, tile * BLOCK_K, DPAD, D_MAIN, D_TAIL, D_CHUNKS,
                            BLOCK_N, BLOCK_K, UPCAST_DOT)
            hit = x <= thr[:, None]
            # Most tiles hold no candidate of any row once k is small against K: skip the atomics there.
            if tl.max(tl.max(hit.to(tl.int32), axis=1), axis=0) > 0:
                pos = tl.atomic_add(counter, 1, mask=hit, sem="relaxed")
                codes = tile * BLOCK_K + tl.arange(0, BLOCK_K)
                tl.store(buf_ptr + rows[:, None] * CAP + pos, codes[None, :], mask=hit & (pos < CAP))
