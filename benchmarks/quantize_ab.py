"""Two builds of the CPU kernels side by side: does a change of csrc/ make the cpu provider slower?

    python benchmarks/quantize_ab.py OLD.so NEW.so [--quick | --shapes NxKxDxk,...] [--rounds R] [--out PATH]

Each build (a tokpost_fast/_C*.so, e.g. one built from git HEAD and the working tree's) runs in its own fresh
process that loads it with torch.ops.load_library and calls torch.ops.tokpost_fast.knn_codes / perturb_codes
directly; the processes alternate OLD, NEW, OLD, NEW ... for --rounds rounds, so slow drifts of a shared machine's
load hit both. Cases: benchmarks/quantize_bench.py's grid (--quick: its QUICK_GRID) for knn_codes plus one
perturb_codes shape, each on random data and on near-tie data (codes in tight clusters, where an exact search has
the most to re-rank). Rows: the medians over rounds (wall and process CPU time) and OLD / NEW ratios (> 1: NEW is
faster), with every round's paired ratio. Writes benchmarks/results/quantize-<machine>-<date>-ab.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import multiprocessing
import os
import statistics
import sys
import time

import torch

from tokpost_fast.atomic import atomic_write_json
from quantize_bench import FULL_GRID, QUICK_GRID, machine_info, machine_slug, make_inputs, parse_shapes

AB_PERTURB = (16384, 16384, 8, 100)  # perturb_codes at rate 1/2 (threshold 2**31), topk 100


def near_tie_inputs(n, k_codes, d):
    """Codes in 64 tight clusters (spread 3e-3) and tokens at the same centres: the expanded form's rounding exceeds
    the gaps, so nearly every code of a row's cluster is a candidate (the exact search's worst common case)."""
    gen = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(64, d, generator=gen)
    codebook = centres[torch.randint(0, 64, (k_codes,), generator=gen)] + 3e-3 * torch.randn(k_codes, d, generator=gen)
    z = centres[torch.randint(0, 64, (n,), generator=gen)] + 3e-3 * torch.randn(n, d, generator=gen)
    return z, codebook


def ab_worker(spec: dict) -> dict:
    """In a fresh process: load one build, time every case (wall and process CPU time)."""
    torch.set_num_threads(spec["threads"])
    torch.ops.load_library(spec["lib"])
    kernels = torch.ops.tokpost_fast
    results = {}
    for op, (n, k_codes, d, k), data in spec["cases"]:
        z, codebook = make_inputs(n, k_codes, d, torch.float32, "cpu") if data == "random" else near_tie_inputs(n, k_codes, d)
        call = (lambda zz: kernels.knn_codes(zz, codebook, k)) if op == "knn_codes" else \
            (lambda zz: kernels.perturb_codes(zz, codebook, k, 2**31, 0, 0))
        call(z[:64].contiguous())
        wall, cpu = [], []
        for _ in range(spec["repeats"]):
            cpu0, wall0 = time.process_time(), time.perf_counter()
            call(z)
            wall.append(time.perf_counter() - wall0)
            cpu.append(time.process_time() - cpu0)
        results[f"{op} {n}x{k_codes}x{d}x{k} {data}"] = {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu)}
    return results


def run_ab(args, grid) -> None:
    import hashlib

    libs = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
    cases = [(op, shape, data) for op, shapes in (("knn_codes", grid), ("perturb_codes", [AB_PERTURB]))
             for shape in shapes for data in ("random", "near-tie")]
    spec = {"threads": args.threads, "repeats": 3, "cases": cases}
    runs = {"old": [], "new": []}
    load_at_start, started = os.getloadavg(), time.perf_counter()
    context = multiprocessing.get_context("spawn")
    for r in range(args.rounds):
        for label in ("old", "new"):  # alternating, so slow drifts of the machine's load hit both
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                runs[label].append(pool.submit(ab_worker, {**spec, "lib": libs[label]}).result())
            print(f"  round {r + 1}/{args.rounds} {label} done", flush=True)
    rows = []
    for key in runs["old"][0]:
        row = {"case": key}
        for label in ("old", "new"):
            for t in ("wall_s", "cpu_s"):
                row[f"{label}_{t}"] = statistics.median(run[key][t] for run in runs[label])
        row["ratio_wall_old_over_new"] = row["old_wall_s"] / row["new_wall_s"]
        row["ratio_cpu_old_over_new"] = row["old_cpu_s"] / row["new_cpu_s"]
        row["paired_wall_ratios"] = [o[key]["wall_s"] / n[key]["wall_s"] for o, n in zip(runs["old"], runs["new"])]
        rows.append(row)
        print(f"{key:44s} old {row['old_wall_s'] * 1e3:8.1f} ms  new {row['new_wall_s'] * 1e3:8.1f} ms  "
              f"old/new wall {row['ratio_wall_old_over_new']:.2f}  cpu {row['ratio_cpu_old_over_new']:.2f}")
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"quantize-{machine_slug('cpu')}-{date}-ab.json")
    report = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "date": date,
              "machine": machine_info("cpu"), "wall_s": time.perf_counter() - started,
              "load_average": {"start": load_at_start, "end": os.getloadavg()},
              "libs": {label: {"path": path, "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest()}
                       for label, path in libs.items()},
              "method": "fresh spawned process per (round, build); each times every case 3x after a tiny warm-up; "
                        "medians over rounds of the per-process medians; ratio > 1: NEW is faster",
              "rows": rows}
    atomic_write_json(out, report)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", help="the baseline build (.so)")
    parser.add_argument("new", help="the build under test (.so)")
    parser.add_argument("--quick", action="store_true", help="quantize_bench.py's QUICK_GRID")
    parser.add_argument("--shapes", help="NxKxDxk,... for knn_codes instead of the grid")
    parser.add_argument("--rounds", type=int, default=5, help="alternating OLD/NEW process pairs")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    for path in (args.old, args.new):
        if not os.path.isfile(path):
            parser.error(f"no such build: {path}")
    grid = parse_shapes(parser, args.shapes) if args.shapes else (QUICK_GRID if args.quick else FULL_GRID)
    run_ab(args, grid)


if __name__ == "__main__":
    main()
