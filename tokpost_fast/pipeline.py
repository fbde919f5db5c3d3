"""The demo pipeline (SPEC B6): data -> main -> gen -> cache -> post -> evaluate before / after -> report.

    python -m tokpost_fast.pipeline --config configs/demo.yaml --run-dir runs/demo [--data DIR] [--ranks 2]
        [--launcher deepspeed|python|inprocess] [--set key=value ...] [--inception-weights PATH] [--fresh]

Training stages run as their own `deepspeed --num_gpus R tokpost_fast/train.py --stage X` processes (on a CPU:
gloo ranks with cores / R intra-op threads each; on the 2-core machine the main stage ran ~3x faster so than as
one 2-thread process); `--launcher python` runs them as one plain process each, `inprocess` inside this one
(tests). The evaluation is
tokpost_fast.metrics.evaluate_run on the same class-balanced real images, the same generator and the same sampling
seed, with RUN/tokenizer.pt ("before") and with RUN/tokenizer_post.pt ("after"), the two in parallel
single-thread processes.

VQ or continuous, from the config alone: a VQ tokenizer (tokenizer.arch vq_cnn / vit) with the AR generator
(gen.generator: ar; configs/demo.yaml), or a continuous one (arch kl_cnn) with the DiT (gen.generator: dit;
configs/demo_continuous.yaml, `make demo PIPELINE=continuous`). Every stage reads its settings from the resolved
config (the DiT, the latent cache's post_strength, ...), so the stages run with the same flags either way; a config
that pairs the wrong generator with its tokenizer is refused before the main stage starts.

Resumable: RUN/pipeline.json records every finished stage and its wall time; a re-run skips those, restarts an
unfinished training stage with --resume (the cache stage continues at its first missing shard) and rewrites the
report. The resolved config (with --data and --set applied) is RUN/pipeline_config.yaml; a re-run with another
config is refused (use a new --run-dir, or --fresh to delete the old one).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from tokpost_fast.atomic import atomic_write_json

log = logging.getLogger("tokpost_fast.pipeline")

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ("deepspeed", "python", "inprocess")
# (stage, the file that exists once it is done, relative to the run folder)
STAGES = (("data", ()), ("main", ("tokenizer.pt",)), ("gen", ("generator.pt",)), ("cache", ("cache/index.json",)),
          ("post", ("tokenizer_post.pt",)), ("evaluate", ("eval/before/metrics.json", "eval/after/metrics.json")),
          ("report", ("report.md",)))
EVALUATIONS = (("before", "tokenizer.pt"), ("after", "tokenizer_post.pt"))
RESUMABLE = {"main": "checkpoints", "gen": "gen/checkpoints", "post": "post/checkpoints"}
EVAL_METRICS = ("rfid", "pfid", "gfid")
GENERATOR_OF = {"vq": "ar", "continuous": "dit"}    # pipeline kind -> the gen.generator it needs


def pipeline_kind(cfg) -> str:
    """"continuous" for a KL tokenizer (with a DiT), "vq" otherwise (with the AR generator); a config that pairs a
    tokenizer with the other kind's generator is an error naming both fields."""
    kind = "continuous" if cfg.tokenizer.arch == "kl_cnn" else "vq"
    if cfg.gen.generator != GENERATOR_OF[kind]:
        raise SystemExit(f"pipeline: tokenizer.arch={cfg.tokenizer.arch!r} is a {kind} tokenizer, which needs "
                         f"gen.generator: {GENERATOR_OF[kind]} (the config has {cfg.gen.generator!r}); see "
                         f"configs/demo{'_continuous' if kind == 'continuous' else ''}.yaml")
    return kind


# --- state --------------------------------------------------------------------------------------------------------
class PipelineState:
    """RUN/pipeline.json: {"config_sha256", "stages": {name: {"seconds", "finished_at", ...}}}, rewritten
    atomically after every stage."""

    def __init__(self, run_dir: Path, config_sha256: str):
        self.path = run_dir / "pipeline.json"
        self.data = {"config_sha256": config_sha256, "stages": {}}
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            if old.get("config_sha256") != config_sha256:
                raise SystemExit(f"pipeline: {run_dir} was made with another config (see its pipeline_config.yaml);"
                                 " use a new --run-dir, or --fresh to delete it")
            self.data = old

    def done(self, name: str, outputs: Sequence[str], run_dir: Path) -> bool:
        return name in self.data["stages"] and all((run_dir / output).exists() for output in outputs)

    def record(self, name: str, seconds: float, **extra) -> None:
        self.data["stages"][name] = {"seconds": round(seconds, 2), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                                     **extra}
        atomic_write_json(self.path, self.data)

    def seconds(self) -> dict[str, float]:
        return {name: rec["seconds"] for name, rec in self.data["stages"].items()}

    def timing(self) -> dict[str, dict]:
        keys = ("seconds", "cpu_seconds", "load_average")
        return {name: {k: rec.get(k) for k in keys} for name, rec in self.data["stages"].items()}


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# --- stages -------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(threads: int) -> dict:
    """The environment of a stage process: no inherited rank variables, this repo importable, `threads` intra-op
    threads per rank."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_training_stage(stage: str, config: Path, run_dir: Path, launcher: str, ranks: int, resume: bool) -> None:
    args = ["--stage", stage, "--config", str(config), "--run-dir", str(run_dir)] + (["--resume"] if resume else [])
    if launcher == "inprocess":
        from tokpost_fast.train import main as train_main

        train_main(args)
        return
    train_py = str(REPO_ROOT / "tokpost_fast" / "train.py")
    if launcher == "deepspeed":
        deepspeed = Path(sys.executable).with_name("deepspeed")
        cmd = [str(deepspeed) if deepspeed.exists() else "deepspeed", "--num_gpus", str(ranks),
               "--master_port", str(_free_port()), train_py, *args]
    else:
        cmd = [sys.executable, train_py, *args]
    threads = max(1, (os.cpu_count() or 1) // (ranks if launcher == "deepspeed" else 1))
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=child_env(threads))
    if done.returncode != 0:
        raise SystemExit(f"pipeline: stage {stage} failed (exit {done.returncode}): {' '.join(cmd)}")


def ensure_data(root: Path) -> dict:
    """The image folder; the embedded set (a folder named `embedded`) is built when missing (make data)."""
    if root.is_dir():
        return {"root": str(root), "built": False}
    if root.name != "embedded":
        raise SystemExit(f"pipeline: image folder {root} does not exist (only the embedded set, data/embedded, is "
                         "built on demand)")
    from tokpost_fast.data.embedded import build_embedded

    manifest = build_embedded(str(root))
    return {"root": str(root), "built": True, "images": manifest["num_images"]}


def balanced_real_images(cfg, total: Optional[int]):
    """(images [N, 3, S, S] in [-1, 1], labels [N]): `total` images (None: all) spread evenly over the classes,
    and evenly within each class. The evaluation's own "first N" would hold the first classes only."""
    import torch

    from tokpost_fast.data import ImageFolderDataset

    dataset = ImageFolderDataset(cfg.data, train=False, seed=0, epoch=0)
    by_class: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(dataset.samples):
        by_class.setdefault(label, []).append(index)
    per_class = len(dataset) if total is None else max(1, total // len(by_class))
    chosen = []
    for label in sorted(by_class):
        members = by_class[label]
        take = min(per_class, len(members))
        chosen += [members[i * len(members) // take] for i in range(take)]
    images = torch.stack([dataset[i][0] for i in chosen])
    labels = torch.tensor([dataset.samples[i][1] for i in chosen])
    return images, labels


def run_evaluation(cfg, run_dir: Path, which: str, tokenizer_file: str, real_images, inception_weights,
                   progress: bool = True) -> dict:
    """evaluate_run on RUN/<tokenizer_file> with RUN/generator.pt -> RUN/eval/<which>/ (metrics.json, pFID curve);
    the real-image statistics are cached in RUN/fid_stats. Returns the metric values."""
    import torch

    from tokpost_fast.metrics.run import evaluate_run

    # One intra-op thread: next to another busy process, 2 OpenMP threads on 2 cores spin-wait at every one of
    # the sampler's many small ops (measured: 64 samples in 60 s instead of 1 s).
    torch.set_num_threads(1)
    out_dir = run_dir / "eval" / which
    out_dir.mkdir(parents=True, exist_ok=True)
    result = evaluate_run(out_dir, metrics=list(EVAL_METRICS), pfid_curve=True, tokenizer=run_dir / tokenizer_file,
                          generator=run_dir / "generator.pt", config=cfg, images=real_images,
                          stats_dir=run_dir / "fid_stats", out=out_dir / "metrics.json",
                          inception_weights=inception_weights, progress=progress)
    return result["values"]


def run_evaluations(cfg, run_dir: Path, real_images, inception_weights, workers: int) -> dict:
    """Before and after, each in its own single-thread process when workers > 1 (spawned: the parent has run
    OpenMP code, which a forked child may deadlock on)."""
    jobs = [(cfg, run_dir, which, name, real_images, inception_weights, workers == 1) for which, name in EVALUATIONS]
    if workers <= 1:
        return {job[2]: run_evaluation(*job) for job in jobs}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_evaluation, *job) for job in jobs]
        return {which: future.result() for (which, _), future in zip(EVALUATIONS, futures)}


# --- the pipeline -------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tokpost_fast.pipeline", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--data", default=None, help="ImageFolder root (default: the config's data.root)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as train.py's --set (repeatable)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="deepspeed")
    p.add_argument("--ranks", type=int, default=None, help="deepspeed ranks (default: 2 on a CPU, else the GPUs)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="FID Inception-v3 weights; without them every FID is the offline proxy and says so")
    p.add_argument("--eval-workers", type=int, default=None,
                   help="processes for the before / after evaluations (default: 2 when there are >= 2 cores)")
    p.add_argument("--fresh", action="store_true", help="delete RUN_DIR first")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    import torch

    from tokpost_fast.config import dump_config, load_config, to_dict

    args = parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    ranks = args.ranks or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    if args.launcher != "deepspeed":
        ranks = 1

    overrides = list(args.overrides)
    cfg = load_config(args.config, overrides)
    data_root = Path(args.data or cfg.data.root).expanduser().resolve()
    cfg = load_config(args.config, overrides + [f"data.root={data_root}"])
    kind = pipeline_kind(cfg)
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "pipeline_config.yaml"
    digest = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()
    state = PipelineState(run_dir, digest)
    dump_config(cfg, config_path)
    print(f"pipeline: {run_dir} ({kind}: {cfg.tokenizer.arch} tokenizer + {cfg.gen.generator} generator; "
          f"{args.launcher}, {ranks} rank(s)); config {config_path}", flush=True)

    torch.set_num_threads(1)             # this process only evaluates and reports: see run_evaluation
    results: dict = {}
    for name, outputs in STAGES:
        if name != "report" and state.done(name, outputs, run_dir):
            print(f"pipeline: {name}: done ({state.seconds()[name]:.0f} s), skipped", flush=True)
            continue
        print(f"pipeline: {name} ...", flush=True)
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        extra = {}
        if name == "data":
            extra = ensure_data(data_root)
        elif name in RESUMABLE or name == "cache":
            resume = name in RESUMABLE and (run_dir / RESUMABLE[name] / "latest").is_file()
            run_training_stage(name, config_path, run_dir, args.launcher, ranks, resume)
        elif name == "evaluate":
            real, _ = balanced_real_images(cfg, cfg.eval.num)
            workers = args.eval_workers or (2 if (os.cpu_count() or 1) >= 2 else 1)
            extra = {"values": run_evaluations(cfg, run_dir, real, args.inception_weights, workers),
                     "workers": workers}
        else:
            from tokpost_fast.pipeline_report import write_report

            results = write_report(run_dir, cfg, state.timing(), ranks=ranks, launcher=args.launcher,
                                   cores=os.cpu_count())
        # CPU seconds (this process and its stage processes) and the load average tell a slow stage on a busy
        # machine from a slow stage: on an idle machine wall time ~ CPU time / cores.
        state.record(name, time.perf_counter() - t0, cpu_seconds=round(cpu_seconds() - cpu0, 1),
                     load_average=round(os.getloadavg()[0], 2), **extra)
        print(f"pipeline: {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    total = sum(v for k, v in state.seconds().items())
    print(f"pipeline: done in {total:.0f} s of stage time; report {run_dir / 'report.md'}", flush=True)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    main()
