"""Dead-code restarts on the collapse case, over several seeds: the random-init ViT tokenizer on smooth images
(tests/models/tokenizer/test_dead_codes.py::collapse_run, the code the test runs), four arms per seed:

  control           the paper's quantizer (uniform init, no restarts)
  restarts          dead-code restarts at the CodebookConfig defaults
  kmeans            k-means init of the codebook from 64 training images' latents, no restarts
  kmeans+restarts   both

    python benchmarks/dead_code_restarts.py [--seeds 0,1,2,3,4] [--steps 400] [--out PATH]

Measured on 256 held-out images (4096 tokens, K = 256): codes used, perplexity, reconstruction MSE. Writes
benchmarks/results/dead-codes-<machine>-<date>.json (command, machine, every run).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from quantize_bench import machine_info  # noqa: E402
from tokpost_fast.atomic import atomic_write_json  # noqa: E402
from tests.models.tokenizer.test_dead_codes import collapse_run  # noqa: E402

ARMS = {"control": dict(restart=False, kmeans_init=False), "restarts": dict(restart=True, kmeans_init=False),
        "kmeans": dict(restart=False, kmeans_init=True), "kmeans+restarts": dict(restart=True, kmeans_init=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs, load_at_start = [], os.getloadavg()
    for seed in seeds:
        for arm, kwargs in ARMS.items():
            t0 = time.perf_counter()
            result = collapse_run(seed, steps=args.steps, threads=args.threads, **kwargs)
            runs.append({"arm": arm, "seed": seed, "steps": args.steps, **result,
                         "seconds": time.perf_counter() - t0})
            print(f"seed {seed} {arm:<16} used {result['used']:>3}/256  perplexity {result['perplexity']:6.1f}  "
                  f"mse {result['mse']:.4f}  restarted {result['restarted']}", flush=True)
    summary = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        summary[arm] = {key: {"mean": statistics.mean(r[key] for r in mine), "min": min(r[key] for r in mine),
                              "max": max(r[key] for r in mine)} for key in ("used", "perplexity", "mse")}
    info = machine_info("cpu")
    out = args.out or (f"benchmarks/results/dead-codes-cpu-{info['cpu_cores']}core-"
                       f"{datetime.date.today().isoformat()}.json")
    report = {"command": "python " + " ".join(sys.argv), "machine": info, "torch_threads": args.threads,
              "load_average": {"start": load_at_start, "end": os.getloadavg()}, "summary": summary, "runs": runs}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report)
    print(f"wrote {out}")
    for arm, stats in summary.items():
        print(f"{arm:<16} " + "  ".join(f"{k} {v['mean']:.4g} [{v['min']:.4g}, {v['max']:.4g}]"
                                        for k, v in stats.items()))


if __name__ == "__main__":
    main()
