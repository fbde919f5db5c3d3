"""The demo pipeline's report: RUN/report.md + report.json + PNGs, from what the stages left in the run folder.

    metrics_compare     rFID, pFID, gFID (proxy unless Inception weights were given) of the same generator decoded
                        by RUN/tokenizer.pt (before) and RUN/tokenizer_post.pt (after), from RUN/eval/*/metrics.json
    pfid_curve.png      pFID vs alpha, before and after, one plot
    samples_*.png       the same generated tokens (same classes and seed) decoded before / after, and interleaved
A continuous run (KL tokenizer + DiT, configs/demo_continuous.yaml) gets the same report: "pFID" is then the
perturbed-latent FID (our analogue, metrics/latent_noise.py; its curve runs over the noise, not alpha), the samples
are the same DiT latents decoded before / after, and the diagnostics use the cached denoised latents.
    loss_curves.png     main, gen and post losses from their log.jsonl
    decoder diagnostics mean squared error to the paired real image, before and after, on the cached generated
                        grids (what post-training optimises) and on clean grids (what rFID sees)
    wall time of each stage (RUN/pipeline.json)
The report states what was measured, whichever way it came out; when gFID did not go down, it says so and why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

NAMES = {"rfid": "rFID", "pfid": "pFID", "gfid": "gFID"}
CONTINUOUS_NAMES = {**NAMES, "pfid": "perturbed-latent FID (our pFID analogue)"}


def is_continuous_run(cfg) -> bool:
    return cfg.tokenizer.arch == "kl_cnn"


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curves(run_dir: Path, out: Path) -> dict:
    from matplotlib.figure import Figure

    logs = {"main": run_dir / "log.jsonl", "gen": run_dir / "gen" / "log.jsonl", "post": run_dir / "post" / "log.jsonl"}
    series = {}
    fig = Figure(figsize=(12, 3.2), dpi=110)
    axes = fig.subplots(1, 3)
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
    fig.savefig(out)
    return {k: {"first": v[0][1], "last": v[-1][1], "steps": v[-1][0]} for k, v in series.items()}


def plot_pfid_curves(curves: dict[str, list[dict]], proxy: bool, delta: Optional[int], out: Path,
                     x: str = "alpha") -> None:
    """x: "alpha" (VQ pFID at this delta) or "noise" (the continuous analogue)."""
    from matplotlib.figure import Figure

    from tokpost_fast.metrics.pfid import CURVE_AXES

    fig = Figure(figsize=(4.8, 3.4), dpi=120)
    ax = fig.subplots()
    for which, points in curves.items():
        if points:
            ax.plot([p[x] for p in points], [p["pfid"] for p in points], marker="o", label=which)
    ax.set_xlabel(CURVE_AXES[x][0])
    ax.set_ylabel(CURVE_AXES[x][1] + (" (proxy)" if proxy else ""))
    ax.set_title(f"pFID vs alpha (delta = {delta})" if x == "alpha" else
                 "perturbed-latent FID vs noise (our pFID analogue)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


def _sample_and_decode(gpt, before, after, labels, cfg, seed: int) -> tuple[dict, dict]:
    """One draw of the generator (token grids, or DiT latents), decoded by both tokenizers; (images, settings)."""
    generator = torch.Generator().manual_seed(seed)
    ev = cfg.eval
    if getattr(gpt, "kind", "ar") == "dit":
        from tokpost_fast.models.generator import sample_dit

        steps = ev.sample_steps or cfg.gen.sample_steps    # what evaluate_run uses
        x0 = sample_dit(gpt, labels, steps=steps, cfg_scale=ev.cfg_scale, generator=generator)
        # each decoder reads x0 / its own scaling_factor (post-training copies the encoder side, so they agree)
        return ({"before": before.decode(x0 / before.scaling_factor).clamp(-1, 1),
                 "after": after.decode(x0 / after.scaling_factor).clamp(-1, 1)},
                {"cfg_scale": ev.cfg_scale, "steps": steps})
    from tokpost_fast.models.generator import sample

    sampling = {k: getattr(ev, k) for k in ("cfg_scale", "cfg_power", "temperature", "top_k", "top_p")}
    grid = before.grid_size
    tokens = sample(gpt, labels, generator=generator, **sampling).view(-1, grid, grid)
    return {"before": before.decode_codes(tokens).clamp(-1, 1), "after": after.decode_codes(tokens).clamp(-1, 1)}, \
        sampling


@torch.no_grad()
def sample_grids(run_dir: Path, cfg, per_class: int = 6, max_classes: int = 8) -> dict:
    """The same generated token grids (or DiT latents) decoded by both tokenizers: samples_before.png,
    samples_after.png and samples_compare.png (per class a before row, then an after row)."""
    from tokpost_fast.models.generator import load_generator
    from tokpost_fast.models.tokenizer import load_tokenizer
    from tokpost_fast.sample import save_image_grid

    gpt = load_generator(run_dir / "generator.pt").eval()
    before = load_tokenizer(str(run_dir / "tokenizer.pt")).eval()
    after = load_tokenizer(str(run_dir / "tokenizer_post.pt")).eval()
    classes = min(max_classes, gpt.config.num_classes)
    labels = torch.arange(classes).repeat_interleave(per_class)
    seed = cfg.eval.gen_seed
    images, sampling = _sample_and_decode(gpt, before, after, labels, cfg, seed)
    files = {}
    for which, batch in images.items():
        files[which] = run_dir / f"samples_{which}.png"
        save_image_grid(batch, files[which], nrow=per_class)
    interleaved = torch.stack([images["before"].view(classes, per_class, *images["before"].shape[1:]),
                               images["after"].view(classes, per_class, *images["after"].shape[1:])], dim=1)
    files["compare"] = run_dir / "samples_compare.png"
    save_image_grid(interleaved.flatten(0, 2), files["compare"], nrow=per_class)
    return {"classes": classes, "per_class": per_class, "seed": seed, "sampling": sampling,
            "files": {k: v.name for k, v in files.items()}}


@torch.no_grad()
def decoder_diagnostics(run_dir: Path, cfg, max_rows: int = 256, noise: Optional[float] = None) -> dict:
    """MSE to the paired real image (lower is better) of both decoders on (a) the cached generated grids and
    (b) the clean grids of the same images; plus the cache's realised keep / changed-token fractions. A latent
    cache (continuous run): the cached denoised latents and the real latents instead, plus how far the DiT moved
    the latents (relative L2 change) and, with `noise`, the MSE of the real latents under the perturbed-latent
    FID's noise (what that metric decodes)."""
    from tokpost_fast.data import ImageFolderDataset
    from tokpost_fast.metrics.latent_noise import perturb_latents
    from tokpost_fast.models.tokenizer import load_tokenizer
    from tokpost_fast.stages.token_cache import LatentRows, load_rows, read_index

    folder = run_dir / "cache"
    index = read_index(folder)
    rows = load_rows(folder, index)
    pick = torch.linspace(0, len(rows) - 1, min(max_rows, len(rows))).round().long().unique()
    dataset = ImageFolderDataset(cfg.data, train=False, seed=0, epoch=0)
    real = torch.stack([dataset[int(rows.sample_index[i])][0] for i in pick])
    out = {"rows_total": len(rows), "rows_measured": len(pick)}
    inputs = {}
    if isinstance(rows, LatentRows):
        inputs["generated"], inputs["clean"] = rows.latents[pick].float(), rows.gt_latents[pick].float()
        change = ((inputs["generated"] - inputs["clean"]).flatten(1).norm(dim=1)
                  / inputs["clean"].flatten(1).norm(dim=1).clamp_min(1e-12))
        out.update(kind="latents", post_strength=index["settings"]["post_strength"],
                   relative_change=float(change.mean()))
        if noise:
            inputs["noised"] = perturb_latents(inputs["clean"], noise, seed=0, first_image=0)
            out["noise"] = noise
        decode = lambda model, batch: model.decode(batch)            # noqa: E731
    else:
        inputs["generated"], inputs["clean"] = rows.tokens[pick], rows.gt_tokens[pick]
        out.update(kind="tokens", sigma=index["settings"]["sigma"],
                   keep_fraction=float(rows.keep_mask.float().mean()),
                   changed_fraction=float((rows.tokens != rows.gt_tokens).float().mean()))
        decode = lambda model, batch: model.decode_codes(batch)      # noqa: E731
    for which, name in (("before", "tokenizer.pt"), ("after", "tokenizer_post.pt")):
        model = load_tokenizer(str(run_dir / name)).eval()
        for what, batch in inputs.items():
            decoded = torch.cat([decode(model, batch[i:i + 64]) for i in range(0, len(pick), 64)])
            out[f"mse_{what}_grids_{which}"] = float(((decoded.clamp(-1, 1) - real) ** 2).mean())
    return out


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


def _cache_line(diag: dict) -> str:
    if diag["kind"] == "latents":
        return (f"The cache holds real latents noised to post_strength {diag['post_strength']} and denoised by the "
                f"DiT; they differ from the real latents by {100 * diag['relative_change']:.1f} % (relative L2).")
    return (f"The cache kept {100 * diag['keep_fraction']:.1f} % ground-truth tokens (sigma {diag['sigma']}); "
            f"{100 * diag['changed_fraction']:.1f} % of its tokens differ from the clean grid (a sampled token "
            "often equals the true one).")


def _curve_line(curve: list[dict], axis: str, diag: dict) -> Optional[str]:
    """When the pFID curve (before post-training) does not grow from its first point to its last, say so and, for
    the continuous analogue, what the decoder's MSE under the noise did meanwhile."""
    if len(curve) < 2 or curve[-1]["pfid"] > curve[0]["pfid"]:
        return None
    name = "The perturbed-latent FID (our analogue)" if axis == "noise" else "pFID"
    line = (f"{name} did not grow with the {axis}: {curve[0]['pfid']:.4g} at {axis} {curve[0][axis]:g} -> "
            f"{curve[-1]['pfid']:.4g} at {curve[-1][axis]:g}.")
    if "mse_noised_grids_before" in diag:
        line += (f" Yet the noise does hurt the decodes: MSE to the real image {diag['mse_clean_grids_before']:.4f} "
                 f"-> {diag['mse_noised_grids_before']:.4f} at noise {diag['noise']:g} (before post-training). The "
                 "noise adds high-frequency detail that the smooth demo decodes lack, and the proxy features reward "
                 "it; at this scale the metric does not measure robustness to latent noise.")
    return line


def _analysis(compare: dict, diag: dict, post_cfg, post_steps: Optional[int], curve: list[dict] = (),
              axis: str = "alpha") -> list[str]:
    """The outcome in words, from the numbers above; when gFID did not go down, the likely reasons."""
    g, r = compare.get("gfid", {}), compare.get("rfid", {})
    if g.get("before") is None or g.get("after") is None:
        return ["gFID was not measured (no generator?)."]
    latents = diag["kind"] == "latents"
    unit, grids = ("latents", "latents") if latents else ("tokens", "grids")
    change = g["after"] - g["before"]
    gen_b, gen_a = diag["mse_generated_grids_before"], diag["mse_generated_grids_after"]
    cln_b, cln_a = diag["mse_clean_grids_before"], diag["mse_clean_grids_after"]
    lines = [f"gFID {'went down' if change < 0 else 'did not go down'}: {g['before']:.4g} -> {g['after']:.4g} "
             f"({change:+.4g}, {100 * change / g['before']:+.1f} %), the same generated {unit} decoded by both "
             "decoders.",
             f"Decoder MSE to the paired real image on the cached generated {grids} (what post-training "
             f"optimises): {gen_b:.4f} -> {gen_a:.4f}; on the clean {grids} of the same images: {cln_b:.4f} -> "
             f"{cln_a:.4f}. The gap generated - clean, the decoder's sensitivity to generator-made {unit}, went "
             f"{gen_b - cln_b:+.4f} -> {gen_a - cln_a:+.4f}.",
             _cache_line(diag)]
    if r.get("change") is not None and r["change"] < 0 and change < 0:
        shrank = gen_a - cln_a < gen_b - cln_b
        lines.append("rFID went down too: at demo scale the main stage stops long before convergence, so part of "
                     "the gain is simply more decoder training; " +
                     (f"the shrinking generated - clean gap is the part that is specific to training on generated "
                      f"{unit}." if shrank else
                      f"the generated - clean gap did not shrink, so nothing here shows a gain specific to training "
                      f"on generated {unit}."))
    curve_line = _curve_line(list(curve), axis, diag)
    if curve_line:
        lines.append(curve_line)
    if change >= 0:
        fitted = gen_a < gen_b
        share = ("partly denoised latents of the cache, which start from a real image" if latents else
                 "~30 % sampled ones of the cache")
        knobs = ("a higher post_strength (more of each latent made by the DiT) or a later GAN start are the knobs "
                 "(post.epochs, cache.post_strength, post.disc_start)" if latents else
                 "a lower sigma (more generated tokens per grid) or a later GAN start are the knobs (post.epochs, "
                 "cache.sigma, post.disc_start)")
        lines.append(
            "Why it did not help here: " + (f"the decoder did fit its objective (lower MSE on generated {grids}), "
                                            "so the gain does not carry over to the generator's own samples, "
                                            f"whose {unit} are further from any real image than the {share}; "
                                            if fitted else
                                            f"the decoder did not even fit its objective (the MSE on generated "
                                            f"{grids} did not drop): ")
            + f"{post_steps} steps at lr {post_cfg.lr:g} (EMA {post_cfg.ema_decay}) against a freshly initialised "
            "discriminator that dominates early (GAN from step 0) is little; a proxy FID over a few hundred "
            f"64x64 images also has a noise floor of a similar order. More post steps, {knobs}.")
    return lines


def _settings_lines(evals: dict, pfid: dict, diag: dict, cfg, post_steps: Optional[int]) -> list[str]:
    """The report's opening paragraph: what was compared, with which pFID settings, after what post-training."""
    generation = evals["before"]["settings"]["generation"]
    if pfid.get("kind") == "gaussian":
        pfid_text = (f"the perturbed-latent FID (**our analogue of pFID, not the paper's VQ pFID**: Gaussian noise "
                     f"of {pfid['noise']:g} x each image's latent std on every latent), seed {pfid['seed']}")
        sampler = f"DiT sampling {generation.get('steps')} Euler steps, guidance {generation.get('cfg_scale'):g}"
        cache = f"{diag['rows_total']} cached denoised latents (post_strength {diag['post_strength']})"
    else:
        pfid_text = f"pFID alpha {pfid['alpha']:g}, delta {pfid['delta']}, seed {pfid['seed']}"
        sampler = f"guidance {generation.get('cfg_scale'):g}"
        cache = (f"{diag['rows_total']} cached grids (sigma {diag['sigma']}, input {cfg.post.input!r}, codebook "
                 f"{'trainable' if cfg.post.train_codebook else 'frozen'})")
    return [f"Real images: {evals['before']['num']['real']} (class-balanced); generated: "
            f"{evals['before']['num']['generated']}; the same generator, classes and sampling seed "
            f"{generation.get('seed')} before and after ({sampler}); {pfid_text}.", "",
            f"Post-training: {post_steps} steps of global batch {cfg.post.global_batch_size} on {cache}, lr "
            f"{cfg.post.lr:g}, EMA {cfg.post.ema_decay}, GAN from step {cfg.post.disc_start} against a fresh "
            "discriminator.", ""]


def write_report(run_dir: Path, cfg, timing: dict, ranks: int = 1, launcher: str = "deepspeed",
                 cores: Optional[int] = None) -> dict:
    """timing: {stage: {"seconds", "cpu_seconds", "load_average"}} of the stages run so far."""
    run_dir = Path(run_dir)
    continuous = is_continuous_run(cfg)
    names = CONTINUOUS_NAMES if continuous else NAMES
    axis = "noise" if continuous else "alpha"
    evals = {w: json.loads((run_dir / "eval" / w / "metrics.json").read_text()) for w in ("before", "after")}
    proxy = evals["before"]["proxy"]
    label = "_proxy" if proxy else ""
    compare = {}
    for key in names:
        b, a = evals["before"]["values"].get(key + label), evals["after"]["values"].get(key + label)
        compare[key] = {"before": b, "after": a, "change": (a - b) if a is not None and b is not None else None}
    pfid_settings = evals["before"]["settings"]["pfid"]
    curves = {w: evals[w].get("pfid_curve", {}).get("points", []) for w in evals}
    plot_pfid_curves(curves, proxy, pfid_settings.get("delta"), run_dir / "pfid_curve.png", x=axis)
    losses = plot_loss_curves(run_dir, run_dir / "loss_curves.png")
    samples = sample_grids(run_dir, cfg)
    diag = decoder_diagnostics(run_dir, cfg, noise=pfid_settings.get("noise"))
    post_rows = [r for r in _rows(run_dir / "post" / "log.jsonl") if r.get("event") == "exported"]
    post_steps = post_rows[-1]["step"] if post_rows else None

    tag = " (proxy)" if proxy else ""
    title = "continuous (KL tokenizer + DiT) demo report" if continuous else "demo report"
    md = [f"# tokpost_fast {title}", "",
          f"Run folder `{run_dir}`; launcher {launcher}, {ranks} rank(s); config `pipeline_config.yaml`.", ""]
    if proxy:
        md += ["**All FIDs here are PROXY values**: features from the offline, fixed, randomly initialised "
               "`tokpost-proxy-v1` network (no Inception weights were given). They rank models; they are not "
               "comparable to paper FID.", ""]
    md += _settings_lines(evals, pfid_settings, diag, cfg, post_steps)
    md += ["## Before / after post-training", "",
           f"| metric{tag} | before (tokenizer.pt) | after (tokenizer_post.pt) | change |", "|---|---|---|---|"]
    for key, name in names.items():
        c = compare[key]
        extra = ""
        if key == "pfid":
            extra = (f" [noise={pfid_settings['noise']:g}]" if continuous else
                     f" [alpha={pfid_settings['alpha']:g}, delta={pfid_settings['delta']}]")
        md.append(f"| {name}{extra} | {_fmt(c['before'])} | {_fmt(c['after'])} | {_fmt(c['change'])} |")
    what = "latents" if continuous else "grids"
    md += ["", "| decoder diagnostic (MSE to the real image) | before | after |", "|---|---|---|",
           f"| cached generated {what} ({diag['rows_measured']} rows) | {diag['mse_generated_grids_before']:.4f} | "
           f"{diag['mse_generated_grids_after']:.4f} |",
           f"| clean {what} of the same images | {diag['mse_clean_grids_before']:.4f} | "
           f"{diag['mse_clean_grids_after']:.4f} |",
           f"| gap generated - clean | {diag['mse_generated_grids_before'] - diag['mse_clean_grids_before']:+.4f} | "
           f"{diag['mse_generated_grids_after'] - diag['mse_clean_grids_after']:+.4f} |"]
    if "mse_noised_grids_before" in diag:
        md.append(f"| clean latents + the perturbed-latent FID's noise ({diag['noise']:g}) | "
                  f"{diag['mse_noised_grids_before']:.4f} | {diag['mse_noised_grids_after']:.4f} |")
    md += ["",
           "## What it means", ""]
    analysis = _analysis(compare, diag, cfg.post, post_steps, curves["before"], axis)
    md += [f"- {line}" for line in analysis]
    curve_name = "perturbed-latent FID vs noise (our pFID analogue)" if continuous else "pFID vs alpha"
    column = "perturbed-latent FID" if continuous else "pFID"
    md += ["", f"## {curve_name}", "", f"![{curve_name}](pfid_curve.png)", "",
           f"| {axis} | " + " | ".join(f"{column}{tag} {w}" for w in curves) + " |", "|---|" + "---|" * len(curves)]
    xs = [p[axis] for p in curves["before"]]
    for i, x in enumerate(xs):
        md.append(f"| {x:g} | " + " | ".join(_fmt(curves[w][i]["pfid"]) if i < len(curves[w]) else "-"
                                             for w in curves) + " |")
    drawn = "latents" if continuous else "tokens"
    pairs = "cached denoised latent" if continuous else "cached generated grid"
    md += ["", f"## Samples (same {drawn}, same classes and seed)", "",
           f"Per class a row decoded before, then a row decoded after ({samples['per_class']} samples per class, "
           f"sampling {samples['sampling']}, seed {samples['seed']}):", "", "![before/after](samples_compare.png)",
           "", "Before: ![before](samples_before.png) After: ![after](samples_after.png)", "",
           f"Post-training pairs (rows: real image / {pairs} decoded by tokenizer.pt / by "
           "tokenizer_post.pt): ![post samples](post/samples/final.png)", "",
           "## Loss curves", "", "![loss curves](loss_curves.png)", "",
           "| series | first | last | steps |", "|---|---|---|---|"]
    md += [f"| {k} | {v['first']:.4g} | {v['last']:.4g} | {v['steps']} |" for k, v in losses.items()]
    md += ["", "## Wall time per stage", "",
           f"CPU seconds are those of the stage's processes; on an idle machine with {cores} cores the wall time is "
           f"about CPU / {cores}. The load average (1 min, at the stage's end) shows how busy the machine was.", "",
           "| stage | wall s | CPU s | load avg |", "|---|---|---|---|"]
    md += [f"| {name} | {t['seconds']:.1f} | {_fmt(t.get('cpu_seconds'))} | {_fmt(t.get('load_average'))} |"
           for name, t in timing.items()]
    total_cpu = sum(t.get("cpu_seconds") or 0.0 for t in timing.values())
    md += [f"| total (stages above) | {sum(t['seconds'] for t in timing.values()):.1f} | {total_cpu:.1f} | |", ""]

    report = {"proxy": proxy, "kind": "continuous" if continuous else "vq", "metrics": compare,
              "metric_names": names, "pfid_settings": pfid_settings, "pfid_curves": curves, "pfid_curve_axis": axis,
              "decoder_diagnostics": diag, "samples": samples, "losses": losses,
              "seconds": {name: t["seconds"] for name, t in timing.items()}, "timing": timing,
              "post_steps": post_steps, "ranks": ranks, "launcher": launcher,
              "analysis": analysis,
              "eval_files": {w: f"eval/{w}/metrics.json" for w in evals}}
    (run_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (run_dir / "report.md").write_text("\n".join(md))
    return report
