"""Triton k-nearest codebook search (`knn_codes` of docs/INTERFACES.md), exact, never materializing N x K distances.

Shapes and dtypes
  z         [N, D]  fp32 / fp16 / bf16 (last dim contiguous; a copy is made otherwise)
  codebook  [K, D]  same dtype as z
  dist      [N, k]  fp32, ascending: the contract's difference-form distance (bit-identical to the reference)
  idx       [N, k]  int64; ties go to the lowest index; NaN / inf entries order as +inf, in index order

Algorithm (each step its own kernel; docs/INTERFACES.md "Exact nearest codes" derives the bound):
  1. prepare_operands (kernels/_search.py): augmented bf16 operands whose single dot is ||z - c||^2 / 2 up to a
     stated per-row bound E_i; codes padded to whole tiles with search values at FAR (no masks in any loop).
  2. _scan_kernel (kernels/_scan.py): per slot (tile column) the R smallest search values over the codebook;
     per row either settled (k = 1, nothing else within the window: the winning code, or at small D the winning
     slot's K / BLOCK_K codes) or a threshold that holds every true top-k code.
  3. _collect_kernel: only for the rows of step 2 that need it: every code under the row threshold, compacted
     into a per-row candidate buffer.
  4. _rerank_kernel (kernels/_rerank.py): exact difference-form distance of every candidate, one sort per row
     (a row whose candidates overflow their buffer streams every code instead: exact, slower).
Not done: splitting the codebook across programs when N is small (few row tiles leave SMs idle), TMA loads.
`search_plan` picks every tile size and constexpr; `kernel_specs` lists the compiled variants of a plan, which is
what benchmarks/kernel_report.py compiles for sm_90 / sm_80 without a GPU.
"""

from dataclasses import dataclass

import torch

from tokpost_fast.kernels._rerank import DIRECT_BLOCK_R, RERANK_WARPS, VECTOR_MIN_D, _rerank_kernel
from tokpost_fast.kernels._scan import _collect_kernel, _scan_kernel
from tokpost_fast.kernels._search import Layout, cdiv, interpreted, next_pow2, pack_bits, pack_rel, plan_layout
from tokpost_fast.kernels._search import prepare_operands

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The re-rank keeps KP int64 keys per row and the scan R <= 4 running minima per slot.
MAX_K = 1024
# Codes are int32 inside the kernels.
MAX_CODES = 2**31 - 1 - 4096
# Shared memory per block (opt-in maximum) by compute capability: sm_90 227 KiB, sm_80 163 KiB.
SMEM_BYTES = {9: 227 * 1024, 8: 163 * 1024}
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SLOT_MODE_MAX_DPAD = 32


def rerank_elements(D: int) -> int:
    """Candidates per re-rank program: [rows, WIDTH, 8] fp32 blocks stay in registers (D >= 64, 8 dimensions per
    load), else [rows, WIDTH] scalars, 16 candidates per thread (more spill: the pointers are 64-bit)."""
    return 512 if D >= VECTOR_MIN_D.value else (2048 if D <= 8 else 1024)
CONFIG_KEYS = {"BLOCK_N", "BLOCK_K", "num_warps", "num_stages"}


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
        raise ValueError(f"codebook has {K} codes; the kernels index at most {MAX_CODES}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(K, MAX_K):
        raise ValueError(f"{k_name} must be an int in [1, min(K, {MAX_K})] = [1, {min(K, MAX_K)}], got {k!r}")
    z = z if z.stride(1) == 1 else z.contiguous()
    codebook = codebook if codebook.stride(1) == 1 else codebook.contiguous()
    return z, codebook


@dataclass(frozen=True)
class SearchPlan:
    layout: Layout
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    tracked: int  # R: running minima per slot
    pack_bits: int  # 0: no tile number packed (top-k, slot mode)
    num_tiles: int
    kp: int  # next_pow2(k): the re-rank's sorted list
    cap: int  # candidate buffer per row
    width: int  # candidates per re-rank chunk
    block_r: int  # rows per re-rank program
    perturb: bool
    d: int
    input_dtype: str  # Triton's name of the z / codebook dtype: "fp32", "fp16", "bf16"

    @property
    def need_kth(self) -> bool:
        return self.kp > 1 or self.perturb

    @property
    def slot_mode(self) -> bool:
        return self.pack_bits == 0 and (self.kp == 1 or self.perturb)

    def direct_launch(self) -> tuple:
        """(WIDTH, SLOT_STRIDE) of the DIRECT re-rank: one code, or every code of the winning slot."""
        return (next_pow2(self.num_tiles), self.block_k) if self.slot_mode else (1, 0)

    @property
    def direct_block_r(self) -> int:
        # Rows per DIRECT program: [rows, WIDTH] candidates within RERANK_ELEMENTS.
        # (The perturbation's epilogue holds the drawn ranks too: half as many rows, or triton 3.6 spills.)
        elements = rerank_elements(self.d) // (2 if self.perturb else 1)
        return max(1, min(DIRECT_BLOCK_R, elements // self.direct_launch()[0]))

    def search_constexprs(self, upcast_dot: bool) -> tuple:
        """(scan, collect) constexprs of the two search passes; upcast_dot: the interpreter's (kernels/_search.py)."""
        lay = self.layout
        shape = dict(DPAD=lay.dpad, D_MAIN=lay.d_main, D_TAIL=lay.d_tail, D_CHUNKS=lay.d_chunks,
                     BLOCK_N=self.block_n, BLOCK_K=self.block_k, UPCAST_DOT=upcast_dot)
        scan = dict(shape, R=self.tracked, PACK_BITS=self.pack_bits, NEED_KTH=self.need_kth, PERTURB=self.perturb)
        return scan, dict(shape, CAP=self.cap)

    def rerank_constexprs(self, offsets_32: bool) -> list:
        """The constexprs of each re-rank launch in launch order: DIRECT (k = 1 or perturbation: the rows pass 1
        settled), then the general one. offsets_32: K * D < 2**31."""
        launches = [(self.width, self.kp, self.block_r, False, 0)]
        if self.kp == 1 or self.perturb:
            width, stride = self.direct_launch()
            launches.insert(0, (width, 1, self.direct_block_r, True, stride))
        return [dict(D=self.d, WIDTH=width, KP=kp, BLOCK_R=block_r, DIRECT=direct, PERTURB=self.perturb,
                     SLOT_STRIDE=stride, OFFSETS_32=offsets_32) for width, kp, block_r, direct, stride in launches]


def _stages(block_n: int, block_k: int, dpad: int, major: int) -> int:
    """Pipeline depth: as many codebook tiles in flight as fit next to the resident z tile while two programs
    share an SM (one's epilogue then runs under the other's tensor-core work), else while one program fits."""
    smem = SMEM_BYTES.get(major, 1 << 30)
    tile, resident = 2 * block_k * dpad, 2 * block_n * dpad
    for budget in (smem // 2 - 2048, smem - 8 * 1024):
        for stages in (3, 2):
            if stages * tile + resident <= budget:
                return stages
    return 1


def search_plan(N: int, K: int, D: int, k: int, dtype: torch.dtype, perturb: bool, capability, config=None):
    """Every tile size and constexpr of one call. capability: (major, minor) of the GPU, (0, 0) for the
    interpreter. config: None / "heuristic", or a dict forcing BLOCK_N, BLOCK_K, num_warps, num_stages."""
    layout = plan_layout(D, dtype)
    kp = next_pow2(k)
    major = capability[0]
    if major >= 9 and layout.dpad <= SLOT_MODE_MAX_DPAD:
        # H100 / H200, small D (slot mode): two warpgroups, each a 64 x 64 wgmma of the 64 x 128 tile; 76 registers,
        # so three programs share an SM and hide the epilogue (the bound) behind each other's loads and MMAs.
        block_n, block_k, warps = 64, 128, 8
    elif major >= 9:
        # Wider D: one warpgroup, 64 x 64 tiles, so the running minima and the resident z tile leave room for two
        # programs per SM (large D is tensor-core bound, and the second program keeps the tensor cores fed).
        block_n, block_k, warps = 64, 64, 4
    elif major >= 8:  # A100: mma.sync, smaller tiles keep the running minima in registers
        block_n, block_k, warps = 64, 64, 4
    else:  # the interpreter: small tiles keep numpy's work per program short
        block_n, block_k, warps = 32, 32, 4
    block_k = min(block_k, max(16, next_pow2(K)))
    # R minima per slot must hold k values in total (R <= 4): wide k widens the tile and narrows the rows.
    block_k = max(block_k, min(kp // 4, 256))
    block_n = max(16, min(block_n, 64 * 128 // block_k))
    if config not in (None, "heuristic"):
        if not isinstance(config, dict):
            raise ValueError(f"config must be None, 'heuristic' or a dict, got {config!r}")
        unknown = set(config) - CONFIG_KEYS
        if unknown:
            raise ValueError(f"config has unknown keys {sorted(unknown)}; allowed: {sorted(CONFIG_KEYS)}")
        block_n = config.get("BLOCK_N", block_n)
        block_k = config.get("BLOCK_K", block_k)
        warps = config.get("num_warps", warps)
        for key, value in (("BLOCK_N", block_n), ("BLOCK_K", block_k)):
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"config[{key!r}] must be a power of two >= 16 (tl.dot's minimum), got {value!r}")
        block_k = max(block_k, kp // 4)  # at most 4 running minima per slot must hold k values
    # Two minima per slot: k = 1 needs the second to know the winner is alone; top-k gets a threshold near the
    # true k-th value (the k-th of 2 * BLOCK_K tracked values), so about k candidates reach the re-rank.
    # (Large D runs 64-wide tiles: there 2 * BLOCK_K >= k values is the register budget.)
    tracked = min(4, max(2, cdiv((2 if layout.dpad <= SLOT_MODE_MAX_DPAD else 1) * kp, block_k)))
    tracked = 4 if tracked == 3 else tracked
    # Slot mode (kernels/_scan.py): at small D a settled k = 1 row re-ranks its winning slot's K / BLOCK_K codes
    # exactly instead of paying a packed tile number and a second minimum per element.
    slot_mode = (k == 1 or perturb) and layout.dpad <= SLOT_MODE_MAX_DPAD
    if slot_mode and k == 1:
        tracked = 1
    stages = _stages(block_n, block_k, layout.dpad, major)
    if isinstance(config, dict):
        stages = config.get("num_stages", stages)
    num_tiles = cdiv(K, block_k)
    packed = pack_bits(num_tiles) if (k == 1 or perturb) and not slot_mode else 0
    cap = 64 if kp == 1 and not perturb else max(2 * kp, 64)
    width = max(kp, 32)  # re-rank chunk: about k candidates reach it, in 1-2 chunks
    # Re-rank rows per program: the [rows, WIDTH] int64 keys stay in registers on a GPU; the interpreter takes more
    # rows per program (numpy amortizes its per-program Python overhead over them).
    # With k > 1 the int64 keys and their sorting network share the registers: at most 512 candidates.
    block_r = max(1, min(16, (512 if kp > 1 else rerank_elements(D)) // width)) if major else 16
    return SearchPlan(layout, block_n, block_k, warps, stages, tracked, packed, num_tiles, kp, cap, width, block_r,
                      perturb, D, TRITON_DTYPE[dtype])


def _capability(device: torch.device):
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


def run_search(z, codebook, k: int, perturb: bool, config, out0, out1, randoms=(0, 0, 0, 1)):
    """Steps 1-4 for knn (perturb=False: out0 dist [N, k], out1 idx [N, k]) or perturbation (out0 idx [N],
    out1 idx_perturbed [N]; randoms = (seed, threshold, position_offset, topk))."""
    N, D = z.shape
    K = codebook.shape[0]
    plan = search_plan(N, K, D, k, z.dtype, perturb, _capability(z.device), config)
    z_aug, c_aug, err = prepare_operands(z, codebook, plan.layout, plan.block_n, plan.block_k)
    dev = z.device
    status = torch.empty(N, dtype=torch.int32, device=dev)
    thr = torch.empty(N, dtype=torch.float32, device=dev)
    rank = torch.zeros(N if perturb else 1, dtype=torch.int32, device=dev)
    buf = torch.empty(N, plan.cap, dtype=torch.int32, device=dev)
    count = torch.zeros(N, dtype=torch.int32, device=dev)
    scan_const, collect_const = plan.search_constexprs(upcast_dot=interpreted())
    launch = dict(num_warps=plan.num_warps, num_stages=plan.num_stages)
    seed, threshold, position_offset, topk = randoms
    grid = (cdiv(N, plan.block_n),)
    _scan_kernel[grid](z_aug, c_aug, err, status, thr, buf, rank, N, k, plan.num_tiles, plan.cap,
                       pack_rel(plan.pack_bits), seed, threshold, position_offset, topk, **scan_const, **launch)
    # Rows that pass 1 did not settle, listed first (no host sync: the count stays on the device).
    pending = status <= 0
    n_list = pending.sum(dtype=torch.int32).reshape(1)
    slot = torch.where(pending, torch.cumsum(pending, 0) - 1, N)
    rows = torch.zeros(N + 1, dtype=torch.int32, device=dev)
    rows.scatter_(0, slot, torch.arange(N, dtype=torch.int32, device=dev))
    _collect_kernel[grid](z_aug, c_aug, thr, rows, n_list, buf, count, plan.num_tiles, **collect_const, **launch)
    # The re-rank reads code rows at stride D (a codebook slice is copied: K x D, small next to the search).
    codebook = codebook.contiguous()
    common = (z, codebook, buf, count, status, rows, n_list, rank, out0, out1, N, K, k, z.stride(0), plan.cap)
    # enable_fp_fusion=False: the difference form must not become fused multiply-adds (the contract).
    for const in plan.rerank_constexprs(offsets_32=K * D < 2**31):
        _rerank_kernel[(cdiv(N, const["BLOCK_R"]),)](*common, **const, num_warps=RERANK_WARPS, enable_fp_fusion=False)
    return plan


def knn_codes_triton(z: torch.Tensor, codebook: torch.Tensor, k: int, config=None):
    """The k nearest codes of each row of z, exact and sorted: (dist fp32 [N, k], idx int64 [N, k]).

    config: None or "heuristic" (per-GPU table), or a dict forcing BLOCK_N, BLOCK_K, num_warps, num_stages of
    the two scan passes (tests use it to make every shape span several partial tiles)."""
    z, codebook = check_inputs(z, codebook, k)
    N = z.shape[0]
    dist = torch.empty(N, k, dtype=torch.float32, device=z.device)
    idx = torch.empty(N, k, dtype=torch.int64, device=z.device)
    if N > 0:
        run_search(z, codebook, k, False, config, dist, idx)
    return dist, idx
