"""The timing driver of benchmarks/gpu_check.sh: for every case a correctness gate, then side-by-side timings of
every provider (triton.testing.do_bench medians and CUDA-graph replays), and the fraction of the floor computed
from ceilings measured in the same run (a bf16 matmul and a device copy).

    python benchmarks/gpu/bench_driver.py --out OUT.json [--device cuda|cpu] [--tiny] [--shapes NxKxDxk,...]
                                          [--dtypes float32,bfloat16] [--budget-s S]

Cases (default: the issue's N = 65536 tokens, K = 16384 codes):
  nearest_codes   D in {8, 256}, k in {1, 100}: torch (mm + argmin/topk), vq-pytorch, flash-kmeans (k = 1), ours
                  triton / cuda (cpu on the CPU). Gate: ours bit-identical to nearest_codes_reference (the exact
                  difference form) on the first 512 rows; baselines tie-aware against float64 (they search in the
                  expanded form, which misorders near ties).
  perturb_codes   rate 0.5, topk = each shape's k > 1: torch (mm + topk + the same Philox ranks), ours. Gate: ours
                  bit-identical to perturb_codes_reference; torch's rank-0 code tie-aware.
  codebook_lookup forward + backward, uniform codes and collapsed codes (every token on one code): torch
                  (F.embedding + autograd), ours. Gate: forward exact; ours bit-identical run to run, and the CUDA
                  backward bit-identical to the CPU kernel (the same chunked order); everything close to float64.
A provider whose gate fails is recorded and not timed. The JSON is rewritten after every row, so a run cut short
keeps what it measured. --device cpu --tiny runs the same logic on tiny shapes on the CPU (tests/ run it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.dirname(BENCH))
import floor_model  # noqa: E402
from quantize_bench import make_inputs, make_provider, torch_knn  # noqa: E402

from tokpost_fast import ops  # noqa: E402
from tokpost_fast.ops.philox import perturb_ranks, rate_threshold  # noqa: E402

GATE_ROWS = 512
FULL_SHAPES = [(65536, 16384, 8, 1), (65536, 16384, 8, 100), (65536, 16384, 256, 1), (65536, 16384, 256, 100)]
TINY_SHAPES = [(512, 1024, 8, 1), (512, 1024, 8, 7), (256, 1024, 33, 1), (256, 1024, 33, 7)]
KNN_PROVIDERS = ("torch", "vq-pytorch", "flash-kmeans", "triton", "cuda", "cpu")
OURS = ("triton", "cuda", "cpu")
PERTURB_RATE, SEED = 0.5, 1234


class Report:
    def __init__(self, path: str, header: dict):
        self.path, self.data = path, {**header, "rows": []}
        self.write()

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        status = row.get("skipped") or row.get("error") or ("gate FAILED: " + row["gate"] if row.get("gate") != "ok"
                                                            else f"{row['median_ms']:.3f} ms")
        print(f"  {row['op']:15s} {row['provider']:12s} {row['case']:28s} {status}", flush=True)
        self.write()

    def write(self) -> None:
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(self.path + ".tmp", self.path)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> dict:
    if device == "cuda":
        import triton.testing

        return {"median_ms": triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"),
                "timer": "triton.testing.do_bench median"}
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_ms": statistics.median(times) * 1e3, "timer": "perf_counter median of 5"}


def graph_timed(fn, device: str) -> dict:
    """Median replay time of fn captured in a CUDA graph (launch gaps removed), or why it could not be captured."""
    if device != "cuda":
        return {"graph_error": "CUDA graphs need a GPU"}
    try:
        import triton.testing

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return {"graph_median_ms": triton.testing.do_bench(graph.replay, warmup=10, rep=50, return_mode="median")}
    except Exception as err:  # e.g. a host sync inside fn; recorded, the plain timing stands
        torch.cuda.synchronize()
        return {"graph_error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}


def ceilings(device: str, tiny: bool) -> dict:
    """Measured here, as METHOD.md asks: a large matmul (bf16 on the GPU) and a device copy (bytes read + written)."""
    n = 1024 if tiny or device == "cpu" else 8192
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t_mm = timed(lambda: a @ b, device)["median_ms"] / 1e3
    nbytes = (64 << 20) if tiny or device == "cpu" else (2 << 30)
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), device)["median_ms"] / 1e3
    return {"matmul": f"{n}^3 {str(dtype)[6:]}", "matmul_tflops": 2 * n**3 / t_mm / 1e12,
            "copy_bytes": nbytes, "copy_tb_s": 2 * nbytes / t_copy / 1e12}


def measured_gpu(device: str, ceil: dict) -> floor_model.GPU:
    """floor_model's GPU with the measured matrix rate and bandwidth (clock and lane counts from the datasheet)."""
    ref = floor_model.GPUS["h100-sxm"]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        name, sms, arch = props.name, props.multi_processor_count, props.major * 10 + props.minor
    else:
        name, sms, arch = platform.processor() or "cpu", os.cpu_count() or 1, 0
    return floor_model.GPU(f"{name} (measured)", sms, ref.boost_clock_ghz, ref.tensor_clock_ghz,
                           ceil["matmul_tflops"], ceil["matmul_tflops"] / 2, ref.fp32_fma_tflops, ceil["copy_tb_s"], arch)


def unavailable(provider: str, device: str, k: int) -> str | None:
    if provider in ("triton", "cuda", "flash-kmeans") and device != "cuda":
        return "GPU only"
    if provider == "cpu" and device != "cpu":
        return "CPU backend"
    if provider == "flash-kmeans" and k > 1:
        return "flash-kmeans assigns the nearest centroid only"
    for name, module in (("vq-pytorch", "vector_quantize_pytorch"), ("flash-kmeans", "flash_kmeans")):
        if provider == name:
            try:
                __import__(module)
            except Exception as err:
                return f"{module} not importable ({type(err).__name__})"
    if provider in OURS and not ops.available_backends(device).get(provider, False):
        return f"backend {provider!r} not available"
    return None


# Tie tolerance of a baseline's answer, relative to (||z||^2 + max ||c||^2): the rounding of its own search
# precision (fp32, or matmuls in the 16-bit input dtype with 8 / 11 mantissa bits), with headroom.
TIE_TOLERANCE = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}


def tie_aware(z, codebook, idx, k, dtype="float32") -> str:
    """'ok' when the chosen codes' float64 distances equal the k smallest within the search precision's rounding."""
    true = torch.cdist(z.double(), codebook.double()).pow(2)
    scale = z.double().pow(2).sum(1, keepdim=True) + codebook.double().pow(2).sum(1).max()
    chosen = true.gather(1, idx.reshape(z.shape[0], k).long())
    best = true.topk(k, dim=1, largest=False).values
    bad = int(((chosen.sort(1).values - best).abs() > TIE_TOLERANCE[dtype] * scale.clamp_min(1.0)).any(1).sum())
    return "ok" if bad == 0 else f"{bad} of {z.shape[0]} rows beyond the tie tolerance"


def baseline_indices(provider: str, out, k: int) -> torch.Tensor:
    if provider == "flash-kmeans":
        return (out[0] if isinstance(out, (tuple, list)) else out).reshape(-1)
    return out if k == 1 else out.indices


def run_knn(report, shapes, dtypes, device, gpu, deadline) -> None:
    for (n, K, D, k) in shapes:
        for dtype in dtypes:
            z, codebook = make_inputs(n, K, D, getattr(torch, dtype), device)
            case = f"N={n} K={K} D={D} k={k} {dtype}"
            floor = floor_model.floor_us(n, K, D, k, dtype, gpu)
            ref = None
            for provider in KNN_PROVIDERS:
                row = dict(op="nearest_codes", provider=provider, case=case, n=n, K=K, D=D, k=k, dtype=dtype,
                           floor_us=floor["floor_us"], floor_bound=floor["bound"])
                reason = "time budget spent" if time.time() > deadline else unavailable(provider, device, k)
                if reason:
                    report.add({**row, "skipped": reason})
                    continue
                fn = make_provider(provider)
                try:
                    out = fn(z, codebook, k)
                    sync(device)
                    zg = z[:GATE_ROWS].float()
                    if provider in OURS:
                        ref = ref or ops.nearest_codes_reference(z[:GATE_ROWS], codebook, k)
                        same = torch.equal(out[1][:GATE_ROWS], ref[1]) and torch.equal(out[0][:GATE_ROWS], ref[0])
                        row["gate"] = "ok" if same else "differs from the exact reference (bit-identical expected)"
                    else:
                        row["gate"] = tie_aware(zg, codebook.float(), baseline_indices(provider, out, k)[:GATE_ROWS], k, dtype)
                    if row["gate"] == "ok":
                        row.update(timed(lambda: fn(z, codebook, k), device))
                        row.update(graph_timed(lambda: fn(z, codebook, k), device))
                        row["fraction_of_floor"] = floor["floor_us"] / (row["median_ms"] * 1e3)
                except Exception as err:  # recorded; the other providers still run
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                report.add(row)
            del z, codebook
            if device == "cuda":
                torch.cuda.empty_cache()


def torch_perturb(z, codebook, topk, positions):
    top = torch_knn(z, codebook, topk).indices
    ranks = perturb_ranks(SEED, positions, PERTURB_RATE, topk)
    return top[:, 0], top.gather(1, ranks[:, None]).squeeze(1)


def run_perturb(report, shapes, dtypes, device, gpu, deadline) -> None:
    for (n, K, D, topk) in [s for s in shapes if s[3] > 1]:
        for dtype in dtypes:
            z, codebook = make_inputs(n, K, D, getattr(torch, dtype), device)
            positions = torch.arange(n, device=device)
            case = f"N={n} K={K} D={D} topk={topk} {dtype}"
            floor = floor_model.floor_us(n, K, D, topk, dtype, gpu)  # rate 1 worst case: every row searches topk
            expected = ops.perturb_codes_reference(z[:GATE_ROWS], codebook, topk, rate_threshold(PERTURB_RATE), SEED)
            for provider in ("torch", "triton", "cuda", "cpu"):
                row = dict(op="perturb_codes", provider=provider, case=case, n=n, K=K, D=D, k=topk, dtype=dtype,
                           rate=PERTURB_RATE, floor_us=floor["floor_us"], floor_bound=floor["bound"])
                reason = "time budget spent" if time.time() > deadline else (
                    None if provider == "torch" else unavailable(provider, device, 1))
                if reason:
                    report.add({**row, "skipped": reason})
                    continue
                if provider == "torch":
                    fn = lambda: torch_perturb(z, codebook, topk, positions)  # noqa: E731
                else:
                    fn = lambda: ops.perturb_codes(z, codebook, PERTURB_RATE, topk, SEED, backend=provider)  # noqa: E731
                try:
                    idx, pert = fn()
                    sync(device)
                    if provider == "torch":
                        row["gate"] = tie_aware(z[:GATE_ROWS].float(), codebook.float(), idx[:GATE_ROWS], 1, dtype)
                    else:
                        same = torch.equal(idx[:GATE_ROWS], expected[0]) and torch.equal(pert[:GATE_ROWS], expected[1])
                        row["gate"] = "ok" if same else "differs from perturb_codes_reference (bit-identical expected)"
                    if row["gate"] == "ok":
                        row.update(timed(fn, device))
                        row.update(graph_timed(fn, device))
                        row["fraction_of_floor"] = floor["floor_us"] / (row["median_ms"] * 1e3)
                except Exception as err:
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                report.add(row)
            del z, codebook


def run_lookup(report, sizes, dtypes, device, gpu, deadline) -> None:
    gen = torch.Generator().manual_seed(0)
    for (n, K, D) in sizes:
        for pattern in ("uniform", "collapsed"):
            for dtype in dtypes:
                dt = getattr(torch, dtype)
                idx = (torch.randint(0, K, (n,), generator=gen) if pattern == "uniform" else torch.full((n,), 3)).to(device)
                codebook = torch.randn(K, D, generator=gen).to(dt).to(device).requires_grad_()
                grad = torch.randn(n, D, generator=gen).to(dt).to(device)
                exact = torch.zeros(K, D, dtype=torch.float64, device=device).index_add_(0, idx, grad.double())
                elem = codebook.element_size()
                floor_us = (n * 8 + 2 * n * D * elem + 2 * K * D * elem) / (gpu.hbm_tb_s * 1e12) * 1e6
                case = f"N={n} K={K} D={D} {pattern} {dtype}"
                for provider in ("torch", "cuda", "cpu"):
                    row = dict(op="codebook_lookup", provider=provider, case=case, n=n, K=K, D=D, dtype=dtype,
                               pattern=pattern, floor_us=floor_us, floor_bound="bytes")
                    reason = "time budget spent" if time.time() > deadline else (
                        None if provider == "torch" else unavailable(provider, device, 1))
                    if reason:
                        report.add({**row, "skipped": reason})
                        continue
                    lookup = (lambda i, c: F.embedding(i, c)) if provider == "torch" else \
                        (lambda i, c, p=provider: ops.codebook_lookup(i, c, backend=p, validate=False))
                    fn = lambda: torch.autograd.grad(lookup(idx, codebook), codebook, grad)[0]  # noqa: E731
                    try:
                        forward_ok = torch.equal(lookup(idx, codebook), F.embedding(idx, codebook))
                        first, second = fn(), fn()
                        sync(device)
                        tol = 1e-3 if dt == torch.float32 else 2e-2
                        close = torch.allclose(first.double(), exact, atol=tol * max(1.0, float(exact.abs().max())), rtol=tol)
                        gate = [] if forward_ok else ["forward differs from F.embedding"]
                        gate += [] if close else ["backward far from float64"]
                        if provider != "torch":
                            gate += [] if torch.equal(first, second) else ["backward differs run to run"]
                        if provider == "cuda":
                            cpu = torch.ops.tokpost_fast.codebook_lookup_backward(grad.cpu(), idx.cpu(), K)
                            gate += [] if torch.equal(first.cpu(), cpu) else ["backward differs from the CPU kernel"]
                        row["gate"] = "ok" if not gate else "; ".join(gate)
                        if row["gate"] == "ok":
                            row.update(timed(fn, device))
                            row.update(graph_timed(fn, device))
                            row["fraction_of_floor"] = floor_us / (row["median_ms"] * 1e3)
                    except Exception as err:
                        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                    report.add(row)


def parse_shapes(text: str) -> list:
    try:
        return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError:
        raise SystemExit(f"--shapes: expected NxKxDxk[,NxKxDxk...], got {text!r}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON written after every row")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU dry run)")
    parser.add_argument("--shapes", help="NxKxDxk,... for nearest_codes (perturbation uses those with k > 1)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--budget-s", type=float, default=240.0, help="no new provider starts after this")
    parser.add_argument("--ops", default="nearest_codes,perturb_codes,codebook_lookup")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU (use --device cpu --tiny for the dry run)")
    started = time.time()
    deadline = started + args.budget_s
    shapes = parse_shapes(args.shapes) if args.shapes else (TINY_SHAPES if args.tiny else FULL_SHAPES)
    dtypes = [d for d in args.dtypes.split(",") if d]
    ceil = ceilings(args.device, args.tiny)
    gpu = measured_gpu(args.device, ceil)
    import triton

    header = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "device": args.device,
              "device_name": gpu.name, "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "ceilings": ceil, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "floor_model": "floor_model.floor_us with the measured bf16 matmul rate and copy bandwidth; lookup: "
                             "bytes (idx + output + grad in, codebook gradient + codebook) over the copy bandwidth"}
    report = Report(args.out, header)
    print(f"ceilings: {ceil['matmul_tflops']:.1f} TFLOP/s ({ceil['matmul']}), {ceil['copy_tb_s']:.2f} TB/s", flush=True)
    wanted = set(args.ops.split(","))
    if "nearest_codes" in wanted:
        run_knn(report, shapes, dtypes, args.device, gpu, deadline)
    if "perturb_codes" in wanted:
        run_perturb(report, shapes, dtypes, args.device, gpu, deadline)
    if "codebook_lookup" in wanted:
        sizes = sorted({(n, K, D) for n, K, D, _ in shapes})
        run_lookup(report, sizes, dtypes, args.device, gpu, deadline)
    report.data["wall_s"] = round(time.time() - started, 1)
    report.write()
    rows = report.data["rows"]
    failed = [r for r in rows if r.get("error") or r.get("gate", "ok") != "ok"]
    print(f"{len(rows)} rows, {len(failed)} failed gates or errors, {report.data['wall_s']} s: {args.out}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
