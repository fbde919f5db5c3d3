"""The paper's three claims as a replication benchmark, at whatever scale the machine allows.

    python benchmarks/replicate_paper.py --config configs/demo.yaml [--data ROOT] [--seeds N] [--train-seeds M]
        [--members off,half,paper,delta10] [--budget cpu-hour|config] [--runs-root runs/replicate] [--set key=value ...]
        [--launcher deepspeed|python|inprocess] [--extractor inception|proxy] [--out-dir benchmarks/results]
        [--machine NAME] [--date YYYY-MM-DD] [--no-post] [--plan]
    python benchmarks/replicate_paper.py --config configs/demo_continuous.yaml     # the KL tokenizer + DiT family
    python benchmarks/replicate_paper.py --config configs/vq16.yaml --plan         # paper size: GPUs only

Trains a FAMILY of tokenizers that differ only in their robustness setting (FAMILIES below: perturbation off,
the config's schedule = the paper's, and another strength), a generator on each, and measures every member on the
held-out split with the demo pipeline's own stages (tokpost_fast/pipeline.py: each member is one run folder,
RUNS_ROOT/<config>/<member>, trained by the same `train.py --stage X` processes with --set overrides). The
paper's member also runs post-training and its control (post.grids=clean). Per member: rFID, pFID (continuous: the
perturbed-latent FID, our analogue), gFID with KIDs over the evaluation seeds (metrics/arms.py), and for a
continuous tokenizer iFID (metrics/ifid.py). Then the three claims (benchmarks/replicate_report.py):
  1. perturbation in main training lowers gFID (off vs paper, gFID over the evaluation seeds);
  2. pFID ranks tokenizers as gFID does and rFID does not (Spearman / Kendall over the members, with exact
     permutation p-values: with 3 members they can barely say anything, and the report says so);
  3. post-training beats its control (post - control, metrics/effects.py's paired noise rule).
Writes OUT_DIR/replicate-<machine>-<date>.json (one section per config: every number, the settings, seeds, wall
times, versions; a second config's run adds its section) and OUT_DIR/replicate-<machine>-<date>/report.md with its
plots. Resumable: every member's stages are recorded in its pipeline.json; a re-run skips finished members (and
finished stages of an unfinished one) and rewrites the JSON and the report.

--budget cpu-hour (the default without a GPU) sizes the evaluation for a 2-core CPU: 128 held-out images, 128
generated per seed, 3 seeds (the training stages keep the config's sizes); --budget config keeps every size of the
config (what a GPU run of configs/vq16.yaml uses). The spread over seeds is that of the evaluation (generation
and perturbation draws); the run-to-run noise of training shows only with --train-seeds M > 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tokpost_fast.atomic import atomic_write_json  # noqa: E402
from tokpost_fast.pipeline import (  # noqa: E402
    LoadSampler, PipelineState, arm_checkpoints, arm_stages, check_counts, cpu_seconds, heldout_images, pipeline_kind,
    run_job_stage,
)


class Member(NamedTuple):
    name: str
    overrides: tuple
    description: str
    post: bool = False          # also post-train and its control


# perturbation off is beta = 0 (no sample of a batch decodes a perturbed latent), for either kind
FAMILIES = {
    "vq": (Member("off", ("perturb.beta=0",), "no latent perturbation (perturb.beta 0)"),
           Member("half", ("perturb.alpha=0.5",), "half the paper's rate: alpha 0.5, the config's delta"),
           Member("paper", (), "the config's schedule (the paper's: alpha 1, delta 100, annealed to 0.5)", post=True)),
    "continuous": (Member("off", ("perturb.beta=0",), "no latent noise (perturb.beta 0)"),
                   Member("paper", (), "the config's latent noise (perturb.noise 0.5), our analogue of the "
                                       "paper's schedule", post=True),
                   Member("strong", ("perturb.noise=1.0",), "twice the latent noise (perturb.noise 1.0)")),
}
# members a user may add with --members (not in the default family: a 2-core CPU has time for three)
EXTRA = {"vq": (Member("delta10", ("perturb.delta=10",), "the paper's rate among only the 10 nearest codes"),
                Member("delta400", ("perturb.delta=400",), "the paper's rate among the 400 nearest codes")),
         "continuous": (Member("mild", ("perturb.noise=0.25",), "half the latent noise (perturb.noise 0.25)"),
                        Member("noise2", ("perturb.noise=2.0",), "four times the latent noise (perturb.noise 2.0)"))}
BUDGETS = {"config": (), "cpu-hour": ("eval.num=128", "eval.num_generated=128", "eval.seeds=3")}
STAGE_OUTPUTS = {"data": (), "main": ("tokenizer.pt",), "gen": ("generator.pt",), "cache": ("cache/index.json",),
                 "post": ("tokenizer_post.pt",), "control": ("tokenizer_control.pt",),
                 "evaluate": ("eval/arms.json",), "ifid": ("eval/ifid.json",)}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/replicate_paper.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml", help="the pipeline config every member starts from")
    p.add_argument("--data", default=None, help="ImageFolder root (default: the config's data.root)")
    p.add_argument("--seeds", type=int, default=None, help="evaluation seeds (default: the budget's, else eval.seeds)")
    p.add_argument("--train-seeds", type=int, default=1,
                   help="train every member this many times (train.seed, gen.seed + k): the training noise")
    p.add_argument("--members", default=None,
                   help="comma-separated member names (default: the family of the config's kind; extra: "
                        + ", ".join(f"{k}: {','.join(m.name for m in v)}" for k, v in EXTRA.items()) + ")")
    p.add_argument("--budget", choices=tuple(BUDGETS), default=None,
                   help="cpu-hour (default without a GPU): small evaluation sizes; config: the config's sizes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every member (repeatable)")
    p.add_argument("--runs-root", default="runs/replicate", help="member run folders: RUNS_ROOT/<config>/<member>")
    p.add_argument("--launcher", choices=("deepspeed", "python", "inprocess"), default="deepspeed")
    p.add_argument("--ranks", type=int, default=None, help="deepspeed ranks (default: 2 on a CPU, else the GPUs)")
    p.add_argument("--extractor", choices=("inception", "proxy"), default=None,
                   help="inception (default; the FID Inception) or proxy (tests only: NOT FID)")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--machine", default=None, help="name in the output file (default cpu-<n>core / gpu-<n>x<name>)")
    p.add_argument("--date", default=None, help="date in the output file (default today, UTC)")
    p.add_argument("--no-post", action="store_true",
                   help="skip post-training and its control on every member (a later run without it adds them)")
    p.add_argument("--plan", action="store_true", help="resolve and check every member's config, print the plan, "
                                                        "run nothing")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    check_counts(p, args, ("seeds", "train_seeds"))
    return args


def machine_name() -> str:
    import torch

    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0).split()[-1].lower()
        return f"gpu-{torch.cuda.device_count()}x{gpu}"
    return f"cpu-{os.cpu_count()}core"


def versions() -> dict:
    import platform
    import subprocess

    import torch
    import torch_fidelity

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__,
            "git_commit": commit or None}


def family(kind: str, names: Optional[str]) -> list[Member]:
    known = {m.name: m for m in FAMILIES[kind] + EXTRA[kind]}
    if names is None:
        return list(FAMILIES[kind])
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown or not chosen:
        raise SystemExit(f"replicate: --members {names!r}: unknown {unknown}; the {kind} members are "
                         f"{', '.join(known)}")
    return [known[n] for n in chosen]


class Plan(NamedTuple):
    member: Member
    ident: str                  # run folder name: the member, -t<k> for training seed k > 0
    train_seed: int
    overrides: list
    cfg: object
    stages: list


def build_plan(args, config: Path, data_root: Optional[Path]) -> tuple[str, list[Plan]]:
    """Every member's resolved, checked config; the kind of the family."""
    import torch

    from tokpost_fast.config import load_config

    budget = args.budget or ("config" if torch.cuda.is_available() else "cpu-hour")
    args.budget = budget
    common = list(BUDGETS[budget]) + (["eval.seeds=%d" % args.seeds] if args.seeds else []) + list(args.overrides)
    if data_root is not None:
        common.append(f"data.root={data_root}")
    base = load_config(config, common)
    kind = pipeline_kind(base)
    plans = []
    for member in family(kind, args.members):
        for k in range(args.train_seeds):
            seeds = [f"train.seed={base.train.seed + k}", f"gen.seed={base.gen.seed + k}"] if k else []
            overrides = common + list(member.overrides) + seeds
            cfg = load_config(config, overrides)
            post = member.post and not args.no_post
            stages = ["data", "main", "gen"] + (["cache", "post", "control"] if post else []) + ["evaluate"]
            if kind == "continuous":
                stages.append("ifid")
            plans.append(Plan(member, member.name if k == 0 else f"{member.name}-t{k}", k, overrides, cfg, stages))
    return kind, plans


def evaluate_member(plan: Plan, run_dir: Path, arms: dict, extractor: str, progress: bool) -> dict:
    """metrics/arms.py on the member's arms (no pFID curve: the study compares members at the config's pFID)."""
    import torch

    from tokpost_fast.metrics.arms import evaluate_arms

    cfg = dataclasses.replace(plan.cfg, eval=dataclasses.replace(plan.cfg.eval, extractor=extractor))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    images, labels, split = heldout_images(cfg, cfg.eval.num)
    seeds = [cfg.eval.gen_seed + k for k in range(cfg.eval.seeds)]
    result = evaluate_arms(run_dir, arms, cfg, images, labels, seeds, curve=(), progress=progress, split=split)
    torch.set_num_threads(1)
    return {"seconds_inside": result["seconds"]}


def ifid_member(plan: Plan, run_dir: Path, arms: dict, extractor: str, progress: bool) -> dict:
    """iFID of every checkpoint of the member (one deterministic draw each) -> RUN/eval/ifid.json."""
    import torch

    from tokpost_fast.metrics.extractor import build_extractor
    from tokpost_fast.metrics.features import (
        cached_real_stats, extract_features, fid_between, fid_statistics, fingerprint, images_to_uint8, kid_between,
    )
    from tokpost_fast.metrics.ifid import IFIDSettings, ifid_features
    from tokpost_fast.models.tokenizer import load_tokenizer

    cfg = plan.cfg
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    images, _, _ = heldout_images(cfg, cfg.eval.num)
    model, info = build_extractor(cfg.eval.inception_weights, "cpu", extractor, cfg.eval.feature_precision)
    # the same fingerprint as metrics/arms.py: the real statistics its evaluate stage cached are reused
    digest = hashlib.sha256(images_to_uint8(images).contiguous().numpy().tobytes()).hexdigest()
    data_fingerprint = fingerprint({"val_images": list(images.shape), "sha256": digest})
    real, _ = cached_real_stats(str(run_dir / "fid_stats"), info, data_fingerprint,
                                lambda: extract_features(images, model, info, "cpu", None, progress, "real images"))
    settings = IFIDSettings(cfg.eval.ifid_t, cfg.eval.ifid_interpolation, cfg.eval.ifid_distance)
    out = {"settings": settings.as_dict(), "images": len(images), "reference": "the measured held-out images",
           "arms": {}}
    for arm, paths in arms.items():
        rows = []
        for path in paths:
            found = ifid_features(load_tokenizer(str(run_dir / path)).eval(), images, model, info, settings,
                                  batch_size=cfg.eval.batch_size, progress=progress)
            features = found["features"][info.fid_layer]
            kid, kid_std = kid_between(features, real.features, 0)
            rows.append({"path": path, "fid": fid_between(fid_statistics(features, "iFID"), real.stats),
                         "kid": kid, "kid_std": kid_std})
        out["arms"][arm] = rows
    atomic_write_json(run_dir / "eval" / "ifid.json", out, indent=1)
    torch.set_num_threads(1)
    return {}


def run_member(plan: Plan, run_dir: Path, args, ranks: int) -> dict:
    """All stages of one member (skipping the finished ones); returns its record for the study JSON."""
    import torch

    from tokpost_fast.config import dump_config, to_dict

    run_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps(to_dict(plan.cfg), sort_keys=True).encode()).hexdigest()
    state = PipelineState(run_dir, digest)
    config_path = run_dir / "pipeline_config.yaml"
    dump_config(plan.cfg, config_path)
    shared = run_dir.parent / "fid_stats"              # real-image statistics: the same held-out images for all
    shared.mkdir(exist_ok=True)
    if not (run_dir / "fid_stats").exists():
        (run_dir / "fid_stats").symlink_to(shared.resolve(), target_is_directory=True)
    extractor = args.extractor or plan.cfg.eval.extractor
    eval_settings = {"extractor": extractor, "seeds": plan.cfg.eval.seeds, "num": plan.cfg.eval.num,
                     "num_generated": plan.cfg.eval.num_generated}
    arms = {arm: paths for arm, paths in arm_checkpoints(1).items() if "post" in plan.stages or arm == "main"}
    eval_settings["arms"] = sorted(arms)            # adding post-training later re-evaluates (reusing the draws)
    arm_names = {name: (arm, offset) for name, arm, offset in arm_stages(1)}
    torch.set_num_threads(1)
    for name in plan.stages:
        stale = name in ("evaluate", "ifid") and state.data["stages"].get(name, {}).get("settings") != eval_settings
        if not stale and state.done(name, STAGE_OUTPUTS[name], run_dir):
            continue
        print(f"replicate: {plan.ident}: {name} ...", flush=True)
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        with LoadSampler() as load:
            extra = run_job_stage(name, plan.cfg, config_path, run_dir, args.launcher, ranks, arm_names,
                                  Path(plan.cfg.data.root))
            if extra is None and name == "evaluate":
                extra = {**evaluate_member(plan, run_dir, arms, extractor, not args.no_progress),
                         "settings": eval_settings}
            elif extra is None:
                extra = {**ifid_member(plan, run_dir, arms, extractor, not args.no_progress), "settings": eval_settings}
        state.record(name, time.perf_counter() - t0, cpu_seconds=round(cpu_seconds() - cpu0, 1), **load.record(),
                     **extra)
        print(f"replicate: {plan.ident}: {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return member_record(plan, run_dir, state, arms)


def member_record(plan: Plan, run_dir: Path, state, arms: dict) -> dict:
    from tokpost_fast.metrics.effects import effects, summarize

    result = json.loads((run_dir / "eval" / "arms.json").read_text())
    ifid_path = run_dir / "eval" / "ifid.json"
    return {"id": plan.ident, "member": plan.member.name, "description": plan.member.description,
            "train_seed": plan.train_seed, "overrides": plan.overrides, "post": "post" in plan.stages,
            "run_dir": str(run_dir), "perturb": dataclasses.asdict(plan.cfg.perturb),
            "arms_files": arms, "summary": summarize(result["arms"]), "effects": effects(result["arms"]),
            "draws": {arm: [{k: rec[k] for k in ("sha256", "rfid", "pfid", "gfid")} for rec in records]
                      for arm, records in result["arms"].items()},
            "ifid": json.loads(ifid_path.read_text()) if ifid_path.is_file() else None,
            "evaluation": {k: result[k] for k in ("proxy", "label", "extractor", "num", "split", "seeds", "settings",
                                                  "mse_gap")},
            "timing": state.timing(), "wall_s": round(sum(state.seconds().values()), 1)}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    import torch

    from replicate_report import analyse, write_report

    args = parse_args(argv)
    config = Path(args.config)
    data_root = Path(args.data).expanduser().resolve() if args.data else None
    kind, plans = build_plan(args, config, data_root)
    if data_root is None:
        data_root = Path(plans[0].cfg.data.root).expanduser().resolve()
        plans = [p._replace(cfg=dataclasses.replace(p.cfg, data=dataclasses.replace(p.cfg.data, root=str(data_root))),
                            overrides=p.overrides + [f"data.root={data_root}"]) for p in plans]
    study_dir = Path(args.runs_root).resolve() / config.stem
    print(f"replicate: {config} ({kind}), budget {args.budget}, {len(plans)} member run(s) under {study_dir}:",
          flush=True)
    for plan in plans:
        print(f"  {plan.ident}: {plan.member.description}; stages {' -> '.join(plan.stages)}; "
              f"--set {' '.join(plan.overrides) or '(none)'}", flush=True)
    if args.plan:
        return {"kind": kind, "members": [p.ident for p in plans], "budget": args.budget}
    ranks = args.ranks or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    if args.launcher != "deepspeed":
        ranks = 1
    started = time.perf_counter()
    records = []
    for i, plan in enumerate(plans, 1):
        run_dir = study_dir / plan.ident
        state_file = run_dir / "pipeline.json"
        finished = state_file.is_file() and all(
            s in json.loads(state_file.read_text())["stages"] for s in plan.stages)
        print(f"replicate: [{i}/{len(plans)}] {plan.ident}{': done, skipped' if finished else ''}", flush=True)
        records.append(run_member(plan, run_dir, args, ranks))
    date = args.date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    name = f"replicate-{args.machine or machine_name()}-{date}"
    out_json = Path(args.out_dir) / f"{name}.json"
    saved = json.loads(out_json.read_text()) if out_json.is_file() else {"benchmark": "replicate_paper", "studies": {}}
    study = {"command": "python benchmarks/replicate_paper.py " + " ".join(sys.argv[1:] if argv is None else argv),
             "config": str(config), "kind": kind, "budget": args.budget, "budget_overrides": list(BUDGETS[args.budget]),
             "seeds": plans[0].cfg.eval.seeds, "train_seeds": args.train_seeds, "launcher": args.launcher,
             "ranks": ranks, "data_root": str(data_root), "members": records,
             "wall_s_this_invocation": round(time.perf_counter() - started, 1),
             "wall_s_stages": round(sum(r["wall_s"] for r in records), 1),
             "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    study["analysis"] = analyse(study)
    saved["studies"][config.stem] = study
    saved.update({"machine": {"name": args.machine or machine_name(), "cpu_count": os.cpu_count(),
                              "cuda": torch.cuda.is_available()}, "date": date, "versions": versions()})
    out_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_json, saved, indent=1)
    report = write_report(saved, Path(args.out_dir) / name)
    print(f"replicate: {out_json}; report {report}", flush=True)
    return saved


if __name__ == "__main__":
    main()
