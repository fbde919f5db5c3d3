"""Static kernel report: compile every Triton kernel variant the dispatcher can pick, for sm_90 and sm_80, with each
Triton version, and estimate its time against the floor from the SASS alone (no GPU needed).

  python benchmarks/kernel_report.py [--quick] [--triton-dir .triton36] [--archs 90 80] [--out PATH]

Variants: nearest codes k in {1, 8, 100, 1024} and perturbation (topk 100), fp32 / fp16 / bf16, D in {1, 8, 33,
64, 256}, planned for N = 65536 tokens and K = 16384 codes (the issue's shape) by kernels/nearest_codes.search_plan;
kernels/_specs.kernel_specs lists the kernels each plan launches (scan, collect, re-rank). --quick: k in {1, 100}
and perturbation, bf16 and fp32, D in {8, 256}. Each --triton-dir (a `pip install --target DIR triton==X` folder,
e.g. the `.triton36` that `make setup` installs) compiles in a separate process with DIR first on sys.path,
alongside the main one.
Rows of benchmarks/kernel_report_cuda.py's cuda_rows() are merged in when that module exists.

Per kernel row: compiled / error, registers, stack bytes, LDL/STL count (spills), shared bytes, the hot loop's SASS
instructions per (row, code) element (all paths, and the fast path that skips a uniform `if`), tensor-core and
async-copy instructions, and an estimate. Per op row (kind "op"): the sum of its kernels' estimates and the floor.

The estimate model (benchmarks/floor_model.py has the constants and their sources):
  scan / collect  floor_model.estimate_us(N, K, D, k, dtype, gpu, instr_per_elem, path, overlap, d_aug=DPAD):
                  tensor-core term at the wgmma (HGMMA) or mma.sync (HMMA, HMMA_FRACTION of it) rate, epilogue term
                  N*K*instr/(SMs*128*clock), bytes term; max of them when >= 2 programs fit on an SM (one's
                  epilogue hides another's MMA), their sum otherwise. Plus the code outside the hot loop, run once
                  per program. collect runs for a fraction of the rows: all of them for k > 1 and for perturbation
                  (at rate 1, the worst case), AMBIGUOUS_ROWS of them for k = 1 (an assumption: rows whose runner-up
                  lies within the search bound; on random data a few percent), on the fast path there.
  re-rank         every SASS instruction times its loop trips (the unrolled d loop runs D // 8 times, the
                  candidate-chunk loop once: no overflow), times threads and programs, over the issue rate; the
                  general launch covers the collect rows.
  floor           floor_model.floor_us(N, K, D, k, dtype, gpu): the largest of the three terms at the fewest
                  instructions any exact search needs (1 per element for k = 1, 2 for k > 1).
sm_90 rows use the H100 SXM constants (the H200 floor is given beside), sm_80 rows the A100's.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
N_TOKENS, K_CODES = 65536, 16384
AMBIGUOUS_ROWS = 0.03
FULL = dict(ops=[("nearest_codes", 1), ("nearest_codes", 8), ("nearest_codes", 100), ("nearest_codes", 1024),
                 ("perturb_codes", 100)], dtypes=["float32", "float16", "bfloat16"], dims=[1, 8, 33, 64, 256])
QUICK = dict(ops=[("nearest_codes", 1), ("nearest_codes", 100), ("perturb_codes", 100)],
             dtypes=["bfloat16", "float32"], dims=[8, 256])
GPU_FOR_ARCH = {90: "h100-sxm", 80: "a100-sxm"}
MAX_REGS_PER_SM, SMEM_PER_SM = 65536, {90: 228 * 1024, 80: 164 * 1024}


def variants(quick: bool, only=None) -> list:
    grid = QUICK if quick else FULL
    out = [(op, k, dt, D) for op, k in grid["ops"] for dt in grid["dtypes"] for D in grid["dims"]]
    return [v for v in out if only is None or v in only]


def programs_per_sm(regs: int, threads: int, shared: int, arch: int) -> int:
    by_regs = MAX_REGS_PER_SM // max(regs * threads, 1)
    by_smem = SMEM_PER_SM[arch] // max(shared, 1)
    return max(0, min(by_regs, by_smem, 32))


# ---------------------------------------------------------------------------------------------------------------
# Worker: compile with whatever triton this process imports
# ---------------------------------------------------------------------------------------------------------------


def compile_rows(archs: list, quick: bool, only=None) -> list:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, HERE)
    import floor_model
    import sass_stats
    from tokpost_fast.kernels._specs import attrs_for, kernel_specs
    from tokpost_fast.kernels.nearest_codes import search_plan

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    toolchain = f"triton {triton.__version__}"
    cache: dict = {}
    rows = []
    tmp = tempfile.mkdtemp(prefix="kernel-report-")
    for arch in archs:
        gpu = GPU_FOR_ARCH[arch]
        for op, k, dtype_name, D in variants(quick, only):
            dtype = getattr(torch, dtype_name)
            perturb = op == "perturb_codes"
            plan = search_plan(N_TOKENS, K_CODES, D, k, dtype, perturb, (arch // 10, arch % 10))
            floor = floor_model.floor_us(N_TOKENS, K_CODES, D, k, dtype_name, gpu)
            op_row = dict(kind="op", kernel=op, backend="triton", variant=f"k={k} {dtype_name} D={D}", op=op, k=k,
                          dtype=dtype_name, D=D, arch=f"sm_{arch}", toolchain=toolchain, compiled=True, error=None,
                          floor_us=floor["floor_us"], floor_bound=floor["bound"], estimate_us=0.0,
                          instr_per_element=0.0, d_aug=plan.layout.dpad)
            if arch == 90:
                op_row["floor_us_h200"] = floor_model.floor_us(N_TOKENS, K_CODES, D, k, dtype_name, "h200")["floor_us"]
            for spec in kernel_specs(plan, k, D):
                key = (arch, spec.fn.__name__, tuple(sorted(spec.constexprs.items())), spec.num_warps,
                       spec.num_stages)
                if key not in cache:
                    cache[key] = _compile_one(spec, attrs_for(spec), arch, ASTSource, GPUTarget, triton, cuobjdump,
                                              sass_stats, tmp)
                row = dict(cache[key])
                row.update(kind="kernel", kernel=f"{op}.{spec.name}", backend="triton",
                           variant=op_row["variant"], op=op, k=k, dtype=dtype_name, D=D, arch=f"sm_{arch}",
                           toolchain=toolchain, num_warps=spec.num_warps, num_stages=spec.num_stages,
                           constexprs={n: v for n, v in spec.constexprs.items()})
                if row["compiled"]:
                    _estimate(row, spec, plan, gpu, arch, k, dtype_name, D, floor_model)
                    op_row["estimate_us"] += row["estimate_us"] * row["row_fraction"]
                    if spec.name in ("scan", "collect"):
                        op_row["instr_per_element"] += row["instr_per_element_used"] * row["row_fraction"]
                else:
                    op_row["compiled"], op_row["error"] = False, f"{spec.name}: {row['error']}"
                row.pop("_stats", None)
                rows.append(row)
            op_row["ratio"] = op_row["estimate_us"] / op_row["floor_us"] if op_row["compiled"] else None
            rows.append(op_row)
    for row in rows:
        row.pop("_stats", None)
    return rows


def _compile_one(spec, attrs, arch, ASTSource, GPUTarget, triton, cuobjdump, sass_stats, tmp) -> dict:
    started = time.perf_counter()
    try:
        src = ASTSource(spec.fn, spec.signature, spec.constexprs, attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages, **spec.options))
    except Exception as err:  # the report records a failed variant instead of stopping
        return dict(compiled=False, error=f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}")
    path = os.path.join(tmp, f"{spec.fn.__name__}-{abs(hash(str(spec.constexprs)))}-{arch}.cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    usage = sass_stats.resource_usage(path, cuobjdump)
    stats = sass_stats.analyze(sass_stats.sass_text(path, cuobjdump))
    return dict(compiled=True, error=None, compile_s=round(time.perf_counter() - started, 2),
                n_regs=usage.get("reg"), stack_bytes=usage.get("stack"), local_bytes=usage.get("local"),
                n_spills=stats.local_memory_ops, shared_bytes=int(compiled.metadata.shared),
                tensor_core=stats.tensor_core, async_copy=stats.async_copy, sass_instructions=len(stats.instructions),
                hot_loop_instructions=stats.hot_count(), _stats=stats)


def _estimate(row, spec, plan, gpu, arch, k, dtype_name, D, floor_model) -> None:
    stats = row["_stats"]
    threads = 32 * spec.num_warps
    issue = floor_model.GPUS[gpu].issue_rate()
    if spec.name in ("scan", "collect"):
        lo, hi = stats.hot
        inner = [(a, b) for a, b in stats.loops if lo <= a and b <= hi and (a, b) != (lo, hi)]
        extra = sum(stats.count(a, b) for a, b in inner) * max(spec.inner_trips - 1, 0)
        full = (stats.hot_count() + extra) * threads / spec.elems_per_iter
        fast = (stats.hot_fast_path_count() + extra) * threads / spec.elems_per_iter
        rare_hits = spec.name == "collect" and k == 1 and not plan.perturb
        used = fast if rare_hits else full
        fraction = AMBIGUOUS_ROWS if rare_hits else 1.0
        path = {"HGMMA": "wgmma", "HMMA": "hmma"}.get(stats.tensor_core, "none")
        overlap = programs_per_sm(row["n_regs"], threads, row["shared_bytes"], arch) >= 2
        programs = -(-N_TOKENS // plan.block_n)
        outside = (len(stats.instructions) - stats.hot_count()) * threads * programs / issue * 1e6
        est = floor_model.estimate_us(N_TOKENS, K_CODES, D, k, dtype_name, gpu, used, path, overlap,
                                      d_aug=plan.layout.dpad) + outside
        row.update(sass_instr_per_element=round(full, 3), fast_path_instr_per_element=round(fast, 3),
                   instr_per_element_used=used, overlap=overlap, row_fraction=fraction)
    else:
        # Loops innermost first: the unrolled d loop (D // 8 trips when it stays a loop), then the chunk loop.
        trips = [D // 8 if D >= 16 else 1] + [1] * (len(stats.loops) - 1)
        per_thread = stats.executed(trips)
        programs = -(-N_TOKENS // spec.constexprs["BLOCK_R"])
        est = per_thread * threads * programs / issue * 1e6
        fraction = 1.0 if spec.name == "rerank_direct" or k > 1 or plan.perturb else AMBIGUOUS_ROWS
        row.update(sass_instr_per_element=None, instr_per_thread=round(per_thread, 1), row_fraction=fraction)
    row.update(estimate_us=round(est, 2))
    row["hot_loop_opcodes"] = dict(list(stats.opcodes(*stats.hot).items())[:12]) if stats.hot else None


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def parse_variant(text: str) -> tuple:
    op, k, dtype, D = text.split(":")
    return op, int(k), dtype, int(D)


def start_worker(triton_dir, archs: list, quick: bool, only=None):
    """compile_rows in a separate process: with the triton in triton_dir first on sys.path (another version), or
    with ours (None). Never under TRITON_INTERPRET=1, which turns every kernel into Python (tests set it).
    Returns a handle for finish_worker; workers run while the caller compiles its own rows."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", out, "--archs", *map(str, archs)]
    cmd += (["--triton-dir", triton_dir] if triton_dir else []) + (["--quick"] if quick else [])
    if only:
        cmd += ["--variants", *(":".join(map(str, v)) for v in only)]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    err = tempfile.TemporaryFile(mode="w+")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env), out, err, triton_dir


def finish_worker(handle) -> list:
    proc, out, err, triton_dir = handle
    if proc.wait() != 0:
        err.seek(0)
        raise RuntimeError(f"worker for {triton_dir} failed:\n{err.read()[-3000:]}")
    with open(out) as f:
        return json.load(f)


def run_worker(triton_dir, archs: list, quick: bool, only=None) -> list:
    return finish_worker(start_worker(triton_dir, archs, quick, only))


def cuda_rows() -> list:
    path = os.path.join(HERE, "kernel_report_cuda.py")
    if not os.path.exists(path):
        return []
    spec = importlib.util.spec_from_file_location("kernel_report_cuda", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.cuda_rows())


def summary(rows: list) -> list:
    lines = []
    for row in rows:
        if row.get("kind") != "op" or row.get("backend") != "triton":
            continue
        status = f"{row['estimate_us']:9.1f} us  floor {row['floor_us']:8.1f} ({row['floor_bound']:<11s}) " \
                 f"x{row['ratio']:.2f}  {row['instr_per_element']:.2f} instr/elem" if row["compiled"] else \
                 f"FAILED {row['error']}"
        lines.append(f"{row['toolchain']:13s} {row['arch']} {row['op']:13s} {row['variant']:22s} {status}")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="k in {1, 100} + perturbation, bf16/fp32, D in {8, 256}")
    parser.add_argument("--triton-dir", action="append", default=[],
                        help="also compile with the triton installed in DIR (pip install --target DIR triton==X)")
    parser.add_argument("--archs", nargs="+", type=int, default=[90, 80], choices=sorted(GPU_FOR_ARCH))
    parser.add_argument("--out", help="output JSON (default benchmarks/results/kernel-report-<machine>-<date>.json)")
    parser.add_argument("--variants", nargs="+", type=parse_variant, metavar="OP:K:DTYPE:D",
                        help="only these variants of the grid, e.g. nearest_codes:1:bfloat16:8")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        with open(args.worker, "w") as f:
            json.dump(compile_rows(args.archs, args.quick, args.variants), f)
        return
    started = time.time()
    import triton

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the report compiles the kernels for real GPUs")
    workers = [start_worker(os.path.abspath(d), args.archs, args.quick, args.variants) for d in args.triton_dir]
    rows = compile_rows(args.archs, args.quick, args.variants)
    for handle in workers:
        rows += finish_worker(handle)
    rows += cuda_rows()
    sys.path.insert(0, HERE)
    import floor_model

    machine = f"cpu-{os.cpu_count()}core"
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(HERE, "results", f"kernel-report-{machine}-{date}.json")
    report = dict(command="python benchmarks/kernel_report.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  machine=dict(slug=machine, platform=platform.platform(), python=platform.python_version()),
                  date=date, wall_s=round(time.time() - started, 1), shape=dict(N=N_TOKENS, K=K_CODES),
                  toolchains=sorted({r.get("toolchain") for r in rows if r.get("toolchain")}),
                  model=__doc__[__doc__.index("The estimate model"):].strip(),
                  constants={name: vars(gpu) for name, gpu in floor_model.GPUS.items()},
                  assumptions=dict(ambiguous_rows=AMBIGUOUS_ROWS, hmma_fraction=floor_model.HMMA_FRACTION,
                                   lanes_per_sm=floor_model.LANES_PER_SM),
                  note="Static estimates from SASS instruction counts: no kernel here has run on a GPU.",
                  rows=rows)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:  # one row per line: 1500 rows stay readable and diffable
        head = json.dumps({key: value for key, value in report.items() if key != "rows"}, indent=1, default=str)
        f.write(head[:-2] + ',\n "rows": [\n')
        f.write(",\n".join(json.dumps(row, default=str) for row in rows) + "\n ]\n}\n")
    print("\n".join(summary(rows)))
    failed = [r for r in rows if not r.get("compiled", True)]
    print(f"{len(rows)} rows, {len(failed)} failed, triton {triton.__version__} + {args.triton_dir}: {out}")


if __name__ == "__main__":
    if "--triton-dir" in sys.argv and "--worker" in sys.argv:
        # The worker's triton must come first on sys.path before anything imports triton.
        sys.path.insert(0, os.path.abspath(sys.argv[sys.argv.index("--triton-dir") + 1]))
    main()
