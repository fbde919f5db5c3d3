"""One evaluation's prepared pieces (metrics/run.py's evaluate_run and pfid_curve build one): the options, the
feature extractor, the tokenizer, the real-image source and its cached statistics, the pFID settings and the
generator's sampling settings.

Options, in order of precedence: the arguments, the run config's `eval` section, EvalConfig's defaults. The real
images are the run config's held-out split (data/folder.py: split "val") unless images are given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Optional

import torch

from tokpost_fast.atomic import file_sha256
from tokpost_fast.config import load_config
from tokpost_fast.config.eval import EvalConfig
from tokpost_fast.data import build_loader
from tokpost_fast.metrics.extractor import build_extractor
from tokpost_fast.metrics.features import (
    RealStats, cached_real_stats, dataset_fingerprint, extract_features, fid_between, fid_statistics, fingerprint,
    images_to_uint8, kid_between, load_real_stats, real_stats_path, save_real_stats,
)
from tokpost_fast.metrics.latent_noise import check_noise, noise_settings
from tokpost_fast.metrics.pfid import (check_perturbation, decode_features, default_delta, save_pfid_curve,
                                      tokenizer_metric)
from tokpost_fast.models import is_continuous
from tokpost_fast.models.generator import DiTSampling, SamplingSettings
from tokpost_fast.models.tokenizer import load_tokenizer
from tokpost_fast.training.checkpoint import state_hash

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
        return load_config(config)
    return config


def module_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's state (training/checkpoint.py: state_hash, the content_hash an export records):
    identifies a checkpoint passed as a module rather than as a file."""
    return state_hash(module.state_dict())


def _load_tokenizer(run_dir: str, tokenizer, device):
    if isinstance(tokenizer, torch.nn.Module):
        return tokenizer.to(device).eval(), {"path": None, "sha256": module_sha256(tokenizer)}
    path = os.fspath(tokenizer) if tokenizer is not None else os.path.join(run_dir, "tokenizer.pt")
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer checkpoint {path}: no such file (pass --tokenizer PATH)")
    return load_tokenizer(path, map_location=device).eval(), {"path": os.path.abspath(path),
                                                              "sha256": file_sha256(path)}


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
    data_cfg = dataclasses.replace(config.data, batch_size=opts.batch_size) \
        if hasattr(config.data, "batch_size") else config.data
    loader = build_loader(data_cfg, train=False, rank=0, world_size=1, seed=0, epoch=0, split="val")
    data_desc = {k: v for k, v in dataclasses.asdict(config.data).items() if k not in ("batch_size", "num_workers")}
    return loader, dataset_fingerprint(getattr(loader, "dataset", None), {**description, "data": data_desc,
                                                                           "split": "val"})


class RunEvaluation:
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
        check_pfid_flags(self.continuous, overrides)
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
        """The generator's sampling settings: AR (METHOD.md A4) for a VQ tokenizer, the DiT's for a continuous one."""
        opts = self.opts
        if self.continuous:
            return DiTSampling(opts.cfg_scale, self.sample_steps)
        return SamplingSettings(opts.cfg_scale, opts.cfg_power, opts.temperature, opts.top_k, opts.top_p)


def check_pfid_flags(continuous: bool, overrides: dict) -> None:
    """alpha / delta resample VQ codes, noise perturbs continuous latents: an explicit flag of the other kind is an
    error, not silently ignored."""
    given = [k for k in (("pfid_alpha", "pfid_delta") if continuous else ("pfid_noise",))
             if overrides.get(k) is not None]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"{flags}: the tokenizer is {'continuous' if continuous else 'VQ'}; its pFID takes "
                         f"{'--pfid-noise (our latent-noise analogue)' if continuous else '--pfid-alpha / --pfid-delta'}")
