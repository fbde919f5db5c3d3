"""Floor model for the nearest-code kernels: the least time a GPU needs for an N x K code search.

API (everything takes microseconds out, plain ints/strings in; `gpu` is a key of GPUS or a GPU):
  GPUS                                      {"h100-sxm": GPU, "h200": GPU, "a100-sxm": GPU}
  tensor_core_us(n, K, D, dtype, gpu, path="wgmma", d_aug=None)
        2 * n * K * D' flops over the matrix rate of the dtype's search path (D' = d_aug; default: the dtype's
        operand copies x D rounded up to 16, the K step of a bf16 MMA instruction).
        path: "wgmma" (Hopper warpgroup MMA, the datasheet rate), "hmma" (mma.sync: HMMA_FRACTION of it),
        "none" (no tensor cores: the FMAs are then SASS instructions and belong to epilogue_us; returns 0).
  epilogue_us(n, K, instr_per_elem, gpu)    n * K * instr / (SMs * lanes * clock): issue slots of the SASS
        instructions spent per (row, code) element; lanes = 128 thread-instructions per SM per clock on Ampere
        and Hopper (4 schedulers x 1 warp-instruction x 32 threads).
  bytes_us(n, K, D, k, dtype, gpu)          each input read once (z, codebook) and each output written once
        (k fp32 distances + k int64 indices per row), over HBM bandwidth.
  floor_us(n, K, D, k, dtype, gpu, instr_per_elem=None, d_aug=None) -> dict
        {"tensor_core_us", "epilogue_us", "bytes_us", "floor_us", "bound"}: the floor is the LARGEST term (the
        units run concurrently in a perfect kernel); bound names it. instr_per_elem defaults to the least any
        exact-search kernel needs (MIN_INSTR_PER_ELEM: one compare/min per element for k=1, two for k>1).
  estimate_us(n, K, D, k, dtype, gpu, instr_per_elem, path, overlap, d_aug=None, extra_us=0.0) -> float
        a kernel's estimated time from its measured instruction count: max of the terms when the tensor cores and
        the ALUs overlap (>= 2 programs resident per SM, so one's epilogue hides another's MMA), their sum when
        they cannot; plus extra_us (e.g. a second pass or a re-rank kernel estimated separately).
  search_dtype_path(dtype) -> (matrix dtype, operand copies): how our kernels feed the tensor cores per input
        dtype (bf16 directly; fp32 and fp16 as three bf16 terms hi*hi + lo*hi + hi*lo, see kernels/_search.py).

Sources of the constants (datasheet numbers are upper bounds; METHOD.md: measure the ceilings on the device):
  H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet and Hopper architecture whitepaper (2022): 132 SMs, 128 FP32
    lanes per SM, 4 tensor cores per SM, dense BF16 989.4 TFLOPS and TF32 494.7 TFLOPS (quoted at the 1.83 GHz
    tensor clock: 132 SM * 4096 flop/clk * 1.83e9), FP32 66.9 TFLOPS (at the 1.98 GHz max boost: 132 * 128 * 2 *
    1.98e9), HBM3 3.35 TB/s. Cross-checked with glennklockwood.com/garden/processors/h100.
  H200 SXM: same GH100 die, clocks and SM count as H100 SXM5 (NVIDIA H200 datasheet: BF16 989 TFLOPS dense,
    FP32 67 TFLOPS), 141 GB HBM3e at 4.8 TB/s.
  A100 SXM4 80GB: NVIDIA A100 datasheet / Ampere whitepaper: 108 SMs, 1.41 GHz boost, BF16 312 TFLOPS dense,
    TF32 156, FP32 19.5, HBM2e 2.039 TB/s. Used for the sm_80 rows of the kernel report.
  HMMA_FRACTION: Hopper runs the Ampere-style mma.sync (SASS HMMA) at well under the wgmma rate; 0.5 is our
    assumption (not measured here), stated so the estimate can be re-derived when a device measures it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Issue slots per SM per clock in thread-instructions: 4 warp schedulers x 1 instruction x 32 lanes (sm_80, sm_90).
LANES_PER_SM = 128
HMMA_FRACTION = 0.5
# A bf16 MMA (HMMA / HGMMA) consumes the reduction dim in steps of 16: D = 8 costs what D = 16 does.
MMA_K_STEP = 16
# Fewest SASS instructions per (row, code) element an exact search can spend after the dot: k = 1 keeps one
# running min (FMNMX); k > 1 compares against the row threshold and keeps or drops (FSETP + a select / vote).
MIN_INSTR_PER_ELEM = {1: 1.0, "k>1": 2.0}


@dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    boost_clock_ghz: float  # max boost: the FP32 / ALU issue rate
    tensor_clock_ghz: float  # the clock the tensor-core datasheet rates are quoted at
    bf16_tc_tflops: float  # dense, fp32 accumulate
    tf32_tc_tflops: float  # dense
    fp32_fma_tflops: float  # CUDA cores, 2 flops per FMA
    hbm_tb_s: float
    arch: int  # compute capability as 90, 80

    def issue_rate(self) -> float:
        """Thread-instructions per second over the whole chip."""
        return self.sms * LANES_PER_SM * self.boost_clock_ghz * 1e9


GPUS = {
    "h100-sxm": GPU("NVIDIA H100 SXM5 80GB", 132, 1.98, 1.83, 989.4, 494.7, 66.9, 3.35, 90),
    "h200": GPU("NVIDIA H200 SXM 141GB", 132, 1.98, 1.83, 989.4, 494.7, 66.9, 4.8, 90),
    "a100-sxm": GPU("NVIDIA A100 SXM4 80GB", 108, 1.41, 1.41, 312.0, 156.0, 19.5, 2.039, 80),
}

_ELEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _gpu(gpu) -> GPU:
    if isinstance(gpu, GPU):
        return gpu
    if gpu not in GPUS:
        raise ValueError(f"gpu must be one of {sorted(GPUS)} or a GPU, got {gpu!r}")
    return GPUS[gpu]


def _dtype_name(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in _ELEM_BYTES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return name


def search_dtype_path(dtype) -> tuple[str, int]:
    """(matrix dtype, operand copies) of our tensor-core search for an input dtype.

    bf16 inputs are multiplied as they are. fp32 and fp16 inputs are split into bf16 hi + lo parts and multiplied
    as three bf16 terms (hi*hi + lo*hi + hi*lo): 3x the MMA work of bf16 at 2x the TF32 rate.
    """
    return ("bfloat16", 1) if _dtype_name(dtype) == "bfloat16" else ("bfloat16", 3)


def tensor_core_us(n: int, K: int, D: int, dtype, gpu, path: str = "wgmma", d_aug: int | None = None) -> float:
    g = _gpu(gpu)
    if path == "none":
        return 0.0
    if path not in ("wgmma", "hmma"):
        raise ValueError(f"path must be 'wgmma', 'hmma' or 'none', got {path!r}")
    _, copies = search_dtype_path(dtype)
    depth = d_aug if d_aug is not None else -(-copies * D // MMA_K_STEP) * MMA_K_STEP
    rate = g.bf16_tc_tflops * 1e12 * (1.0 if path == "wgmma" else HMMA_FRACTION)
    return 2.0 * n * K * depth / rate * 1e6


def epilogue_us(n: int, K: int, instr_per_elem: float, gpu) -> float:
    return n * K * float(instr_per_elem) / _gpu(gpu).issue_rate() * 1e6


def bytes_us(n: int, K: int, D: int, k: int, dtype, gpu) -> float:
    elem = _ELEM_BYTES[_dtype_name(dtype)]
    total = (n + K) * D * elem + n * k * (4 + 8)
    return total / (_gpu(gpu).hbm_tb_s * 1e12) * 1e6


def floor_us(n: int, K: int, D: int, k: int, dtype, gpu, instr_per_elem: float | None = None,
             d_aug: int | None = None) -> dict:
    if instr_per_elem is None:
        instr_per_elem = MIN_INSTR_PER_ELEM[1] if k == 1 else MIN_INSTR_PER_ELEM["k>1"]
    terms = {
        "tensor_core_us": tensor_core_us(n, K, D, dtype, gpu, "wgmma", d_aug),
        "epilogue_us": epilogue_us(n, K, instr_per_elem, gpu),
        "bytes_us": bytes_us(n, K, D, k, dtype, gpu),
    }
    bound = max(terms, key=terms.get)
    return {**terms, "floor_us": terms[bound], "bound": bound.replace("_us", "")}


def estimate_us(n: int, K: int, D: int, k: int, dtype, gpu, instr_per_elem: float, path: str, overlap: bool,
                d_aug: int | None = None, extra_us: float = 0.0) -> float:
    tc = tensor_core_us(n, K, D, dtype, gpu, path, d_aug)
    ep = epilogue_us(n, K, instr_per_elem, gpu)
    by = bytes_us(n, K, D, k, dtype, gpu)
    return (max(tc, ep, by) if overlap else max(tc + ep, by)) + extra_us


if __name__ == "__main__":
    for key in GPUS:
        for D in (8, 256):
            for k in (1, 100):
                f = floor_us(65536, 16384, D, k, "bfloat16", key)
                print(f"{key:9s} D={D:3d} k={k:3d}: " + ", ".join(f"{t}={v:.1f}" if isinstance(v, float) else
                                                           f"{t}={v}" for t, v in f.items()))
