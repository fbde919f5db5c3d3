"""The demo pipeline's report: RUN/report.md + report.json + PNGs, from what the stages left in the run folder.

    three arms          main (RUN/tokenizer.pt), control (RUN/tokenizer_control.pt: post-trained on clean grids,
                        sigma = 1) and post (RUN/tokenizer_post.pt: on the cached generated grids, the method), all
                        decoding the same generator's samples, measured on held-out images (RUN/eval/arms.json,
                        metrics/arms.py): rFID, pFID, gFID with KID beside each, mean and spread over the seeds
    the effect          post - control over paired draws, with the noise rule of metrics/effects.py
    decoder diagnostic  MSE to the real held-out image on grids made as the cache makes them and on clean grids
    pfid_curve.png      pFID vs alpha (continuous: the perturbed-latent FID vs noise) of each arm
    samples_*.png       the same generated samples decoded by each arm (samples_compare.png: per class a row each)
    loss_curves.png     main, gen, post and control losses from their log.jsonl
    codebook usage      VQ runs: codebook_usage.png (used codes, dead codes, perplexity over main training), the
                        tokenizer's codes on the held-out images, the cache's generated vs clean grids
    wall time of each stage (RUN/pipeline.json), with CPU time and the load average while it ran
A continuous run (KL tokenizer + DiT) gets the same report: "pFID" is the perturbed-latent FID, our analogue
(metrics/latent_noise.py), the samples are DiT latents and the cache holds denoised latents.
The report states what was measured, whichever way it came out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from tokpost_fast.atomic import atomic_write_json, atomic_write_text, atomic_write_with
from tokpost_fast.images import save_image_grid
from tokpost_fast.metrics.codebook_usage import cache_usage, plot_usage, read_log, tokenizer_usage, usage_series
from tokpost_fast.metrics.effects import effect_sentence, effects, summarize
from tokpost_fast.metrics.pfid import CURVE_AXES
from tokpost_fast.models.generator import decode_samples, load_generator
from tokpost_fast.models.tokenizer import load_tokenizer

NAMES = {"rfid": "rFID", "pfid": "pFID", "gfid": "gFID"}
CONTINUOUS_NAMES = {**NAMES, "pfid": "perturbed-latent FID (our pFID analogue)"}
ARMS = ("main", "control", "post")


def _rows(path: Path) -> list[dict]:
    """The rows of a stage's log.jsonl; none when the stage did not run."""
    return read_log(path) if path.is_file() else []


def plot_loss_curves(run_dir: Path, out: Path, arms: tuple[str, ...] = ("post", "control")) -> dict:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, no display needed

    logs = {"main": run_dir / "log.jsonl", "gen": run_dir / "gen" / "log.jsonl",
            **{arm: run_dir / arm / "log.jsonl" for arm in arms}}
    series = {}
    fig = Figure(figsize=(3.6 * len(logs), 3.2), dpi=110)
    axes = fig.subplots(1, len(logs))
    for ax, (stage, path) in zip(axes, logs.items()):
        rows = [r for r in _rows(path) if "loss" in r and "event" not in r]
        for key in ("loss", "rec_loss", "disc_loss"):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), label=key)
                series[f"{stage}/{key}"] = points
        ax.set_title(f"{stage} ({path.relative_to(run_dir)})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if rows:
            ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_with(out, lambda tmp: fig.savefig(tmp, format="png"))
    return {k: {"first": v[0][1], "last": v[-1][1], "steps": v[-1][0]} for k, v in series.items()}


def plot_pfid_curves(curves: dict[str, list[dict]], label: str, title: str, out: Path, x: str = "alpha") -> None:
    """curves: {arm: [{"x", "fid", ...}]} (the first checkpoint of each arm, first seed)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, no display needed

    fig = Figure(figsize=(4.8, 3.4), dpi=120)
    ax = fig.subplots()
    for arm, points in curves.items():
        if points:
            ax.plot([p["x"] for p in points], [p["fid"] for p in points], marker="o", label=arm)
    ax.set_xlabel(CURVE_AXES[x][0])
    ax.set_ylabel(CURVE_AXES[x][1] + label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write_with(out, lambda tmp: fig.savefig(tmp, format="png"))


@torch.no_grad()
def sample_grids(run_dir: Path, arms: dict[str, str], seed: int, per_class: int = 6, max_classes: int = 8) -> dict:
    """The first evaluation seed's generated samples (RUN/eval/samples-seed<S>.pt: what gFID measured), decoded by
    each arm: samples_<arm>.png and samples_compare.png (per class one row per arm, in the order of `arms`)."""
    codes = torch.load(run_dir / "eval" / f"samples-seed{seed}.pt", map_location="cpu", weights_only=False)["codes"]
    num_classes = load_generator(run_dir / "generator.pt").config.num_classes
    classes = min(max_classes, num_classes)
    per_class = max(1, min(per_class, len(codes) // num_classes))
    # the samples are class-balanced (labels 0, 1, ..., C-1, 0, ...): row c takes the first per_class of class c
    pick = torch.tensor([c + k * num_classes for c in range(classes) for k in range(per_class)])
    pick = pick[pick < len(codes)]
    images, files = {}, {}
    for arm, name in arms.items():
        images[arm] = decode_samples(load_tokenizer(str(run_dir / name)).eval(), codes[pick]).clamp(-1, 1)
        files[arm] = f"samples_{arm}.png"
        save_image_grid(run_dir / files[arm], images[arm], nrow=per_class)
    if len(pick) == classes * per_class:
        stacked = torch.stack([images[a].view(classes, per_class, *images[a].shape[1:]) for a in arms], dim=1)
        files["compare"] = "samples_compare.png"
        save_image_grid(run_dir / files["compare"], stacked.flatten(0, 2), nrow=per_class)
    return {"classes": classes, "per_class": per_class, "seed": seed, "files": files, "order": list(arms)}


def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _cell(stat: dict, digits: int = 4) -> str:
    """'mean +- std (n)' or 'value'."""
    if stat is None:
        return "-"
    if stat["std"] is None:
        return _fmt(stat["mean"], digits)
    return f"{_fmt(stat['mean'], digits)} ± {_fmt(stat['std'], 2)} (n={stat['n']})"


def _effect_cell(effect: Optional[dict], what: str) -> tuple[str, str]:
    if effect is None:
        return "-", "-"
    e = effect[what]
    std = f" ± {_fmt(e['std'], 2)}" if e["std"] is not None else ""
    v = e["verdict"]
    judged = ("no noise estimate (one draw)" if v["beyond_noise"] is None else
              f"{'**beyond**' if v['beyond_noise'] else 'within'} noise (> {_fmt(v['threshold'], 3)})")
    return f"{e['mean']:+.4g}{std}", judged


def _mse_lines(gap: dict, continuous: bool) -> list[str]:
    what = "latents" if continuous else "grids"
    if gap["kind"] == "latents":
        made = (f"denoised by the DiT from post_strength {gap['post_strength']} (they differ from the clean latents "
                f"by {100 * gap['relative_change']:.1f} %, relative L2)")
    else:
        made = (f"teacher-forced at sigma {gap['sigma']} ({100 * gap['keep_fraction']:.1f} % tokens kept; "
                f"{100 * gap['changed_fraction']:.1f} % differ from the clean grid)")
    lines = [f"Decoder MSE to the real image on {gap['images']} **held-out** images (never cached, never trained on): "
             f"{what} made the way the post-training cache makes them, {made}, and the clean {what} of the same "
             "images. The gap generated - clean is the decoder's sensitivity to generator-made codes, what "
             "post-training is meant to shrink.", "",
             f"| arm | MSE on generated {what} | MSE on clean {what} | gap |", "|---|---|---|---|"]
    for arm, rows in gap["arms"].items():
        mean = lambda key: sum(r[key] for r in rows) / len(rows)   # noqa: E731
        lines.append(f"| {arm} | {mean('generated'):.4f} | {mean('clean'):.4f} | {mean('gap'):+.4f} |")
    return lines


def headline(gfid: dict, post_seeds: int) -> str:
    """The outcome on gFID (FID and KID) in one sentence, by the noise rule of metrics/effects.py."""
    def outcome(what: str) -> str:
        e = gfid[what]
        v = e["verdict"]["beyond_noise"]
        if v is None:
            return f"{what.upper()} {e['mean']:+.4g} (one draw: no noise estimate; use --seeds)"
        if not v:
            return f"{what.upper()} {e['mean']:+.4g}, within the noise"
        return f"{what.upper()} {e['mean']:+.4g}, {'post' if e['mean'] < 0 else 'control'} better beyond the noise"
    post_wins = all(gfid[w]["verdict"]["beyond_noise"] and gfid[w]["mean"] < 0 for w in ("fid", "kid"))
    noise = "the noise" if post_seeds > 1 else "the evaluation noise (one post-training seed)"
    return ("Post-training on generated grids " + ("beats" if post_wins else "does not beat") + " the control arm "
            f"(the same decoder training on clean grids) on generated images by more than {noise}: gFID post - "
            f"control: {outcome('fid')}; its KID: {outcome('kid')}.")


def versus_main(summary: dict, names: dict) -> str:
    """How far each post-trained arm moved from main (no post-training), per metric (means over draws)."""
    parts = []
    for metric, name in names.items():
        if all(metric in summary.get(arm, {}) for arm in ("main", "control", "post")):
            base = summary["main"][metric]["fid"]["mean"]
            moved = ", ".join(f"{arm} {summary[arm][metric]['fid']['mean'] - base:+.4g}" for arm in ("control", "post"))
            parts.append(f"{name.split(' ')[0]} {moved}")
    return "Against main (no post-training), FID moved: " + "; ".join(parts) + " (negative = better)."


def codebook_section(run_dir: Path, cfg) -> tuple[list[str], dict]:
    """VQ runs: the codebook usage of the main stage over training (codebook_usage.png), of the exported tokenizer
    on the held-out images, and of the cached generated grids against the clean grids of the same images."""
    K, numbers = cfg.tokenizer.codebook_size, {}
    md = ["## Codebook usage", ""]
    series = usage_series(read_log(run_dir / "log.jsonl")) if (run_dir / "log.jsonl").is_file() else {"step": []}
    if series["step"]:
        plot_usage(series, run_dir / "codebook_usage.png", K, title="codebook usage in main training")
        numbers["training_last"] = {k: v[-1] for k, v in series.items()}
        md += [f"Main training (codebook.restart_dead = {cfg.codebook.restart_dead}, codebook.init = "
               f"{cfg.codebook.init}): ![codebook usage](codebook_usage.png)", ""]
    numbers["tokenizer_val"] = tok = tokenizer_usage(run_dir, split="val")
    numbers["cache"] = cache = cache_usage(run_dir / "cache", K)
    md += [f"Codes of K = {K} used by RUN/tokenizer.pt on the {tok['images']} held-out images: {tok['used']} "
           f"(perplexity {tok['perplexity']:.1f}). The post-training cache ({cache['rows']} train images, "
           f"{100 * cache['resampled_fraction']:.1f} % of the tokens resampled by the generator, "
           f"{100 * cache['changed_fraction']:.1f} % differing from the clean grid):", "",
           "| grids | codes used | perplexity | top code's share |", "|---|---|---|---|"]
    for name, key in (("clean (sigma = 1, the control's input)", "clean"), ("generated (the method's input)",
                      "generated"), ("clean, resampled positions only", "clean_at_resampled"),
                      ("generated, resampled positions only", "generated_at_resampled")):
        u = cache[key]
        md.append(f"| {name} | {u['used']} | {u['perplexity']:.1f} | {u['top_code_share']:.3f} |")
    md += ["", f"Codes the generated grids use that no clean grid does: {cache['new_codes_in_generated']}.", ""]
    return md, numbers


def write_report(run_dir: Path, cfg, timing: dict, ranks: int = 1, launcher: str = "deepspeed",
                 cores: Optional[int] = None, post_seeds: int = 1) -> dict:
    """timing: {stage: {"seconds", "cpu_seconds", "load_average", "load_average_max"}} of the stages run so far."""
    run_dir = Path(run_dir)
    continuous = cfg.tokenizer.is_continuous
    names = CONTINUOUS_NAMES if continuous else NAMES
    result = json.loads((run_dir / "eval" / "arms.json").read_text())
    proxy, label = result["proxy"], " (proxy)" if result["proxy"] else ""
    summary, effect = summarize(result["arms"]), effects(result["arms"])
    axis = result["curve_axis"]
    curves = {arm: records[0]["curve"] for arm, records in result["arms"].items()}
    title = ("perturbed-latent FID vs noise (our pFID analogue)" if continuous else
             f"pFID vs alpha (delta = {result['settings']['pfid'].get('delta')})")
    plot_pfid_curves(curves, label, title, run_dir / "pfid_curve.png", x=axis)
    losses = plot_loss_curves(run_dir, run_dir / "loss_curves.png")
    samples = sample_grids(run_dir, {arm: Path(records[0]["path"]).name for arm, records in result["arms"].items()},
                           result["seeds"][0])
    post_rows = [r for r in _rows(run_dir / "post" / "log.jsonl") if r.get("event") == "exported"]
    post_steps = post_rows[-1]["step"] if post_rows else None
    split, pfid, gen = result["split"], result["settings"]["pfid"], result["settings"]["generation"]

    md = [f"# tokpost_fast {'continuous (KL tokenizer + DiT) ' if continuous else ''}demo report", "",
          f"Run folder `{run_dir}`; launcher {launcher}, {ranks} rank(s); config `pipeline_config.yaml`.", ""]
    if proxy:
        md += ["**All FIDs here are PROXY values** (`--extractor proxy`): features of a randomly initialised conv "
               "net, for tests. They are not FID.", ""]
    else:
        md += [f"FID and KID: {result['extractor']['note']}. KID (unbiased; mean ± std over random subsets of half "
               "the images) stands beside every FID because FID is biased at this number of images."
               + (f" Inception Score: {result['extractor']['inception_score']}."
                  if result["extractor"]["inception_score"] else ""), ""]
    md += [f"Held-out images: **{split.get('measured', result['num']['real'])}** of the "
           f"{split.get('val_images', '?')}-image val split ({split.get('how', '?')}); the tokenizer, the generator, "
           f"the cache and post-training read only the {split.get('train_images', '?')} train images. Generated: "
           f"{result['num']['generated']} class-balanced samples per seed, the same samples decoded by every arm "
           f"(sampling {gen}). Seeds: {result['seeds']}.", "",
           (f"pFID here is the perturbed-latent FID (**our analogue, not the paper's VQ pFID**: Gaussian noise of "
            f"{pfid['noise']:g} x each image's latent std)" if continuous else
            f"pFID: alpha {pfid['alpha']:g}, delta {pfid['delta']}") + ", one perturbation seed per seed above.", "",
           f"Arms: **main** = RUN/tokenizer.pt; **control** = its decoder post-trained {post_steps} steps (global "
           f"batch {cfg.post.global_batch_size}, lr {cfg.post.lr:g}, EMA {cfg.post.ema_decay}, GAN from step "
           f"{cfg.post.disc_start}, fresh discriminator) on the **clean** grids of the cached images (sigma = 1); "
           f"**post** = the same recipe on the cached **generated** grids (the method, "
           + (f"post_strength {cfg.cache.post_strength}" if continuous else f"sigma {cfg.cache.sigma}")
           + f"). Post-training seeds per arm: {post_seeds}.", "",
           "## main / control / post", "",
           "| metric | main | control | post | post - control | noise |", "|---|---|---|---|---|---|"]
    for metric, name in names.items():
        extra = f" [noise={pfid['noise']:g}]" if continuous and metric == "pfid" else (
            f" [alpha={pfid['alpha']:g}, delta={pfid['delta']}]" if metric == "pfid" else "")
        for what in ("fid", "kid"):
            row_name = f"{name}{extra}{label}" if what == "fid" else f"&nbsp;&nbsp;KID of {NAMES[metric]}{label}"
            cells = [_cell(summary.get(arm, {}).get(metric, {}).get(what)) for arm in ARMS]
            md.append(f"| {row_name} | " + " | ".join(cells) + " | "
                      + " | ".join(_effect_cell(effect.get(metric), what)) + " |")
    md += ["", "## What it means", ""]
    analysis = [effect_sentence(names[m], e, unit) for m, e in effect.items() for unit in ("FID", "KID")]
    if "gfid" in effect:
        analysis.insert(0, headline(effect["gfid"], post_seeds))
    if summary.get("main"):
        analysis.insert(1, versus_main(summary, names))
    if post_seeds == 1:
        analysis.append("The noise above is that of the generated samples and the finite image sets (paired "
                        "evaluation seeds); the run-to-run noise of post-training itself was not measured (one "
                        "post-training seed per arm: `--post-seeds 3` measures it).")
    md += [f"- {line}" for line in analysis] + [""] + _mse_lines(result["mse_gap"], continuous)
    curve_name = "perturbed-latent FID vs noise (our pFID analogue)" if continuous else "pFID vs alpha"
    md += ["", f"## {curve_name}", "", f"![{curve_name}](pfid_curve.png)", "",
           f"| {axis} | " + " | ".join(f"{arm}{label}" for arm in curves) + " |", "|---|" + "---|" * len(curves)]
    xs = [p["x"] for p in next(iter(curves.values()))]
    for i, x in enumerate(xs):
        md.append(f"| {x:g} | " + " | ".join(_fmt(c[i]["fid"]) for c in curves.values()) + " |")
    md += ["", "## Samples (the same generated samples, decoded by each arm)", "",
           f"Per class one row per arm ({', '.join(samples['order'])}), {samples['per_class']} samples per class, "
           f"seed {samples['seed']}:", "", "![main/control/post](samples_compare.png)", "",
           "Post-training pairs (rows: real image / cached grid decoded by tokenizer.pt / by the post-trained "
           "decoder): ![post](post/samples/final.png) ![control](control/samples/final.png)", "",
           "## Loss curves", "", "![loss curves](loss_curves.png)", "",
           "| series | first | last | steps |", "|---|---|---|---|"]
    md += [f"| {k} | {v['first']:.4g} | {v['last']:.4g} | {v['steps']} |" for k, v in losses.items()]
    codebook_md, codebook = ([], None) if continuous else codebook_section(run_dir, cfg)
    md += [""] + codebook_md
    md += ["## Wall time per stage", "",
           f"CPU seconds are those of the stage's processes; on an idle machine with {cores} cores the wall time is "
           f"about CPU / {cores}. The load average (1 min) is sampled every 5 s while the stage runs: its mean and "
           f"max; a stage's own processes add ~{min(ranks, cores or ranks)} (its ranks), more is other work.", "",
           "| stage | wall s | CPU s | load avg (mean / max) |", "|---|---|---|---|"]
    md += [f"| {name} | {t['seconds']:.1f} | {_fmt(t.get('cpu_seconds'))} | {_fmt(t.get('load_average'), 3)} / "
           f"{_fmt(t.get('load_average_max'), 3)} |" for name, t in timing.items()]
    total_cpu = sum(t.get("cpu_seconds") or 0.0 for t in timing.values())
    md += [f"| total (stages above) | {sum(t['seconds'] for t in timing.values()):.1f} | {total_cpu:.1f} | |", ""]

    report = {"proxy": proxy, "kind": "continuous" if continuous else "vq", "extractor": result["extractor"],
              "split": split, "num": result["num"], "seeds": result["seeds"], "post_seeds": post_seeds,
              "metric_names": names, "summary": summary, "effects": effect, "mse_gap": result["mse_gap"],
              "pfid_settings": pfid, "pfid_curves": curves, "pfid_curve_axis": axis, "samples": samples,
              "losses": losses, "codebook_usage": codebook, "post_steps": post_steps, "ranks": ranks,
              "launcher": launcher,
              "seconds": {name: t["seconds"] for name, t in timing.items()}, "timing": timing,
              "analysis": analysis, "eval_file": "eval/arms.json"}
    atomic_write_json(run_dir / "report.json", report, indent=1)
    atomic_write_text(run_dir / "report.md", "\n".join(md))
    return report
