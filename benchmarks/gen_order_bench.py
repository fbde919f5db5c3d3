"""Cost of RAR's layout and randomized order next to the LlamaGen-like GPT, at one preset's sizes: a training step
(forward, backward, AdamW) of GPT in raster order, RAR in raster order (r = 0) and RAR on permuted orders (r = 1,
including drawing the orders), and raster KV-cache sampling with guidance of GPT and RAR. The variants run
interleaved, one repeat of each in turn, so load on a shared machine hits them alike; ratios to GPT are the
headline.

    python benchmarks/gen_order_bench.py [--preset demo] [--seq-len 64] [--vocab 1024] [--classes 8]
        [--train-batch 32] [--sample-batch 64] [--repeats 7] [--threads 1] [--quick]

Defaults are the demo's gen stage (configs/demo.yaml: 8x8 tokens, K = 1024, 8 classes, 32 images per rank and
step, one thread per rank) and its cache / evaluate sampling (64 images per call, guidance 2). Writes
benchmarks/results/gen-order-<machine>-<date>.json (command, machine, versions, every timing).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

from generator_bench import machine_slug, save_result, versions  # benchmarks/ is sys.path[0] when run as a script
from tokpost_fast.models.generator import (build_generator, draw_orders, generator_config, next_token_loss,
                                           order_generator, permute_tokens, sample)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small batches, 2 repeats (a smoke run)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.train_batch, args.sample_batch, args.repeats = 4, 4, 2
    torch.set_num_threads(args.threads)
    sizes = dict(seq_len=args.seq_len, vocab_size=args.vocab, num_classes=args.classes, dropout=0.0)

    models = {}
    for arch in ("gpt", "rar"):
        torch.manual_seed(0)
        gpt = build_generator(generator_config(args.preset, arch=arch, **sizes))
        models[arch] = (gpt, torch.optim.AdamW(gpt.parameters(), lr=1e-4, betas=(0.9, 0.96), weight_decay=0.03,
                                               foreach=True))
    tokens = torch.randint(0, args.vocab, (args.train_batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(args.train_batch) % args.classes
    sample_labels = torch.arange(args.sample_batch) % args.classes

    def train_step(arch: str, ratio: float | None, step: int):
        gpt, opt = models[arch]
        gpt.train()
        if ratio is None:
            loss = next_token_loss(gpt(tokens, labels), tokens)
        else:
            orders = draw_orders(args.train_batch, args.seq_len, ratio, order_generator(0, step))
            loss = next_token_loss(gpt(tokens, labels, orders), permute_tokens(tokens, orders))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sampling(arch: str, step: int):
        sample(models[arch][0], sample_labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(step))

    variants = {
        "train gpt raster": lambda s: train_step("gpt", None, s),
        "train rar r=0 (raster)": lambda s: train_step("rar", None, s),
        "train rar r=1 (permuted)": lambda s: train_step("rar", 1.0, s),
        "sample gpt kv-cache": lambda s: sampling("gpt", s),
        "sample rar kv-cache": lambda s: sampling("rar", s),
    }
    times = {name: [] for name in variants}
    for repeat in range(args.repeats + 1):            # repeat 0 is the warm-up
        for name, fn in variants.items():
            start = time.perf_counter()
            fn(repeat)
            if repeat:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    headline = {
        "train_rar_raster_over_gpt": medians["train rar r=0 (raster)"] / medians["train gpt raster"],
        "train_rar_permuted_over_gpt": medians["train rar r=1 (permuted)"] / medians["train gpt raster"],
        "sample_rar_over_gpt": medians["sample rar kv-cache"] / medians["sample gpt kv-cache"],
    }
    for name in variants:
        print(f"{name:26s} median {medians[name] * 1e3:9.1f} ms  (min {min(times[name]) * 1e3:.1f}, "
              f"max {max(times[name]) * 1e3:.1f})")
    machine = machine_slug()
    result = {
        "command": " ".join(["python", "benchmarks/gen_order_bench.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"slug": machine, "platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_at_end": os.getloadavg()},
        "versions": versions(),
        "settings": {**vars(args), "params": {arch: m[0].num_params() for arch, m in models.items()}},
        "headline": headline,
        "rows": [{"variant": name, "median_s": medians[name], "times_s": times[name]} for name in variants],
    }
    save_result(result, headline, "gen-order", machine, args.out)
    return result


if __name__ == "__main__":
    main()
