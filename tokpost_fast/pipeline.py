"""The demo pipeline (METHOD.md B6): data -> main -> gen -> cache -> post | control -> evaluate -> report.

    python -m tokpost_fast.pipeline --config configs/demo.yaml --run-dir runs/demo [--data DIR] [--ranks 2]
        [--launcher deepspeed|python|inprocess] [--set key=value ...] [--seeds N] [--post-seeds M]
        [--inception-weights PATH] [--extractor inception|proxy] [--fresh]

Training stages run as their own `deepspeed --num_gpus R tokpost_fast/train.py --stage X` processes (on a CPU:
gloo ranks with cores / R intra-op threads each; on the 2-core machine the main stage ran ~3x faster so than as
one 2-thread process); `--launcher python` runs them as one plain process each, `inprocess` inside this one
(tests). Every training stage reads the train split of the data only (data/folder.py); every metric is measured
on the held-out split.

Three arms from the same main-stage tokenizer and generator (METHOD.md A5):
    main      RUN/tokenizer.pt, as the main stage left it;
    control   RUN/tokenizer_control.pt: the decoder post-trained with the post recipe and steps on the CLEAN grids
              of the cached images (post.grids=clean: sigma = 1, "just more decoder training");
    post      RUN/tokenizer_post.pt: the same, on the cached generated grids (the method, sigma = cache.sigma).
`--post-seeds M` trains control and post M times (post.seed + k: RUN/tokenizer_{post,control}_s<k>.pt for k >= 1).
The `evaluate` stage (metrics/arms.py) measures every checkpoint on the same held-out images and, for each of the
`--seeds N` evaluation seeds, on the same generated samples; the report names the post-training effect as post -
control, with the noise rule of metrics/effects.py.

VQ or continuous, from the config alone: a VQ tokenizer (tokenizer.arch vq_cnn / vit) with the AR generator
(gen.generator: ar; configs/demo.yaml), or a continuous one (arch kl_cnn) with the DiT (gen.generator: dit;
configs/demo_continuous.yaml, `make demo PIPELINE=continuous`). Every stage reads its settings from the resolved
config (the DiT, the latent cache's post_strength, ...), so the stages run with the same flags either way; a config
that pairs the wrong generator with its tokenizer is refused before the main stage starts.

Resumable: RUN/pipeline.json records every finished stage and its wall time, CPU time and load average; a re-run
skips those, restarts an unfinished training stage with --resume (the cache stage continues at its first missing
shard), re-evaluates when the evaluation settings (--seeds, --post-seeds, the extractor) changed, and rewrites the
report. The resolved config (with --data and --set applied) is RUN/pipeline_config.yaml; a re-run with another
config is refused (use a new --run-dir, or --fresh to delete the old one).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from tokpost_fast.atomic import atomic_write_json
from tokpost_fast.config import dump_config, load_config, to_dict
from tokpost_fast.data import ImageFolderDataset
from tokpost_fast.data.embedded import build_embedded
from tokpost_fast.metrics.arms import evaluate_arms
from tokpost_fast.metrics.effects import effects
from tokpost_fast.report import write_report
from tokpost_fast.train import main as train_main
from tokpost_fast.training.engine import free_port

log = logging.getLogger("tokpost_fast.pipeline")

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ("deepspeed", "python", "inprocess")
# (stage, the files that exist once it is done, relative to the run folder); the arm stages come from arm_stages()
BASE_STAGES = (("data", ()), ("main", ("tokenizer.pt",)), ("gen", ("generator.pt",)), ("cache", ("cache/index.json",)))
TAIL_STAGES = (("evaluate", ("eval/arms.json",)), ("report", ("report.md",)))
RESUMABLE = {"main": "checkpoints", "gen": "gen/checkpoints"}
# the post stage's grids per arm: the method trains on the generated grids, the control on the clean ones
ARM_GRIDS = {"post": "generated", "control": "clean"}
PFID_CURVE = (0.0, 0.5, 1.0)    # the pipeline's pFID curve points (alpha, or noise): 0 is rFID, 1 the default pFID
GENERATOR_OF = {"vq": "ar", "continuous": "dit"}    # pipeline kind -> the gen.generator it needs


def pipeline_kind(cfg) -> str:
    """"continuous" for a KL tokenizer (with a DiT), "vq" otherwise (with the AR generator); a config that pairs a
    tokenizer with the other kind's generator is an error naming both fields."""
    kind = "continuous" if cfg.tokenizer.is_continuous else "vq"
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
        keys = ("seconds", "cpu_seconds", "load_average", "load_average_max")
        return {name: {k: rec.get(k) for k in keys} for name, rec in self.data["stages"].items()}


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# --- stages -------------------------------------------------------------------------------------------------------
def child_env(threads: int) -> dict:
    """The environment of a stage process: no inherited rank variables, this repo importable, `threads` intra-op
    threads per rank."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def arm_stages(post_seeds: int) -> list[tuple[str, str, int]]:
    """[(stage name, arm, post-training seed offset)]: post and control for seed offset 0, then post_s<k> and
    control_s<k> for k = 1 .. post_seeds - 1."""
    return [(arm if k == 0 else f"{arm}_s{k}", arm, k) for k in range(post_seeds) for arm in ("post", "control")]


def pipeline_stages(post_seeds: int) -> list[tuple[str, tuple[str, ...]]]:
    return (list(BASE_STAGES) + [(name, (f"tokenizer_{name}.pt",)) for name, _, _ in arm_stages(post_seeds)]
            + list(TAIL_STAGES))


def arm_overrides(cfg, name: str, arm: str, offset: int) -> list[str]:
    """The --set flags of one arm's post stage: its output name, its grids, its seed."""
    return [f"post.name={name}", f"post.grids={ARM_GRIDS[arm]}", f"post.seed={cfg.post.seed + offset}"]


def arm_checkpoints(post_seeds: int) -> dict[str, list[str]]:
    """{arm: [checkpoint file, ...]} in the order main, control, post."""
    arms = {"main": ["tokenizer.pt"], "control": [], "post": []}
    for name, arm, _ in arm_stages(post_seeds):
        arms[arm].append(f"tokenizer_{name}.pt")
    return arms


def run_training_stage(stage: str, config: Path, run_dir: Path, launcher: str, ranks: int, resume: bool,
                       overrides: Sequence[str] = ()) -> None:
    args = ["--stage", stage, "--config", str(config), "--run-dir", str(run_dir)] + (["--resume"] if resume else [])
    args += [item for value in overrides for item in ("--set", value)]
    if launcher == "inprocess":
        train_main(args)
        return
    train_py = str(REPO_ROOT / "tokpost_fast" / "train.py")
    if launcher == "deepspeed":
        deepspeed = Path(sys.executable).with_name("deepspeed")
        cmd = [str(deepspeed) if deepspeed.exists() else "deepspeed", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), train_py, *args]
    else:
        cmd = [sys.executable, train_py, *args]
    threads = max(1, (os.cpu_count() or 1) // (ranks if launcher == "deepspeed" else 1))
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=child_env(threads))
    if done.returncode != 0:
        raise SystemExit(f"pipeline: stage {stage} failed (exit {done.returncode}): {' '.join(cmd)}")


def run_job_stage(name: str, cfg, config: Path, run_dir: Path, launcher: str, ranks: int, arms: dict,
                  data_root: Path) -> Optional[dict]:
    """Run `name` when it is the data stage, a training stage (main, gen, cache; main and gen resume from their
    newest checkpoint) or a post-training arm of `arms` ({name: (arm, offset)}, from arm_stages): returns what the
    stage adds to its pipeline.json record. None: `name` is none of these (evaluate, report), nothing ran."""
    if name == "data":
        return ensure_data(data_root)
    if name in RESUMABLE or name == "cache":
        resume = name in RESUMABLE and (run_dir / RESUMABLE[name] / "latest").is_file()
        run_training_stage(name, config, run_dir, launcher, ranks, resume)
        return {}
    if name in arms:
        resume = (run_dir / name / "checkpoints" / "latest").is_file()
        run_training_stage("post", config, run_dir, launcher, ranks, resume, arm_overrides(cfg, name, *arms[name]))
        return {}
    return None


def ensure_data(root: Path) -> dict:
    """The image folder; the embedded set (a folder named `embedded`) is built when missing (make data)."""
    if root.is_dir():
        return {"root": str(root), "built": False}
    if root.name != "embedded":
        raise SystemExit(f"pipeline: image folder {root} does not exist (only the embedded set, data/embedded, is "
                         "built on demand)")
    manifest = build_embedded(str(root))
    return {"root": str(root), "built": True, "images": manifest["num_images"]}


def heldout_images(cfg, total: Optional[int]):
    """(images [N, 3, S, S] in [-1, 1], labels [N], split record) of the held-out split: `total` images (None: all)
    spread evenly over the classes, and evenly within each class."""
    dataset = ImageFolderDataset(cfg.data, train=False, seed=0, epoch=0, split="val")
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
    split = {"how": dataset.split_how, "train_images": dataset.split_sizes["train"],
             "val_images": dataset.split_sizes["val"], "measured": len(chosen), "classes": len(by_class)}
    return images, labels, split


def run_evaluate(cfg, run_dir: Path, settings: dict, progress: bool = True) -> dict:
    """metrics/arms.py on every arm's checkpoints -> RUN/eval/arms.json; returns its summary of the effect."""
    # Inception convolutions use both cores; the generator's sampler sets itself to one (metrics/arms.py)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    eval_cfg = dataclasses.replace(cfg.eval, extractor=settings["extractor"])
    cfg = dataclasses.replace(cfg, eval=eval_cfg)
    images, labels, split = heldout_images(cfg, cfg.eval.num)
    seeds = [cfg.eval.gen_seed + k for k in range(settings["seeds"])]
    result = evaluate_arms(run_dir, arm_checkpoints(settings["post_seeds"]), cfg, images, labels, seeds,
                           curve=PFID_CURVE, progress=progress, inception_weights=settings["inception_weights"],
                           split=split)
    torch.set_num_threads(1)
    found = effects(result["arms"])
    return {m: {"fid": e["fid"]["mean"], "kid": e["kid"]["mean"]} for m, e in found.items()}


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
    p.add_argument("--seeds", type=int, default=None,
                   help="evaluation seeds (generation and pFID perturbation), default the config's eval.seeds")
    p.add_argument("--post-seeds", type=int, default=1,
                   help="post-train the control and post arms this many times (post.seed, post.seed + 1, ...)")
    p.add_argument("--extractor", choices=("inception", "proxy"), default=None,
                   help="inception (default: the FID Inception, bundled weights) or proxy (tests only, NOT FID)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="the pt_inception-2015-12-05 weights file (adds IS); default: the bundled weights (no IS)")
    p.add_argument("--fresh", action="store_true", help="delete RUN_DIR first")
    args = p.parse_args(argv)
    check_counts(p, args, ("seeds", "post_seeds"))
    return args


def check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Sequence[str]) -> None:
    """Refuse a count flag (--seeds, ...) below 1 with argparse's one-line usage error; None means "the config's"."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")


class LoadSampler:
    """The 1-minute load average sampled every few seconds while a stage runs: mean and max. Besides the stage's
    own processes (2 ranks on 2 cores: ~2), anything above the core count is other work slowing it down."""

    def __init__(self, every: float = 5.0):
        self.every, self.samples, self.stop = every, [os.getloadavg()[0]], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.samples.append(os.getloadavg()[0])

    def record(self) -> dict:
        return {"load_average": round(sum(self.samples) / len(self.samples), 2),
                "load_average_max": round(max(self.samples), 2)}


def main(argv: Optional[Sequence[str]] = None) -> dict:
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
    eval_settings = {"seeds": args.seeds or cfg.eval.seeds, "post_seeds": args.post_seeds,
                     "extractor": args.extractor or cfg.eval.extractor,
                     "inception_weights": os.path.abspath(args.inception_weights) if args.inception_weights else None}
    print(f"pipeline: {run_dir} ({kind}: {cfg.tokenizer.arch} tokenizer + {cfg.gen.generator} generator; "
          f"{args.launcher}, {ranks} rank(s)); config {config_path}", flush=True)

    torch.set_num_threads(1)             # this process evaluates (run_evaluate sets its own threads) and reports
    results: dict = {}
    arms = {name: (arm, offset) for name, arm, offset in arm_stages(args.post_seeds)}
    for name, outputs in pipeline_stages(args.post_seeds):
        stale = name == "evaluate" and state.data["stages"].get(name, {}).get("settings") != eval_settings
        if name != "report" and not stale and state.done(name, outputs, run_dir):
            print(f"pipeline: {name}: done ({state.seconds()[name]:.0f} s), skipped", flush=True)
            continue
        print(f"pipeline: {name} ...", flush=True)
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        with LoadSampler() as load:
            extra = run_job_stage(name, cfg, config_path, run_dir, args.launcher, ranks, arms, data_root)
            if extra is None and name == "evaluate":
                extra = {"effects": run_evaluate(cfg, run_dir, eval_settings), "settings": eval_settings}
            elif extra is None:
                extra = {}
                results = write_report(run_dir, cfg, state.timing(), ranks=ranks, launcher=args.launcher,
                                       cores=os.cpu_count(), post_seeds=args.post_seeds)
        # CPU seconds (this process and its stage processes) and the load average tell a slow stage on a busy
        # machine from a slow stage: on an idle machine wall time ~ CPU time / cores.
        state.record(name, time.perf_counter() - t0, cpu_seconds=round(cpu_seconds() - cpu0, 1), **load.record(),
                     **extra)
        print(f"pipeline: {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    total = sum(v for k, v in state.seconds().items())
    print(f"pipeline: done in {total:.0f} s of stage time; report {run_dir / 'report.md'}", flush=True)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    main()
