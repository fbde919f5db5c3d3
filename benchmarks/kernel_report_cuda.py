"""Static report of the CUDA kernels (csrc/*.cu) for sm_90 and sm_80, in benchmarks/kernel_report.py's row schema.

  python benchmarks/kernel_report_cuda.py [--so PATH] [--json PATH]
  from kernel_report_cuda import cuda_rows; cuda_rows() -> list[dict]   (kernel_report.py merges these rows)

Where the machine code comes from: the fatbin of the built extension tokpost_fast/_C*.so (setup.py compiles every
.cu for TOKPOST_CUDA_ARCHS, default 80;90), read with cuobjdump (/usr/local/cuda/bin, else the one in the triton
wheel). An extension built without CUDA gives rows with compiled=False and the reason; no GPU is needed.

Rows: one "kernel" row per (arch, kernel, dtype) with registers, stack / local bytes, LDL/STL count (spills),
static shared bytes, tensor-core and async-copy instructions (none: these are CUDA-core kernels); and one "op" row
per nearest-code variant (the issue's N = 65536, K = 16384; k in {1, 8, 100, 1024}, perturbation at topk 100;
D in {1, 8, 33, 64, 256}) with the estimate against the floor (benchmarks/floor_model.py):

  instr_per_element = D * (c_d + c_load) + c_cand + rank
    c_d      SASS instructions per (dimension, code) in the unrolled d loop: its body over its FMULs (one FMUL per
             (d, code): the difference form is FADD, FMUL, FADD plus the shared-memory load)
    c_load   staging the codebook tile in shared memory: the load loop's body per STS, times the 1/8 of a tile
             element each lane's (dimension, code) pays (128 codes x 64 dims per block of 8 rows, 256 threads)
    c_cand   the code-tile loop outside the stage loop and its nested loops (candidate keys, ballot appends; the
             k = 1 and k > 1 paths are both counted, so an upper bound), per code of a lane
    rank     k > 1 only: the warp ranks its buffer (cap = 2k + 128 keys) R times, cap^2 * c_rank instructions each,
             spread over K codes; R = 2 + k ln(K / cap) / (k + 128) (the first fill, the refills that random data
             causes as the k-th best improves, the final ranking); c_rank from the ranking loop's SASS
  estimate_us = floor_model.estimate_us(..., instr_per_elem, path="none"): no tensor cores, so the epilogue term
             N * K * instr / (SMs * 128 * clock) is the time; floor_us = floor_model.floor_us(...) (the tensor-core
             / minimal-epilogue / bytes floor of any exact search); ratio = estimate / floor.
sm_90 rows use the H100 SXM constants, sm_80 rows the A100's. Nothing here has run on a GPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
N_TOKENS, K_CODES = 65536, 16384
ARCHS = {90: "h100-sxm", 80: "a100-sxm"}
OPS = [("nearest_codes", 1), ("nearest_codes", 8), ("nearest_codes", 100), ("nearest_codes", 1024),
       ("perturb_codes", 100)]
DIMS = [1, 8, 33, 64, 256]
# csrc/knn_cuda.cuh
CODES_PER_LANE, TILE_CODES, DIM_CHUNK, WARPS = 4, 128, 64, 8
_DTYPES = {"f": "float32", "N3c104HalfE": "float16", "N3c108BFloat16E": "bfloat16"}
_KERNEL = re.compile(r"(knn_exact_kernel|lookup_kernel|chunk_sum_kernel|combine_chunks_kernel)I(f|N3c104HalfE|N3c108BFloat16E)(?:Lb([01]))?")


def _tool(name: str) -> str | None:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for path in (os.path.join(cuda_home, "bin", name), shutil.which(name)):
        if path and os.path.exists(path):
            return path
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        return path if os.path.exists(path) else None
    except ImportError:
        return None


def _toolchain() -> str:
    nvcc = _tool("nvcc")
    if nvcc is None:
        return "nvcc (not found)"
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return f"nvcc {m.group(2)}" if m else "nvcc"


def find_extension() -> str | None:
    hits = sorted(glob.glob(os.path.join(ROOT, "tokpost_fast", "_C*.so")))
    return hits[0] if hits else None


def _functions(sass: str) -> dict:
    """{mangled name: its SASS text} of one cubin's `cuobjdump -sass` output."""
    parts = re.split(r"\n\s*Function : (\S+)\n", sass)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _knn_costs(stats) -> dict:
    """c_d, c_load, c_cand, c_rank of the knn kernel from its loops (see the module docstring)."""
    def ops(r):
        return stats.opcodes(*r)

    def inside(inner, outer):
        return outer[0] <= inner[0] and inner[1] <= outer[1] and inner != outer

    def innermost(loops):
        return [r for r in loops if not any(inside(o, r) for o in loops)]

    # The unrolled d loop (nvcc also emits a shorter remainder loop): the innermost FMUL loop with the most FMULs.
    d_loop = max(innermost([r for r in stats.loops if "FMUL" in ops(r)]), key=lambda r: ops(r)["FMUL"])
    c_d = stats.count(*d_loop) / ops(d_loop)["FMUL"]
    stores = innermost([r for r in stats.loops if "STS" in ops(r) and "FMUL" not in ops(r)])
    load = max(stores, key=lambda r: ops(r)["STS"]) if stores else None
    c_load = stats.count(*load) / ops(load)["STS"] * TILE_CODES / (WARPS * 32 * CODES_PER_LANE) if load else 0.0
    stage = min((r for r in stats.loops if inside(d_loop, r)), key=lambda r: r[1] - r[0])
    tiles = [r for r in stats.loops if inside(stage, r)]
    c_cand = None
    if tiles:
        tile = min(tiles, key=lambda r: r[1] - r[0])
        nested = [r for r in stats.loops if inside(r, tile) and not inside(r, stage) and r != stage]
        outermost = [r for r in nested if not any(inside(r, o) for o in nested)]
        c_cand = (stats.count(*tile) - stats.count(*stage) - sum(stats.count(*r) for r in outermost)) / CODES_PER_LANE
    # The warp ranking: innermost loops without FMUL whose body loads 64-bit keys; instructions per key compared.
    ranks = [r for r in innermost([r for r in stats.loops if "FMUL" not in ops(r)])
             if any(" LDG.E.64" in " " + t for a, t in stats.instructions if r[0] <= a <= r[1])]
    per_key = [stats.count(*r) / sum(" LDG.E.64" in " " + t for a, t in stats.instructions if r[0] <= a <= r[1])
               for r in ranks]
    return dict(c_d=round(c_d, 3), c_load=round(c_load, 3), c_cand=round(c_cand, 2) if c_cand is not None else None,
                c_rank=round(min(per_key), 2) if per_key else None, d_loop_instructions=stats.count(*d_loop))


def instr_per_element(costs: dict, D: int, k: int) -> float:
    instr = D * (costs["c_d"] + costs["c_load"]) + (costs["c_cand"] or 0.0)
    if k > 1 and costs["c_rank"]:
        cap = 2 * k + TILE_CODES
        passes = 2 + k * max(0.0, math.log(K_CODES / cap)) / (k + TILE_CODES)
        instr += passes * cap * cap * costs["c_rank"] / K_CODES
    return instr


def cuda_rows(so_path: str | None = None) -> list:
    sys.path.insert(0, HERE)
    import floor_model
    import sass_stats

    toolchain = _toolchain()
    so_path = so_path or find_extension()
    cuobjdump = _tool("cuobjdump")
    base = dict(backend="cuda", toolchain=toolchain)
    if so_path is None or cuobjdump is None:
        reason = "tokpost_fast._C is not built" if so_path is None else "cuobjdump not found"
        return [dict(base, kind="op", kernel=op, variant=f"k={k}", arch=f"sm_{a}", compiled=False, error=reason)
                for a in ARCHS for op, k in OPS]
    tmp = tempfile.mkdtemp(prefix="kernel-report-cuda-")
    subprocess.run([cuobjdump, "-xelf", "all", so_path], cwd=tmp, capture_output=True, text=True)
    cubins = sorted(glob.glob(os.path.join(tmp, "*.cubin")))
    if not cubins:
        return [dict(base, kind="op", kernel=op, variant=f"k={k}", arch=f"sm_{a}", compiled=False,
                     error=f"{os.path.basename(so_path)} holds no CUDA machine code (built without nvcc or with "
                           "TOKPOST_SKIP_CUDA_BUILD=1)") for a in ARCHS for op, k in OPS]
    rows, knn = [], {}
    for cubin in cubins:
        arch = int(re.search(r"sm_(\d+)", cubin).group(1))
        sass = sass_stats.sass_text(cubin, cuobjdump)
        usage = sass_stats.resource_usage_by_function(cubin, cuobjdump)
        for name, text in _functions(sass).items():
            m = _KERNEL.search(name)
            if not m:
                continue
            kernel, dtype = m.group(1), _DTYPES[m.group(2)]
            if kernel == "knn_exact_kernel":
                kernel = "perturb_codes.exact" if m.group(3) == "1" else "nearest_codes.exact"
            else:
                kernel = f"codebook_lookup.{kernel.replace('_kernel', '')}"
            stats = sass_stats.analyze(text)
            use = usage.get(name, {})
            row = dict(base, kind="kernel", kernel=kernel, variant=dtype, dtype=dtype, arch=f"sm_{arch}",
                       compiled=True, error=None, n_regs=use.get("reg"), stack_bytes=use.get("stack"),
                       local_bytes=use.get("local"), n_spills=stats.local_memory_ops, shared_bytes=use.get("shared"),
                       tensor_core=stats.tensor_core, async_copy=stats.async_copy,
                       sass_instructions=len(stats.instructions), threads=WARPS * 32)
            if kernel.endswith(".exact"):
                costs = _knn_costs(stats)
                row.update(costs, hot_loop_instructions=costs["d_loop_instructions"],
                           sass_instr_per_element=round(costs["c_d"], 3),
                           note="sass_instr_per_element: per (dimension, code); see instr_per_element on op rows")
                knn[(arch, kernel.split(".")[0], dtype)] = (row, costs)
            rows.append(row)
    for (arch, op, dtype), (krow, costs) in sorted(knn.items()):
        gpu = ARCHS.get(arch)
        if gpu is None:
            continue
        for op_name, k in OPS:
            if op_name != op:
                continue
            for D in DIMS:
                instr = instr_per_element(costs, D, k)
                floor = floor_model.floor_us(N_TOKENS, K_CODES, D, k, dtype, gpu)
                est = floor_model.estimate_us(N_TOKENS, K_CODES, D, k, dtype, gpu, instr, "none", overlap=True)
                row = dict(base, kind="op", kernel=op, op=op, k=k, dtype=dtype, D=D, arch=f"sm_{arch}",
                           variant=f"k={k} {dtype} D={D}", compiled=True, error=None, n_regs=krow["n_regs"],
                           n_spills=krow["n_spills"], shared_bytes=krow["shared_bytes"], tensor_core=None,
                           async_copy=None, instr_per_element=round(instr, 2),
                           sass_instr_per_element=round(instr, 2), estimate_us=round(est, 1),
                           floor_us=round(floor["floor_us"], 2), floor_bound=floor["bound"],
                           ratio=round(est / floor["floor_us"], 1))
                if arch == 90:
                    row["floor_us_h200"] = round(floor_model.floor_us(N_TOKENS, K_CODES, D, k, dtype, "h200")["floor_us"], 2)
                rows.append(row)
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--so", help="extension to inspect (default tokpost_fast/_C*.so)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = cuda_rows(args.so)
    for r in rows:
        if r["kind"] == "kernel":
            print(f"{r['arch']} {r['kernel']:32s} {r['variant']:9s} regs {r['n_regs']:>3} spills {r['n_spills']} "
                  f"stack {r['stack_bytes']} shared {r['shared_bytes']:>6} " +
                  (f"c_d {r['c_d']} c_load {r['c_load']} c_cand {r['c_cand']} c_rank {r['c_rank']}" if "c_d" in r else ""))
        elif r.get("compiled") and r["dtype"] in ("bfloat16", "float32") and r["D"] in (8, 256):
            print(f"{r['arch']} {r['op']:13s} {r['variant']:24s} {r['instr_per_element']:8.1f} instr/elem "
                  f"{r['estimate_us']:10.1f} us  floor {r['floor_us']:8.1f} ({r['floor_bound']})  x{r['ratio']}")
        elif not r.get("compiled"):
            print(f"{r['arch']} {r['kernel']} {r['variant']}: not compiled: {r['error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
