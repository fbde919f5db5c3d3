"""k-means for codebook initialisation: tokpost_fast.ops.kmeans (assignment by the fused nearest-code op) against a
plain torch k-means and vector-quantize-pytorch's, side by side in one run; the speed-up over "torch" is the headline.

    python benchmarks/kmeans_bench.py [--n 65536] [--k 4096] [--dims 8,64] [--iters 10] [--repeats 3] [--out PATH]

Providers (same rows, same initial centroids, the same number of updates):
  torch       the textbook loop: the full [N, K] matrix ||x||^2 - 2 x @ c.T + ||c||^2, min over codes, index_add_
              means, an empty cluster moved to the farthest row (the algorithm of ops.kmeans), then one final
              assignment
  vq-pytorch  vector_quantize_pytorch.vector_quantize_pytorch.kmeans (its cdist [N, K] matrix, argmax of -dist,
              scatter_add_ means; an empty cluster keeps its centroid; no final assignment)
  ours        tokpost_fast.ops.kmeans(..., backend=--backend), never [N, K]
Timing: median and min/max of --repeats perf_counter runs, plus the process CPU time of each run (meaningful on a
shared machine); the load average at start and end is recorded. Quality: the inertia (sum of squared distances to
the assigned centroid) of torch and ours, which run the same algorithm and must agree closely.

Writes benchmarks/results/kmeans-<machine>-<date>.json (command, machine, versions, every raw time).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_bench import machine_info  # noqa: E402  (the same machine record as the quantizer benchmark)
from tokpost_fast.atomic import atomic_write_json  # noqa: E402

from tokpost_fast import ops  # noqa: E402


def torch_kmeans(x: torch.Tensor, init: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (centroids, inertia): Lloyd with the full distance matrix, the algorithm of ops.kmeans (metric l2)."""
    centroids = init.clone()
    x2 = (x * x).sum(1, keepdim=True)
    for it in range(iters + 1):
        dist = x2 - 2.0 * (x @ centroids.T) + (centroids * centroids).sum(1)[None, :]
        best, idx = dist.min(dim=1)
        if it == iters:
            break
        counts = torch.bincount(idx, minlength=centroids.shape[0])
        means = torch.zeros_like(centroids).index_add_(0, idx, x) / counts.clamp(min=1)[:, None]
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            means[empty] = x[torch.sort(best, descending=True, stable=True).indices[:empty.numel()]]
        centroids = means
    return centroids, best.clamp(min=0).sum()


def vq_pytorch_kmeans(x: torch.Tensor, init: torch.Tensor, iters: int) -> tuple[torch.Tensor, None]:
    from vector_quantize_pytorch.vector_quantize_pytorch import kmeans

    means, _ = kmeans(x[None], init.shape[0], num_iters=iters, sample_fn=lambda samples, num: init[None].clone())
    return means[0], None


def ours_kmeans(x: torch.Tensor, init: torch.Tensor, iters: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    out = ops.kmeans(x, init.shape[0], iters=iters, init=init, backend=backend)
    return out.centroids, out.inertia


def measure(fn, repeats: int) -> dict:
    fn()                                                    # warm-up (allocator, OpenMP pool, lazy imports)
    wall, cpu, result = [], [], None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    inertia = result[1]
    return {"median_s": statistics.median(wall), "min_s": min(wall), "max_s": max(wall), "times_s": wall,
            "cpu_s": cpu, "inertia": None if inertia is None else float(inertia)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=65536, help="rows (encoder outputs)")
    parser.add_argument("--k", type=int, default=4096, help="clusters (codebook size)")
    parser.add_argument("--dims", default="8,64", help="comma-separated D values (8: LlamaGen VQ-16, 64: RobusTok)")
    parser.add_argument("--iters", type=int, default=10, help="k-means updates")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--backend", default="cpu", help="ops backend of the 'ours' row")
    parser.add_argument("--providers", default="torch,vq-pytorch,ours")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    providers = args.providers.split(",")

    rows, load_at_start = [], os.getloadavg()
    for d in (int(v) for v in args.dims.split(",")):
        gen = torch.Generator().manual_seed(d)
        x = torch.randn(args.n, d, generator=gen)
        init = x[torch.randperm(args.n, generator=gen)[:args.k]].clone()
        fns = {"torch": lambda: torch_kmeans(x, init, args.iters),
               "vq-pytorch": lambda: vq_pytorch_kmeans(x, init, args.iters),
               "ours": lambda: ours_kmeans(x, init, args.iters, args.backend)}
        for provider in providers:
            row = {"provider": provider, "n": args.n, "k": args.k, "d": d, "iters": args.iters, "dtype": "float32",
                   **measure(fns[provider], args.repeats)}
            if provider == "ours":
                row["backend"] = args.backend
            if provider in ("torch", "vq-pytorch"):
                row["materialized_bytes"] = 4 * args.n * args.k       # the [N, K] fp32 distance matrix
            rows.append(row)
            print(f"  {provider:<11} N={args.n} K={args.k} D={d} iters={args.iters}: {row['median_s']:.3f} s "
                  f"(cpu {statistics.median(row['cpu_s']):.3f} s)", flush=True)

    base = {r["d"]: r["median_s"] for r in rows if r["provider"] == "torch"}
    for r in rows:
        if r["d"] in base:
            r["speedup_vs_torch"] = base[r["d"]] / r["median_s"]
    info = machine_info("cpu")
    machine = f"cpu-{info['cpu_cores']}core"
    out = args.out or f"benchmarks/results/kmeans-{machine}-{datetime.date.today().isoformat()}.json"
    report = {"command": "python " + " ".join(sys.argv), "machine": info,
              "load_average": {"start": load_at_start, "end": os.getloadavg()}, "rows": rows}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report)
    print(f"wrote {out}")
    for r in rows:
        print(f"{r['provider']:<11} D={r['d']}: {r['median_s']:.3f} s  x{r.get('speedup_vs_torch', float('nan')):.1f}"
              f"  inertia {r['inertia']}")


if __name__ == "__main__":
    main()
