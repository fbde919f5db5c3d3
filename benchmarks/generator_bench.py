"""Generator throughput: sampling with vs without the KV cache (recomputing the whole prefix each step), per
attention backend, and training-step throughput. Side by side in one run; the KV-cache speed-up is the headline.

    python benchmarks/generator_bench.py [--quick] [--preset demo] [--threads N]

Writes benchmarks/results/generator-<machine>-<date>.json: the command, machine and package versions, one row per
(task, backend, mode) with median and 20/80 % quantiles of repeated perf_counter timings (CUDA synchronised), peak
memory, tokens/s and images/s, and a FLOP model (2 * matmul parameters per token + attention) for a derived rate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import statistics
import sys
import time

import torch

from tokpost_fast.atomic import atomic_write_json
from tokpost_fast.models.generator import (
    available_attention_backends,
    build_generator,
    generator_config,
    sample,
)


def machine_slug() -> str:
    if torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return f"cpu-{os.cpu_count()}core"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("flash_attn", "deepspeed", "apex"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


def save_result(result: dict, headline: dict, prefix: str, machine: str, out: str | None) -> str:
    """Write a benchmark's JSON record to `out` or benchmarks/results/<prefix>-<machine>-<date>.json; print it."""
    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                              f"{prefix}-{machine}-{datetime.date.today().isoformat()}.json")
    atomic_write_json(out, result)
    print(json.dumps(headline, indent=1))
    print(f"wrote {out}")
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    quantile = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)   # CPU: process high-water mark
    return {"median_s": statistics.median(times), "p20_s": quantile(0.2), "p80_s": quantile(0.8),
            "repeats": repeats, "times_s": times, "peak_memory_bytes": peak}


def flops_per_token(cfg, context: float) -> float:
    """Forward FLOPs of one token: 2 * (matmul weights) + attention (QK^T and PV over `context` keys)."""
    hidden = int(cfg.mlp_ratio * cfg.width)
    mlp = 3 * cfg.width * (-(-int(2 * hidden / 3) // 64) * 64) if cfg.mlp == "swiglu" else 2 * cfg.width * hidden
    per_block = 4 * cfg.width * cfg.width + mlp + (6 * cfg.width * cfg.width if cfg.cond == "adaln" else 0)
    return 2 * (cfg.depth * per_block + cfg.width * cfg.vocab_size) + cfg.depth * 4 * cfg.width * context


def optimizer_for(params, device):
    """Fused AdamW: apex FusedAdam when importable, torch's fused kernel on GPU, foreach AdamW on the CPU."""
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam
            return "apex.FusedAdam", FusedAdam(params, lr=1e-4, betas=(0.9, 0.96), weight_decay=0.03,
                                               adam_w_mode=True)
        except ImportError:
            return "torch.AdamW(fused)", torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.96), weight_decay=0.03,
                                                           fused=True)
    return "torch.AdamW(foreach)", torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.96), weight_decay=0.03,
                                                     foreach=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batch, one timed repeat (a smoke run)")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=None, help="images per sampling call (CFG doubles it)")
    parser.add_argument("--train-batch", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = args.batch or (2 if args.quick else 8)
    train_batch = args.train_batch or (4 if args.quick else 16)
    repeats = 1 if args.quick else 3
    base = generator_config(args.preset, seq_len=args.seq_len, dropout=0.0)
    rows = []
    backends = [name for name, ok in available_attention_backends(device).items() if ok]
    for backend in backends:
        cfg = generator_config(args.preset, seq_len=args.seq_len, dropout=0.0, attn_backend=backend)
        torch.manual_seed(0)
        gpt = build_generator(cfg).to(device)
        labels = torch.arange(batch, device=device) % cfg.num_classes
        common = dict(task="sample", backend=backend, preset=args.preset, batch=batch, cfg_doubled_batch=2 * batch,
                      seq_len=cfg.seq_len, dtype=str(dtype).replace("torch.", ""), device=device.type)
        for mode, use_cache in (("kv_cache", True), ("recompute", False)):
            def run():
                with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                    sample(gpt, labels, cfg_scale=4.0, cfg_power=1.0, top_k=0,
                           generator=torch.Generator(device).manual_seed(0), use_cache=use_cache)
            # recompute is the slow baseline: time it once fewer (it dominates the run)
            stats = timed(run, device, repeats if use_cache else max(1, repeats - 1), warmup=1 if use_cache else 0)
            tokens = batch * cfg.seq_len
            context = cfg.seq_len / 2
            work = 2 * batch * cfg.seq_len * flops_per_token(cfg, context) * (1 if use_cache else context)
            rows.append({**common, "mode": mode, **stats, "tokens_per_s": tokens / stats["median_s"],
                         "images_per_s": batch / stats["median_s"], "model_gflop": work / 1e9,
                         "gflop_per_s": work / 1e9 / stats["median_s"]})
            print(f"sample  {backend:5s} {mode:9s} {stats['median_s']:8.3f} s  {tokens / stats['median_s']:10.1f} tok/s"
                  f"  {batch / stats['median_s']:7.3f} img/s", flush=True)

        gpt.train()
        opt_name, opt = optimizer_for(gpt.parameters(), device)
        tokens = torch.randint(0, cfg.vocab_size, (train_batch, cfg.seq_len), device=device)
        train_labels = torch.arange(train_batch, device=device) % cfg.num_classes

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                loss = gpt.loss(tokens, train_labels, label_drop=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        stats = timed(step, device, repeats + 2, warmup=1)
        work = 3 * train_batch * cfg.seq_len * flops_per_token(cfg, cfg.seq_len / 2)   # fwd + 2x for backward
        rows.append({"task": "train_step", "backend": backend, "preset": args.preset, "batch": train_batch,
                     "seq_len": cfg.seq_len, "dtype": str(dtype).replace("torch.", ""), "device": device.type,
                     "optimizer": opt_name, **stats, "tokens_per_s": train_batch * cfg.seq_len / stats["median_s"],
                     "model_gflop": work / 1e9, "gflop_per_s": work / 1e9 / stats["median_s"]})
        print(f"train   {backend:5s} {opt_name:20s} {stats['median_s']:8.3f} s/step "
              f"{train_batch * cfg.seq_len / stats['median_s']:10.1f} tok/s", flush=True)

    headline = {}
    for backend in backends:
        by_mode = {r["mode"]: r["median_s"] for r in rows if r["task"] == "sample" and r["backend"] == backend}
        headline[f"kv_cache_speedup_{backend}"] = by_mode["recompute"] / by_mode["kv_cache"]
    machine = machine_slug()
    result = {
        "command": " ".join(["python", "benchmarks/generator_bench.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"slug": machine, "platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                    "load_average_at_end": os.getloadavg()},
        "versions": versions(),
        "config": {k: v for k, v in vars(base).items()},
        "headline": headline,
        "rows": rows,
    }
    save_result(result, headline, "generator", machine, args.out)
    return result


if __name__ == "__main__":
    main()
