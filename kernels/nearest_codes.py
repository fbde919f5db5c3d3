"""Triton k-nearest codebook search (`knn_codes` of docs/INTERFACES.md), never materializing N x K distances.

Shapes and dtypes
  z         [N, D]  fp32 / fp16 / bf16 (last dim contiguous; a copy is made otherwise)
  codebook  [K, D]  same dtype as z
  dist      [N, k]  fp32, ascending, ||z||^2 - 2 z.c + ||c||^2 accumulated in fp32 (a hair below 0 is possible)
  idx       [N, k]  int64; ties go to the lowest index; a NaN distance orders as +inf and is returned as +inf

Algorithm: one program per tile of BLOCK_N rows streams the codebook in tiles of BLOCK_K codes; z stays in
registers (or is re-read per D chunk when D > BLOCK_D). k = 1 keeps a running (min, argmin) per row. k > 1 packs
(distance, index) into one int64 key (kernels/_keys.py), takes each tile's KP = next_pow2(k) smallest keys with a
bitonic top-k, and merges them into the running sorted list with min(running_desc, tile_asc) + one bitonic merge.
When the row tiles alone cannot fill the GPU (small N), the codebook is split over SPLIT programs per row tile;
each writes its sorted partial list of KP keys and a second small kernel merges the SPLIT lists per row.
"""

import os

import torch
import triton
import triton.language as tl

from tokpost_fast.kernels._keys import KEY_PAD, MAX_CODES, dist_to_key, key_to_dist, key_to_index, merge_topk_desc

# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The running list is KP int64 keys per row in registers; past 1024 it no longer fits any tile shape.
MAX_K = 1024
# Widest D chunk held per tile; larger D is looped over in chunks of this size.
MAX_BLOCK_D = 128
# A split of the codebook covers whole tiles of every config in the tuning grid (largest BLOCK_K is 256).
SPLIT_ALIGN = 256
# Each split streams at least this many codes, so the partial write and merge stay a small fraction of the work.
MIN_CODES_PER_SPLIT = 1024
MERGE_BLOCK_N = 16


def next_pow2(v: int) -> int:
    return 1 if v <= 1 else 1 << (v - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_inputs(z: torch.Tensor, codebook: torch.Tensor, k: int, k_name: str = "k"):
    """Validates the kernel contract and returns (z, codebook) with unit stride along D."""
    for name, t in (("z", z), ("codebook", codebook)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t))}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device.type == "cpu" and not interpreted():
            raise ValueError(f"{name} is on the CPU: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")
        if t.device.type not in ("cuda", "cpu"):
            raise ValueError(f"{name} is on {t.device}; the Triton kernels need CUDA tensors")
    if z.device != codebook.device:
        raise ValueError(f"z is on {z.device} but codebook is on {codebook.device}")
    if z.dtype != codebook.dtype:
        raise ValueError(f"z ({z.dtype}) and codebook ({codebook.dtype}) must have the same dtype")
    K, D = codebook.shape
    if z.shape[1] != D:
        raise ValueError(f"z's dim ({z.shape[1]}) must equal codebook's dim D ({D})")
    if D == 0 or K == 0:
        raise ValueError(f"codebook must be non-empty, got shape {tuple(codebook.shape)}")
    if K > MAX_CODES:
        raise ValueError(f"codebook has {K} codes; the packed keys hold at most {MAX_CODES}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(K, MAX_K):
        raise ValueError(f"{k_name} must be an int in [1, min(K, {MAX_K})] = [1, {min(K, MAX_K)}], got {k!r}")
    # Rows may be strided (a slice of a bigger batch); the D axis must be unit-stride for vector loads.
    z = z if z.stride(1) == 1 else z.contiguous()
    codebook = codebook if codebook.stride(1) == 1 else codebook.contiguous()
    return z, codebook


# ----------------------------------------------------------------------------------------------------------------
# Tuning grid, prune predicate, per-GPU heuristics, split planning
# ----------------------------------------------------------------------------------------------------------------

TUNE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn in (16, 32, 64, 128)
    for bk in (32, 64, 128, 256)
    for w in (4, 8)
    for s in (1, 2, 3)
]


def _smem_limit(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 30
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)


def config_fits(bn: int, bk: int, warps: int, stages: int, KP: int, BLOCK_D: int, elem_bytes: int, smem: int) -> bool:
    """Whether a tile config can run well: the prune predicate of the tuning grid."""
    if bk < KP:  # a tile must hold a whole candidate list
        return False
    if KP == 1:
        if bn * bk > 128 * 128:  # the fp32 distance tile must stay in registers
            return False
    elif bn * bk > 4096 or bn * KP > 4096:  # int64 keys of the tile and of the running lists, in registers
        return False
    if warps > 4 and bn * bk < 64 * 64:  # small tiles leave extra warps idle
        return False
    # Shared memory: the z tile plus one codebook tile per pipeline stage.
    return BLOCK_D * elem_bytes * (bn + stages * bk) <= smem


def _prune(configs, named_args, **kwargs):
    KP, BLOCK_D = kwargs["KP"], kwargs["BLOCK_D"]
    z = named_args["z_ptr"]
    smem = _smem_limit(z.device)
    kept = [
        c for c in configs
        if config_fits(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages, KP, BLOCK_D, z.element_size(), smem)
    ]
    return kept or [triton.Config({"BLOCK_N": 16, "BLOCK_K": max(32, KP)}, num_warps=4, num_stages=1)]


def heuristic_config(N: int, K: int, D: int, KP: int, dtype: torch.dtype, device: torch.device) -> dict:
    """A tile config without timing anything. Starting points by GPU generation, NOT measured in this repo yet
    (no GPU was available when they were written); `config="autotune"` times the pruned grid instead."""
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    if KP == 1:
        if cap >= (9, 0):  # H100/H200: 228 KiB smem, deep cp.async/TMA pipelines pay off
            cfg = dict(BLOCK_N=128 if N >= 65536 else 64, BLOCK_K=64, num_warps=4, num_stages=3)
        elif cap >= (8, 0):  # A100-class
            cfg = dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2)
        else:
            cfg = dict(BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    else:
        # The bitonic top-k costs O(BLOCK_K log^2 KP) integer ops per row per tile, far more than the
        # tensor-core dot, so tiles stay narrow (BLOCK_K = KP, at least 32) and short (registers hold the lists).
        bk = max(32, KP)
        bn = max(16, min(64, 4096 // bk))
        # Full 4096-key tiles get 8 warps so each thread holds half as many int64 keys (fewer spills).
        cfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=8 if bn * bk >= 4096 else 4,
                   num_stages=2 if cap >= (8, 0) else 1)
    elem = torch.tensor([], dtype=dtype).element_size()
    block_d = min(next_pow2(max(D, 16)), MAX_BLOCK_D)
    while not config_fits(cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"], cfg["num_stages"], KP, block_d, elem,
                          _smem_limit(device)) and cfg["num_stages"] > 1:
        cfg["num_stages"] -= 1
    return cfg


def plan_split(N: int, K: int, block_n: int, align: int, device: torch.device, forced) -> tuple:
    """(splits, codes_per_split): how many programs share one row tile's codebook scan."""
    if forced is not None:
        splits = int(forced)
    elif device.type != "cuda":
        splits = 1
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        row_tiles = cdiv(N, block_n)
        # Two waves of programs hide the tail; below that, split K until they exist or the splits get too short.
        splits = 1 if row_tiles >= sms else min(cdiv(2 * sms, row_tiles), cdiv(K, MIN_CODES_PER_SPLIT))
    splits = max(1, min(splits, cdiv(K, align)))
    if splits == 1:
        return 1, K
    codes_per_split = cdiv(cdiv(K, splits), align) * align
    return cdiv(K, codes_per_split), codes_per_split


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _dot_f32(a, b, IS_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:
        # Interpreter only: it keeps bf16 as raw uint16 and its dot multiplies the bit patterns. bf16 products
        # are exact in fp32, so upcasting first gives what the tensor cores compute.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IS_FP32:
        # No TF32: fp32 inputs get fp32-accurate distances, as the reference computes them.
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)  # fp16/bf16 tensor cores, fp32 accumulator


@triton.jit
def scan_codebook(
    z_ptr,  # *fp32|fp16|bf16 [N, D], row stride stride_zn
    c_ptr,  # *same [K, D], row stride stride_cn
    csq_ptr,  # *fp32 [K] ||c||^2
    rows, row_mask, k_lo, k_hi, D, stride_zn, stride_cn,
    KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr, IS_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """The KP smallest keys of codes [k_lo, k_hi) for each of BLOCK_N rows: int64 [BLOCK_N, KP], descending."""
    offs_d = tl.arange(0, BLOCK_D)
    z_rows = z_ptr + rows[:, None] * stride_zn
    if D_CHUNKS == 1:
        # Whole z tile resident for the entire codebook stream.
        z_tile = tl.load(z_rows + offs_d[None, :], mask=row_mask[:, None] & (offs_d < D)[None, :], other=0.0)
        zf = z_tile.to(tl.float32)
        zsq = tl.sum(zf * zf, axis=1)
    else:
        zsq = tl.zeros([BLOCK_N], tl.float32)
        for dc in range(D_CHUNKS):
            d = dc * BLOCK_D + offs_d
            zf = tl.load(z_rows + d[None, :], mask=row_mask[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
            zsq += tl.sum(zf * zf, axis=1)

    if KP == 1:
        best_dist = tl.full([BLOCK_N], float("inf"), tl.float32)
        best_idx = tl.zeros([BLOCK_N], tl.int32) + k_lo
    else:
        running = tl.full([BLOCK_N, KP], KEY_PAD, tl.int64)

    for k_start in range(k_lo, k_hi, BLOCK_K):
        cols = k_start + tl.arange(0, BLOCK_K)
        col_mask = cols < k_hi
        c_cols = c_ptr + cols.to(tl.int64)[None, :] * stride_cn
        csq = tl.load(csq_ptr + cols, mask=col_mask, other=0.0)
        if D_CHUNKS == 1:
            c_tile = tl.load(c_cols + offs_d[:, None], mask=(offs_d < D)[:, None] & col_mask[None, :], other=0.0)
            cross = _dot_f32(z_tile, c_tile, IS_FP32, UPCAST_DOT)
        else:
            cross = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for dc in range(D_CHUNKS):
                d = dc * BLOCK_D + offs_d
                z_chunk = tl.load(z_rows + d[None, :], mask=row_mask[:, None] & (d < D)[None, :], other=0.0)
                c_chunk = tl.load(c_cols + d[:, None], mask=(d < D)[:, None] & col_mask[None, :], other=0.0)
                cross += _dot_f32(z_chunk, c_chunk, IS_FP32, UPCAST_DOT)
        # Same association as the reference: (||z||^2 - 2 z.c) + ||c||^2.
        dist = (zsq[:, None] - 2.0 * cross) + csq[None, :]
        dist = tl.where(dist != dist, float("inf"), dist)  # NaN orders (and is returned) as +inf
        if KP == 1:
            dist = tl.where(col_mask[None, :], dist, float("inf"))
            # tl.min's argmin breaks ties to the left (lowest index); the strict < keeps the earlier tile's.
            tile_min, tile_arg = tl.min(dist, axis=1, return_indices=True, return_indices_tie_break_left=True)
            better = tile_min < best_dist
            best_dist = tl.where(better, tile_min, best_dist)
            best_idx = tl.where(better, k_start + tile_arg, best_idx)
        else:
            dist = tl.where(dist == 0.0, 0.0, dist)  # -0.0 -> +0.0: keys must see them as equal
            keys = tl.where(col_mask[None, :], dist_to_key(dist, cols[None, :]), KEY_PAD)
            tile_top = tl.topk(keys, KP, dim=1, descending=False)  # KP smallest, ascending
            running = merge_topk_desc(running, tile_top, KP)

    if KP == 1:
        best_dist = tl.where(best_dist == 0.0, 0.0, best_dist)
        running = dist_to_key(best_dist, best_idx)[:, None]
    return running


@triton.jit
def store_knn(running, rows, row_mask, dist_ptr, idx_ptr, k, KP: tl.constexpr):
    # running is descending: column j holds the (KP - 1 - j)-th nearest; keep the first k.
    pos = KP - 1 - tl.arange(0, KP)
    mask = row_mask[:, None] & (pos < k)[None, :]
    offs = rows[:, None] * k + pos[None, :]
    tl.store(dist_ptr + offs, key_to_dist(running), mask=mask)
    tl.store(idx_ptr + offs, key_to_index(running), mask=mask)


@triton.jit
def store_partial(running, rows, row_mask, part_ptr, split, N, KP: tl.constexpr):
    # Partial lists are stored ascending so the merge reads them in the order merge_topk_desc wants.
    # (split * N + rows) stays small: splitting only happens when N is small.
    pos = KP - 1 - tl.arange(0, KP)
    tl.store(part_ptr + (split * N + rows)[:, None] * KP + pos[None, :], running, mask=row_mask[:, None])


@triton.jit
def merge_partials(part_ptr, rows, row_mask, N, SPLITS, KP: tl.constexpr, BLOCK_N: tl.constexpr):
    running = tl.full([BLOCK_N, KP], KEY_PAD, tl.int64)
    cols = tl.arange(0, KP)
    for s in range(SPLITS):
        part = tl.load(part_ptr + (s * N + rows)[:, None] * KP + cols[None, :], mask=row_mask[:, None], other=KEY_PAD)
        running = merge_topk_desc(running, part, KP)
    return running


@triton.jit
def _knn_kernel(
    z_ptr,  # *fp32|fp16|bf16 [N, D]
    c_ptr,  # *same [K, D]
    csq_ptr,  # *fp32 [K] ||c||^2
    dist_ptr,  # *fp32 [N, k] (written when SPLITS == 1)
    idx_ptr,  # *int64 [N, k] (written when SPLITS == 1)
    part_ptr,  # *int64 [SPLITS, N, KP] ascending partial keys (written when SPLITS > 1)
    N, K, D, k, stride_zn, stride_cn, CODES_PER_SPLIT,
    N_BUCKET,  # next_pow2(N): only an autotuning key
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
        store_knn(running, rows, row_mask, dist_ptr, idx_ptr, k, KP)


@triton.jit
def _knn_merge_kernel(
    part_ptr,  # *int64 [SPLITS, N, KP] ascending partial keys
    dist_ptr,  # *fp32 [N, k]
    idx_ptr,  # *int64 [N, k]
    N, k, SPLITS, KP: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    running = merge_partials(part_ptr, rows, row_mask, N, SPLITS, KP, BLOCK_N)
    store_knn(running, rows, row_mask, dist_ptr, idx_ptr, k, KP)


@triton.jit
def _row_sq_norm_kernel(
    x_ptr,  # *fp32|fp16|bf16 [R, D], row stride stride_r
    out_ptr,  # *fp32 [R]
    R, D, stride_r, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_R], tl.float32)
    for dc in range(D_CHUNKS):
        d = dc * BLOCK_D + offs_d
        x = tl.load(x_ptr + rows[:, None] * stride_r + d[None, :], mask=(rows < R)[:, None] & (d < D)[None, :], other=0.0)
        xf = x.to(tl.float32)
        acc += tl.sum(xf * xf, axis=1)
    tl.store(out_ptr + rows, acc, mask=rows < R)


_knn_kernel_autotuned = triton.autotune(
    TUNE_CONFIGS, key=["N_BUCKET", "K", "D", "KP", "WRITE_PARTIAL"], prune_configs_by={"early_config_prune": _prune}
)(_knn_kernel)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------


def launch_scan(kernel, autotuned_kernel, z, codebook, k, config, extra_args, extra_out):
    """Shared by knn_codes_triton and perturb_codes_triton: plans tiles/splits and runs kernel (+ its merge).

    kernel(z, c, csq, out0, out1, part, N, K, D, k, stride_zn, stride_cn, CODES_PER_SPLIT, N_BUCKET, *extra_args,
    KP=, BLOCK_D=, ...). Returns (splits, part, KP) so the caller runs its own merge when splits > 1.
    """
    N, D = z.shape
    K = codebook.shape[0]
    KP = next_pow2(k)
    block_d = min(next_pow2(max(D, 16)), MAX_BLOCK_D)
    d_chunks = cdiv(D, block_d)
    csq = torch.empty(K, dtype=torch.float32, device=z.device)
    _row_sq_norm_kernel[(cdiv(K, 64),)](codebook, csq, K, D, codebook.stride(0), BLOCK_R=64, BLOCK_D=block_d,
                                        D_CHUNKS=d_chunks)
    autotune = config == "autotune" or (config is None and os.environ.get("TOKPOST_TRITON_AUTOTUNE") == "1")
    autotune = autotune and not interpreted()  # nothing to time under the interpreter
    if isinstance(config, dict):
        cfg = dict(config)
        unknown = set(cfg) - {"BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "SPLIT_K"}
        if unknown:
            raise ValueError(f"config has unknown keys {sorted(unknown)}")
        base = heuristic_config(N, K, D, KP, z.dtype, z.device)
        cfg = {**base, **cfg}
        for key in ("BLOCK_N", "BLOCK_K"):
            if cfg[key] < 16 or cfg[key] & (cfg[key] - 1):
                raise ValueError(f"config[{key!r}] must be a power of two >= 16 (tl.dot's minimum), got {cfg[key]}")
        cfg["BLOCK_K"] = max(cfg["BLOCK_K"], KP)  # a tile must hold a whole candidate list
    elif config is None or config in ("autotune", "heuristic"):
        cfg = heuristic_config(N, K, D, KP, z.dtype, z.device)
    else:
        raise ValueError(f"config must be None, 'heuristic', 'autotune' or a dict, got {config!r}")
    align = max(SPLIT_ALIGN, KP) if autotune else cfg["BLOCK_K"]
    splits, codes_per_split = plan_split(N, K, cfg["BLOCK_N"], align, z.device, cfg.get("SPLIT_K"))
    part = torch.empty((splits, N, KP) if splits > 1 else (1,), dtype=torch.int64, device=z.device)
    common = dict(KP=KP, BLOCK_D=block_d, D_CHUNKS=d_chunks, IS_FP32=z.dtype == torch.float32,
                  UPCAST_DOT=interpreted() and z.dtype == torch.bfloat16, WRITE_PARTIAL=splits > 1)
    args = (z, codebook, csq, *extra_out, part, N, K, D, k, z.stride(0), codebook.stride(0), codes_per_split,
            next_pow2(N), *extra_args)
    if autotune:
        grid = lambda meta: (cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
        autotuned_kernel[grid](*args, **common)
    else:
        kernel[(cdiv(N, cfg["BLOCK_N"]), splits)](*args, **common, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                                                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return splits, part, KP


def knn_codes_triton(z: torch.Tensor, codebook: torch.Tensor, k: int, config=None):
    """The k nearest codes of each row of z, sorted: (dist fp32 [N, k], idx int64 [N, k]).

    config: None or "heuristic" (per-GPU table), "autotune" (time the pruned grid once per shape; also
    TOKPOST_TRITON_AUTOTUNE=1), or a dict forcing BLOCK_N, BLOCK_K (raised to next_pow2(k) if smaller),
    num_warps, num_stages and SPLIT_K (codebook splits per row tile). The default is the heuristic, not the
    autotuner, so the chosen tiles (and with them the fp32 rounding) do not depend on timing noise between runs.
    """
    z, codebook = check_inputs(z, codebook, k)
    N = z.shape[0]
    dist = torch.empty(N, k, dtype=torch.float32, device=z.device)
    idx = torch.empty(N, k, dtype=torch.int64, device=z.device)
    if N == 0:
        return dist, idx
    splits, part, KP = launch_scan(_knn_kernel, _knn_kernel_autotuned, z, codebook, k, config, (), (dist, idx))
    if splits > 1:
        _knn_merge_kernel[(cdiv(N, MERGE_BLOCK_N),)](part, dist, idx, N, k, splits, KP=KP, BLOCK_N=MERGE_BLOCK_N)
    return dist, idx
