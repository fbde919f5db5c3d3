"""The exact re-rank: the contract's difference-form distance for every candidate, then one sort per row.

Shapes and dtypes
  z [N, D], codebook [K, D]  the caller's inputs (fp32 / fp16 / bf16, upcast to fp32 here)
  buf [N, CAP] int32 candidate codes (CAP = buf_stride), count [N] int32, status [N] int32 (kernels/_scan.py)
  out: dist [N, k] fp32 + idx [N, k] int64 (nearest codes), or idx [N] + idx_perturbed [N] (PERTURB)

dist = fl(...fl(fl(t_0 * t_0) + fl(t_1 * t_1))...) with t_d = fl(z_d - c_d), d in increasing order: the launcher
passes enable_fp_fusion=False so no multiply-add is contracted, which makes it bit-identical to the reference and
the CPU kernel. Keys (dist, index) are sorted, so ties go to the lowest index and NaN (turned into +inf) last.
A row whose candidate list overflowed (count > CAP) or came out short (count < k_i: fewer finite codes than asked
for) streams every code through the same exact computation instead: exact whatever the data, slow only there.
Candidates go through in chunks of WIDTH (>= KP), only as many chunks as the fullest row of a program needs.
DIRECT launches answer the rows pass 1 settled (status 1) with KP = 1: one candidate in buf[row, 0] (WIDTH = 1),
or in slot mode (SLOT_STRIDE = BLOCK_K of the scan) the winning slot, whose WIDTH >= K / BLOCK_K codes are all
tried.
"""

import triton
import triton.language as tl

from tokpost_fast.kernels._keys import KEY_PAD, dist_to_key, key_to_dist, key_to_index, merge_topk_desc
from tokpost_fast.kernels._keys import select_rank, smallest_ascending

MAX_INDEX = tl.constexpr(2**31 - 1)
# From this D on, the exact distances load 8 dimensions per instruction ([rows, WIDTH, 8] blocks).
VECTOR_MIN_D = tl.constexpr(64)
# Rows per program of the DIRECT launch (one candidate each) and warps of every re-rank launch.
DIRECT_BLOCK_R = 128
RERANK_WARPS = 4


@triton.jit
def _accumulate(s, z_rows, c_rows, d, active):
    # One step of the difference form: s + (z_d - c_d)^2, each operation rounded on its own (no fusion).
    zd = tl.load(z_rows + d, mask=active, other=0.0).to(tl.float32)
    t = zd[:, None] - tl.load(c_rows + d).to(tl.float32)
    return s + t * t


@triton.jit
def _split8(x):
    """x [..., 8] -> its 8 slices [...] in order 0..7 (register moves: the 8 values sit in one thread)."""
    even, odd = tl.split(tl.reshape(x, x.shape[:-1] + [4, 2]))  # 0 2 4 6 | 1 3 5 7
    e04, e26 = tl.split(tl.reshape(even, x.shape[:-1] + [2, 2]))
    o15, o37 = tl.split(tl.reshape(odd, x.shape[:-1] + [2, 2]))
    x0, x4 = tl.split(e04)
    x2, x6 = tl.split(e26)
    x1, x5 = tl.split(o15)
    x3, x7 = tl.split(o37)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _exact_distances(z_ptr, c_ptr, rows, cand, active, D: tl.constexpr, stride_zn, OFFSETS_32: tl.constexpr):
    """Difference-form fp32 distances of rows [BR] to codes cand [BR, W] (all valid indices) of a contiguous
    codebook [K, D]; NaN -> +inf.

    D >= VECTOR_MIN_D: eight dimensions at a time: one 16-byte load per candidate (bf16) brings c_d .. c_d+7, the subtractions and
    squares run on the [BR, W, 8] block (elementwise: order-free), and the eight squares are then added to s one
    by one in increasing d, which is the contract's order. The D % 8 tail goes one dimension at a time."""
    s = tl.zeros(cand.shape, tl.float32)
    z_rows = z_ptr + rows * stride_zn
    if OFFSETS_32:  # K * D < 2**31: a 32-bit multiply per candidate instead of a 64-bit one
        c_rows = c_ptr + cand * D
    else:
        c_rows = c_ptr + cand.to(tl.int64) * D
    if D >= VECTOR_MIN_D:
        eight = tl.arange(0, 8)
        for d0 in range(0, D - D % 8, 8):
            zv = tl.load(z_rows[:, None] + d0 + eight[None, :], mask=active[:, None], other=0.0).to(tl.float32)
            cv = tl.load(c_rows[:, :, None] + d0 + eight[None, None, :]).to(tl.float32)
            t = zv[:, None, :] - cv
            q0, q1, q2, q3, q4, q5, q6, q7 = _split8(t * t)
            s = s + q0
            s = s + q1
            s = s + q2
            s = s + q3
            s = s + q4
            s = s + q5
            s = s + q6
            s = s + q7
        for dd in tl.static_range(D % 8):
            s = _accumulate(s, z_rows, c_rows, D - D % 8 + dd, active)
    else:
        # Small D: unrolled scalar steps with the offsets folded into the loads; more candidates per program.
        for dd in tl.static_range(D):
            s = _accumulate(s, z_rows, c_rows, dd, active)
    return tl.where(s != s, float("inf"), s)


@triton.jit
def _rerank_kernel(
    z_ptr,  # *fp32|fp16|bf16 [N, D], row stride stride_zn
    c_ptr,  # *same [K, D], contiguous
    buf_ptr,  # *int32 [N, buf_stride] candidate codes
    count_ptr,  # *int32 [N] candidates per row (general launches)
    status_ptr,  # *int32 [N] 1 settled by pass 1, 0 candidates in buf, -1 non-finite row
    list_ptr,  # *int32 [N] rows of a general launch (first n_list entries)
    n_list_ptr,  # *int32 [1]
    rank_ptr,  # *int32 [N] drawn rank (PERTURB)
    out0_ptr,  # *fp32 [N, k] dist, or *int64 [N] idx (PERTURB)
    out1_ptr,  # *int64 [N, k] idx, or *int64 [N] idx_perturbed (PERTURB)
    N, K, k, stride_zn, buf_stride, D: tl.constexpr,
    WIDTH: tl.constexpr, KP: tl.constexpr, BLOCK_R: tl.constexpr, DIRECT: tl.constexpr, PERTURB: tl.constexpr,
    SLOT_STRIDE: tl.constexpr, OFFSETS_32: tl.constexpr,
):
    pid = tl.program_id(0)
    if DIRECT:
        rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        status = tl.load(status_ptr + rows, mask=rows < N, other=0)
        active = (rows < N) & (status == 1)
        count = tl.where(active, WIDTH, 0)  # one chunk of WIDTH candidates
        n_here = tl.sum(active.to(tl.int32), axis=0)
    else:
        offs = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        n_list = tl.load(n_list_ptr)
        active = offs < n_list
        rows = tl.load(list_ptr + offs, mask=active, other=0).to(tl.int64)
        status = tl.load(status_ptr + rows, mask=active, other=0)
        count = tl.load(count_ptr + rows, mask=active, other=0)
        n_here = tl.sum(active.to(tl.int32), axis=0)
    if n_here > 0:
        if PERTURB and not DIRECT:
            rank = tl.load(rank_ptr + rows, mask=active, other=0)
            row_k = rank + 1
        else:
            # (DIRECT rows are settled k = 1 rows: a perturbation row there drew rank 0.)
            row_k = tl.zeros([BLOCK_R], tl.int32) + (1 if PERTURB else k)
        bad = status < 0
        live = active & ~bad
        if DIRECT:
            overflow = active & False
        else:
            overflow = live & ((count > buf_stride) | (count < row_k))
        # Chunks of WIDTH candidates, as many as the fullest row of the program needs (overflow: all K codes).
        todo = tl.where(overflow, K, tl.where(live, count, 0))
        chunks = tl.cdiv(tl.max(todo, axis=0), WIDTH)
        running = tl.full([BLOCK_R, KP], KEY_PAD, tl.int64)
        for chunk in range(chunks):
            j = chunk * WIDTH + tl.arange(0, WIDTH)[None, :]
            listed = live[:, None] & ~overflow[:, None] & (j < count[:, None])
            if SLOT_STRIDE > 0:
                # DIRECT, slot mode: buf[row, 0] is a slot; its codes are slot, slot + SLOT_STRIDE, ...
                slot = tl.load(buf_ptr + rows * buf_stride, mask=live, other=0)
                from_buf = slot[:, None] + j * SLOT_STRIDE
                listed = listed & (from_buf < K)
            else:
                from_buf = tl.load(buf_ptr + rows[:, None] * buf_stride + j, mask=listed, other=0)
            scanned = j
            valid = listed | (overflow[:, None] & (scanned < K))
            # Invalid slots read code 0 (always there) instead of masking every load; their keys are dropped.
            cand = tl.where(valid, tl.where(overflow[:, None], scanned, from_buf), 0)
            dist = _exact_distances(z_ptr, c_ptr, rows, cand, live, D, stride_zn, OFFSETS_32)
            if KP == 1:
                # The smallest (dist, index) without 64-bit keys per candidate: the minimum distance, then the
                # lowest index at it (invalid slots: +inf and the largest index, so any valid code wins).
                dist = tl.where(valid, dist, float("inf"))
                nearest = tl.min(dist, axis=1)
                first = tl.min(tl.where(dist == nearest[:, None], tl.where(valid, cand, MAX_INDEX), MAX_INDEX), axis=1)
                running = tl.minimum(running, dist_to_key(nearest, first)[:, None])
            else:
                keys = tl.where(valid, dist_to_key(dist, cand), KEY_PAD)
                running = merge_topk_desc(running, smallest_ascending(keys, KP, WIDTH), KP)
        if PERTURB and DIRECT:
            nearest = key_to_index(tl.min(running, axis=1))
            tl.store(out0_ptr + rows, nearest, mask=active)
            tl.store(out1_ptr + rows, nearest, mask=active)
        elif PERTURB:
            nearest = key_to_index(select_rank(running, tl.zeros_like(rank), KP))
            chosen = key_to_index(select_rank(running, rank, KP))
            # A non-finite token ranks the codes in index order: code 0, and its drawn rank.
            tl.store(out0_ptr + rows, tl.where(bad, 0, nearest), mask=active)
            tl.store(out1_ptr + rows, tl.where(bad, rank.to(tl.int64), chosen), mask=active)
        else:
            # running is descending: column c holds the (KP - 1 - c)-th nearest.
            pos = KP - 1 - tl.arange(0, KP)
            mask = active[:, None] & (pos < k)[None, :]
            offs_out = rows[:, None] * k + pos[None, :]
            dist_out = tl.where(bad[:, None], float("inf"), key_to_dist(running))
            idx_out = tl.where(bad[:, None], pos[None, :].to(tl.int64), key_to_index(running))
            tl.store(out0_ptr + offs_out, dist_out, mask=mask)
            tl.store(out1_ptr + offs_out, idx_out, mask=mask)
