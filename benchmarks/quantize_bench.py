"""Nearest-code search (the quantizer's hot loop): our fused kernels against materializing PyTorch and
vector-quantize-pytorch, side by side in one run; the speed-up over "torch" is the headline.

    python benchmarks/quantize_bench.py [--quick] [--shapes NxKxDxk,...] [--device cpu|cuda] [--out PATH]
    python benchmarks/quantize_ab.py OLD.so NEW.so [--quick | --shapes ...]   (two builds of the cpu kernel)

Providers (one row each per shape and dtype):
  torch         ||z||^2 - 2 z @ c.T + ||c||^2 as a full [N, K] matrix, then argmin (k = 1) / topk (k > 1)
  vq-pytorch    what vector_quantize_pytorch's EuclideanCodebook.forward runs for the distances:
                vector_quantize_pytorch.vector_quantize_pytorch.cdist (x2 + y2 - 2xy, clamp, sqrt), then argmax of
                -dist (its gumbel_sample at temperature 0) or topk; the [N, K] one-hot gumbel_sample also builds is
                left out (it would only make that provider slower)
  cpu / cuda    tokpost_fast.ops.nearest_codes(..., backend=...) -> the csrc kernels (never N x K)
  triton        tokpost_fast.ops.nearest_codes(..., backend="triton") (GPU only; on the CPU it is the interpreter)
  flash-kmeans  flash_kmeans.assign_euclid_triton.euclid_assign_triton (GPU, k = 1 only; when importable)

Timing: median and 20/80 % quantiles of repeated perf_counter calls on the CPU (plus the process CPU time, which
stays meaningful on a shared machine), triton.testing.do_bench on the GPU. Peak extra memory: on the GPU
max_memory_allocated above the inputs; on the CPU the peak-RSS growth of a fresh spawned process that builds the
inputs, warms the provider up on a tiny problem, resets its RSS high-water mark, then runs the measured call (so
the growth is that call's peak). Rate: GFLOP/s from the FLOP model 2 * N * K * D (the distance matmul; selection is not counted); on the
GPU also the fraction of the floor of benchmarks/floor_model.py: the largest of the tensor-core term, the epilogue
term N*K*instr/(SMs*lanes*clock) at the fewest instructions an exact search needs per (row, code), and the bytes
term (inputs read once, outputs written once), from the datasheet constants of the GPU model found.


Writes benchmarks/results/quantize-<machine>-<date>.json (command, machine, versions, every raw time).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import gc
import importlib.metadata
import itertools
import multiprocessing
import os
import platform
import re
import resource
import statistics
import sys
import time

import torch

from tokpost_fast.atomic import atomic_write_json
PROVIDERS = ("torch", "vq-pytorch", "cpu", "triton", "cuda", "flash-kmeans")
FULL_GRID = list(itertools.product((4096, 16384, 65536), (1024, 4096, 16384), (8, 64, 256), (1, 100)))
# The LlamaGen VQ-16 shape (K = 16384 codes of dim 8) at a 16384-token batch, plus a RobusTok-like small one.
QUICK_GRID = [(16384, 16384, 8, 1), (16384, 16384, 8, 100), (4096, 4096, 64, 1), (4096, 4096, 64, 100)]
# A materializing provider on the CPU is skipped when its [N, K] temporaries would exceed this (shared machines).
CPU_MATERIALIZE_LIMIT_BYTES = 3 * 2**30
# floor_model.GPUS key per device-name fragment (benchmarks/floor_model.py has the constants and their sources).
FLOOR_GPUS = {"H200": "h200", "H100": "h100-sxm", "A100": "a100-sxm"}


# ---------------------------------------------------------------------------------------------------------------
# Providers: each maps (z [N, D], codebook [K, D], k) to its selection result.
# ---------------------------------------------------------------------------------------------------------------


def torch_knn(z, codebook, k):
    dist = (z * z).sum(1, keepdim=True) - 2.0 * (z @ codebook.T) + (codebook * codebook).sum(1)[None, :]
    return dist.argmin(1) if k == 1 else dist.topk(k, dim=1, largest=False)


def vq_pytorch_knn(z, codebook, k):
    from vector_quantize_pytorch.vector_quantize_pytorch import cdist

    neg_dist = -cdist(z[None], codebook[None])[0]
    return neg_dist.argmax(-1) if k == 1 else neg_dist.topk(k, dim=-1)


def flash_kmeans_knn(z, codebook, k):
    from flash_kmeans.assign_euclid_triton import euclid_assign_triton

    x_sq = (z.float() ** 2).sum(-1)[None]
    return euclid_assign_triton(z[None], codebook[None], x_sq)


def make_provider(name: str):
    if name == "torch":
        return torch_knn
    if name == "vq-pytorch":
        return vq_pytorch_knn
    if name == "flash-kmeans":
        return flash_kmeans_knn
    from tokpost_fast import ops

    return lambda z, codebook, k: ops.nearest_codes(z, codebook, k=k, backend=name)


def skip_reason(provider: str, device: str, n: int, k_codes: int, d: int, k: int, dtype: torch.dtype) -> str | None:
    """Why this combination is not run (printed and recorded), or None."""
    if provider in ("cuda", "flash-kmeans") and device != "cuda":
        return "GPU only"
    if provider == "triton" and device != "cuda":
        return "on the CPU Triton runs only in its interpreter (a test vehicle, minutes per call)"
    if provider == "flash-kmeans":
        if k > 1:
            return "flash-kmeans assigns the nearest centroid only (no top-k)"
        try:
            import flash_kmeans.assign_euclid_triton  # noqa: F401
        except Exception as err:  # not installed, or no Triton
            return f"flash_kmeans not importable ({type(err).__name__})"
    if provider == "vq-pytorch":
        try:
            import vector_quantize_pytorch  # noqa: F401
        except Exception as err:
            return f"vector_quantize_pytorch not importable ({type(err).__name__})"
    if provider in ("cpu", "cuda", "triton"):
        from tokpost_fast import ops

        if not ops.available_backends(device).get(provider, False):
            return f"backend {provider!r} not available on {device} (extension not built?)"
    if provider in ("torch", "vq-pytorch") and device == "cpu":
        # torch: the matmul result plus one elementwise temporary; vq-pytorch's cdist: about three.
        temporaries = 2 if provider == "torch" else 3
        need = temporaries * n * k_codes * 4
        if need > CPU_MATERIALIZE_LIMIT_BYTES:
            return f"would materialize ~{need / 2**30:.1f} GiB of [N, K] temporaries on a shared CPU box"
    if dtype != torch.float32 and device == "cpu":
        return "bf16 is benchmarked on the GPU only"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------


def make_inputs(n, k_codes, d, dtype, device):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=gen).to(dtype).to(device)
    codebook = torch.randn(k_codes, d, generator=gen).to(dtype).to(device)
    return z, codebook


def quantiles(times: list[float]) -> dict:
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"median_s": statistics.median(ordered), "p20_s": pick(0.2), "p80_s": pick(0.8)}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> tuple[int, str]:
    """(baseline kB, method): the high-water mark reset to the current RSS where Linux allows it (clear_refs 5),
    else the process's ru_maxrss so far (an import-time peak can then hide a smaller call's growth)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS"), "VmHWM growth over VmRSS (clear_refs reset)"
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss delta"


def peak_rss_kb(method: str) -> int:
    return _status_kb("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_cpu(spec: dict) -> dict:
    """Runs in a fresh spawned process: RSS growth of the one measured call, then repeated timings (the measured
    call is the first timing sample: after the tiny warm-up it is an ordinary call)."""
    torch.set_num_threads(spec["threads"])
    fn = make_provider(spec["provider"])
    n, k_codes, d, k = spec["n"], spec["k_codes"], spec["d"], spec["k"]
    z, codebook = make_inputs(n, k_codes, d, getattr(torch, spec["dtype"]), "cpu")
    # Warm-up on a tiny problem: loads kernels and thread pools so the baseline already holds them.
    fn(z[: min(n, 64)].contiguous(), codebook[: max(k, min(k_codes, 256))].contiguous(), k)
    gc.collect()
    baseline_kb, method = reset_peak_rss()
    times, cpu_times = [], []
    deadline = time.perf_counter() + spec["budget_s"]
    while len(times) < spec["min_repeats"] or (len(times) < spec["max_repeats"] and time.perf_counter() < deadline):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        fn(z, codebook, k)
        times.append(time.perf_counter() - wall0)
        cpu_times.append(time.process_time() - cpu0)
        if len(times) == 1:
            peak_extra = (peak_rss_kb(method) - baseline_kb) * 1024
    return {**quantiles(times), "cpu_time_median_s": statistics.median(cpu_times), "repeats": len(times),
            "times_s": times, "cpu_times_s": cpu_times, "peak_extra_bytes": peak_extra, "memory_method": method}


def measure_cuda(spec: dict) -> dict:
    import triton.testing

    fn = make_provider(spec["provider"])
    z, codebook = make_inputs(spec["n"], spec["k_codes"], spec["d"], getattr(torch, spec["dtype"]), "cuda")
    k = spec["k"]
    fn(z, codebook, k)  # compile / autotune outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(z, codebook, k)
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - base
    median, p20, p80 = triton.testing.do_bench(lambda: fn(z, codebook, k), quantiles=[0.5, 0.2, 0.8])
    return {"median_s": median / 1e3, "p20_s": p20 / 1e3, "p80_s": p80 / 1e3, "peak_extra_bytes": peak_extra,
            "memory_method": "cuda max_memory_allocated delta"}


def floor_terms(spec: dict) -> dict | None:
    """floor_model.floor_us for this shape on the GPU found (None for an unknown GPU)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import floor_model

    name = torch.cuda.get_device_name().upper()
    gpu = next((key for fragment, key in FLOOR_GPUS.items() if fragment in name), None)
    if gpu is None:
        return None
    return floor_model.floor_us(spec["n"], spec["k_codes"], spec["d"], spec["k"], spec["dtype"], gpu)


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------


def machine_info(device: str) -> dict:
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu_model": cpu_model, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    for dist in ("triton", "vector-quantize-pytorch", "flash-kmeans"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
        info["simd"] = [flag for flag in ("avx2", "fma", "avx512f") if flag in flags]
    except (OSError, StopIteration):
        pass

    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        from tokpost_fast.ops._backends import extension_built_with_cuda

        info["extension_built_with_cuda"] = extension_built_with_cuda()
    except Exception:
        info["extension_built_with_cuda"] = None
    return info


def machine_slug(device: str) -> str:
    if device == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return f"cpu-{os.cpu_count()}core"


def print_table(rows: list[dict]) -> None:
    header = f"{'provider':<13}{'N':>7}{'K':>7}{'D':>5}{'k':>5} {'dtype':<9}{'median ms':>11}{'p20':>10}{'p80':>10}" \
             f"{'cpu ms':>10}{'GFLOP/s':>9}{'peak MB':>10}{'x torch':>9}"
    print(header)
    print("-" * len(header))
    last = None
    for r in rows:
        key = (r["n"], r["k_codes"], r["d"], r["k"], r["dtype"])
        if last is not None and key != last:
            print()
        last = key
        if "skipped" in r:
            print(f"{r['provider']:<13}{r['n']:>7}{r['k_codes']:>7}{r['d']:>5}{r['k']:>5} {r['dtype']:<9}  skipped: {r['skipped']}")
            continue
        cpu_ms = f"{r['cpu_time_median_s'] * 1e3:10.1f}" if "cpu_time_median_s" in r else f"{'':>10}"
        ratio = f"{r['speedup_vs_torch']:8.1f}x" if r.get("speedup_vs_torch") else f"{'':>9}"
        print(f"{r['provider']:<13}{r['n']:>7}{r['k_codes']:>7}{r['d']:>5}{r['k']:>5} {r['dtype']:<9}"
              f"{r['median_s'] * 1e3:11.2f}{r['p20_s'] * 1e3:10.2f}{r['p80_s'] * 1e3:10.2f}{cpu_ms}"
              f"{r['gflops']:9.1f}{r['peak_extra_bytes'] / 2**20:10.1f}{ratio}")


def parse_shapes(parser, text: str) -> list:
    try:
        shapes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 4 or min(s) < 1 or s[3] > s[1] for s in shapes):
        parser.error(f"--shapes: expected NxKxDxk[,...] with 1 <= k <= K, got {text!r}")
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = K = 16384, D = 8 and one D = 64 shape (< 2 min on 2 cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quantize-<machine>-<date>.json)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of " + ",".join(PROVIDERS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads per measurement")
    parser.add_argument("--shapes", help="NxKxDxk,... instead of the grid, e.g. 65536x16384x8x1,65536x16384x256x100")
    args = parser.parse_args()
    grid = parse_shapes(parser, args.shapes) if args.shapes else (QUICK_GRID if args.quick else FULL_GRID)

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    providers = [p for p in args.providers.split(",") if p]
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        parser.error(f"unknown providers {sorted(unknown)}")
    dtypes = ["float32"] + (["bfloat16"] if device == "cuda" else [])
    # Repeat until budget_s has passed (at least min_repeats, at most max_repeats calls). --quick takes a single
    # call of the multi-second materializing providers (their "repeats" field says so).
    budget = {"budget_s": 1.0, "min_repeats": 1, "max_repeats": 10} if args.quick else \
        {"budget_s": 8.0, "min_repeats": 3, "max_repeats": 30}

    rows: list[dict] = []
    pool = None
    if device == "cpu":  # one fresh process per measurement, so its RSS growth is that call's alone
        pool_kwargs = {"max_workers": 1, "mp_context": multiprocessing.get_context("spawn")}
        if sys.version_info >= (3, 11):
            pool_kwargs["max_tasks_per_child"] = 1
        pool = concurrent.futures.ProcessPoolExecutor(**pool_kwargs)
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    for (n, k_codes, d, k), dtype_name in itertools.product(grid, dtypes):
        for provider in providers:
            spec = {"provider": provider, "n": n, "k_codes": k_codes, "d": d, "k": k, "dtype": dtype_name,
                    "threads": args.threads, **budget}
            row = {key: spec[key] for key in ("provider", "n", "k_codes", "d", "k", "dtype")}
            reason = skip_reason(provider, device, n, k_codes, d, k, getattr(torch, dtype_name))
            if reason is not None:
                rows.append({**row, "skipped": reason})
                continue
            result = pool.submit(measure_cpu, spec).result() if pool else measure_cuda(spec)
            row.update(result)
            row["flops"] = 2.0 * n * k_codes * d
            row["gflops"] = row["flops"] / row["median_s"] / 1e9
            if device == "cuda":
                floor = floor_terms(spec)
                if floor is not None:
                    row.update(floor=floor, floor_fraction=floor["floor_us"] / (row["median_s"] * 1e6))
            rows.append(row)
            print(f"  {provider:<13} N={n} K={k_codes} D={d} k={k} {dtype_name}: {row['median_s'] * 1e3:.2f} ms", flush=True)
    if pool:
        pool.shutdown()

    # Headline: speed-up of every provider over "torch" on the same shape and dtype.
    torch_time = {(r["n"], r["k_codes"], r["d"], r["k"], r["dtype"]): r["median_s"]
                  for r in rows if r["provider"] == "torch" and "median_s" in r}
    for r in rows:
        base = torch_time.get((r["n"], r["k_codes"], r["d"], r["k"], r["dtype"]))
        if base and "median_s" in r:
            r["speedup_vs_torch"] = base / r["median_s"]
    print()
    print_table(rows)
    for r in rows:
        if r.get("speedup_vs_torch") and r["provider"] != "torch":
            print(f"{r['provider']} vs torch at N={r['n']} K={r['k_codes']} D={r['d']} k={r['k']} {r['dtype']}: "
                  f"{r['speedup_vs_torch']:.1f}x")

    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"quantize-{machine_slug(device)}-{date}.json")
    report = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": date,
        "device": device,
        "machine": machine_info(device),
        "flop_model": "2 * N * K * D (distance matmul; selection not counted)",
        "floor": "benchmarks/floor_model.py floor_us: max(tensor-core term, epilogue term at the fewest instructions "
                 "per element an exact search needs, bytes term); floor_fraction = floor / median"
                 if device == "cuda" else None,
        "wall_s": time.perf_counter() - started,
        # Other work on a shared machine shows here, and in the gap between wall and CPU time of the rows.
        "load_average": {"start": load_at_start, "end": os.getloadavg()},
        "rows": rows,
    }
    atomic_write_json(out, report)
    print(f"\nwrote {out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
