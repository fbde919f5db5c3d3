"""Several decoders of one generator, measured on the same held-out images and the very same generated samples.

    result = evaluate_arms(run_dir, {"main": ["tokenizer.pt"], "control": ["tokenizer_control.pt"],
                                     "post": ["tokenizer_post.pt"]}, cfg, images, labels, seeds=[0, 1, 2])

What the demo pipeline's `evaluate` stage runs (its output: RUN/eval/arms.json). For every arm (a list of
checkpoints: one per post-training seed) it measures, against the real held-out images (features extracted once,
cached in RUN/fid_stats):
- rFID: decodes of the images' clean codes; pFID at each seed (the A2 operator at eval.pfid_alpha / delta, or the
  continuous analogue at eval.pfid_noise) and a pFID curve at the first seed;
- gFID: for each seed the generator samples eval.num_generated class-balanced token grids (DiT latents) ONCE,
  saved in RUN/eval/samples-seed<S>.pt, and every arm decodes those same samples, so arm differences are
  differences of decoders, not of draws;
- beside every FID its KID (torch-fidelity's unbiased estimator; mean and std over subsets);
- resumable: each checkpoint's draws are kept in RUN/eval/draws-<sha>.json as they are measured, so a killed
  stage (or another --seeds) measures only what is missing;
- the MSE-gap diagnostic on held-out images: the decoders' mean squared error to the real image on grids made the
  way the cache makes them (teacher-forced at cache.sigma; continuous: denoised from cache.post_strength) and on the
  clean grids of the same held-out images.
metrics/effects.py turns the draws into means, spreads and the post - control effect.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from tokpost_fast.atomic import atomic_torch_save, atomic_write_json, file_sha256
from tokpost_fast.metrics.extractor import build_extractor
from tokpost_fast.metrics.features import (
    FeatureCollector, RealStats, cached_real_stats, extract_features, fid_between, fid_statistics, fingerprint,
    images_to_uint8, kid_between,
)
from tokpost_fast.metrics.latent_noise import check_noise, noise_settings
from tokpost_fast.metrics.pfid import CLEAN, check_perturbation, decode_features, default_delta
from tokpost_fast.models import is_continuous
from tokpost_fast.models.generator import (DiTSampling, SamplingSettings, balanced_labels, decode_samples, denoise_from,
                                           load_generator, sample_codes, teacher_forced_sample)
from tokpost_fast.models.tokenizer import load_tokenizer

MSE_GAP_IMAGES = 128
IS_NOT_MEASURED = "not measured: the bundled weights have no classifier (--inception-weights PATH adds IS)"


@contextlib.contextmanager
def one_thread():
    """One intra-op thread while the generator samples: its many small ops spin-wait with two next to any other
    busy process (measured: 64 AR samples in 60 s instead of 1 s); the Inception gets the threads back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fid_kid(features: torch.Tensor, real: RealStats, seed: int, what: str) -> dict:
    kid, kid_std = kid_between(features, real.features, seed)
    return {"fid": fid_between(fid_statistics(features, what), real.stats), "kid": kid, "kid_std": kid_std}


class ArmEvaluation:
    """The shared pieces: options, extractor, real statistics, generator, generated samples per seed."""

    def __init__(self, run_dir, cfg, images: torch.Tensor, labels: torch.Tensor, seeds: list[int],
                 progress: bool = True, inception_weights=None):
        self.run_dir, self.cfg, self.opts = Path(run_dir), cfg, cfg.eval
        self.images, self.labels, self.seeds, self.progress = images, labels, list(seeds), progress
        self.extractor, self.info = build_extractor(inception_weights or self.opts.inception_weights, "cpu",
                                                    self.opts.extractor, self.opts.feature_precision)
        digest = images_to_uint8(images).contiguous().numpy().tobytes()
        self.data_fingerprint = fingerprint({"val_images": list(images.shape),
                                             "sha256": hashlib.sha256(digest).hexdigest()})
        self.real, self.real_cached = cached_real_stats(
            str(self.run_dir / "fid_stats"), self.info, self.data_fingerprint,
            lambda: extract_features(images, self.extractor, self.info, "cpu", None, progress, "real images"))
        self.generator_path = self.run_dir / "generator.pt"
        self.gpt = load_generator(self.generator_path, map_location="cpu").eval()
        self.generator_sha = file_sha256(self.generator_path)      # keys the samples and the draws
        self.continuous = is_continuous(self.gpt)
        gen = cfg.gen
        self.sampling = (DiTSampling(self.opts.cfg_scale, self.opts.sample_steps or gen.sample_steps)
                         if self.continuous else
                         SamplingSettings(self.opts.cfg_scale, self.opts.cfg_power, self.opts.temperature,
                                          self.opts.top_k, self.opts.top_p))
        self.num_generated = self.opts.num_generated or len(images)

    # --- generated samples, once per seed --------------------------------------------------------------------
    def samples(self, seed: int, grid_size: int) -> torch.Tensor:
        """The seed's class-balanced samples (token grids or DiT latents), from RUN/eval/samples-seed<S>.pt when
        it was drawn by this generator with these settings."""
        path = self.run_dir / "eval" / f"samples-seed{seed}.pt"
        key = {"generator": self.generator_sha, "sampling": self.sampling.as_dict(),
               "num": self.num_generated, "batch_size": self.opts.batch_size, "seed": seed}
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=False)
            if saved.get("key") == key:
                return saved["codes"]
        rng = torch.Generator().manual_seed(seed)
        parts = []
        with one_thread(), tqdm(total=self.num_generated, unit="img", desc=f"sample seed {seed}",
                                disable=not self.progress) as bar:
            for start in range(0, self.num_generated, self.opts.batch_size):
                stop = min(self.num_generated, start + self.opts.batch_size)
                labels = balanced_labels(start, stop, self.gpt.config.num_classes)
                parts.append(sample_codes(self.gpt, labels, self.sampling, rng, grid_size).cpu())
                if hasattr(self.gpt, "free_cache"):
                    self.gpt.free_cache()
                bar.update(stop - start)
        codes = torch.cat(parts)
        atomic_torch_save({"key": key, "codes": codes}, path)
        return codes

    # --- one checkpoint -----------------------------------------------------------------------------------------
    def pfid_setting(self, tokenizer, x: Optional[float] = None):
        if is_continuous(tokenizer):
            return check_noise(self.opts.pfid_noise if x is None else x)
        delta = self.opts.pfid_delta or default_delta(tokenizer.codebook_size)
        return check_perturbation(self.opts.pfid_alpha if x is None else x, delta, tokenizer.codebook_size)

    def _draws_file(self, sha: str, pfid, curve: tuple) -> tuple[Path, dict]:
        """RUN/eval/draws-<sha>.json: every draw measured so far for this checkpoint under these settings (the
        stage resumes draw by draw, and a change of --seeds reuses the draws it already has)."""
        path = self.run_dir / "eval" / f"draws-{sha[:16]}.json"
        key = {"sha256": sha, "extractor": self.info.extractor_id, "real": self.data_fingerprint,
               "pfid": repr(pfid), "curve": list(curve), "generator": self.generator_sha,
               "sampling": self.sampling.as_dict(), "num_generated": self.num_generated,
               "batch_size": self.opts.batch_size}
        store = {"key": key, "rfid": None, "curve": {}, "pfid": {}, "gfid": {}}
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("key") == json.loads(json.dumps(key)):
                store = saved
        return path, store

    @torch.no_grad()
    def measure(self, path: Path, tokenizer, curve: tuple) -> dict:
        """rFID, pFID per seed (+ the curve at the first seed), gFID per seed, each with its KID, of one
        checkpoint (`tokenizer`: the model in the file at `path`)."""
        pfid = self.pfid_setting(tokenizer)
        curve_settings = [self.pfid_setting(tokenizer, x) for x in curve]
        sha = file_sha256(path)
        draws_path, store = self._draws_file(sha, pfid, curve)
        save = lambda: atomic_write_json(draws_path, store)                        # noqa: E731
        layer, first = self.info.fid_layer, str(self.seeds[0])
        if store["rfid"] is None or first not in store["curve"] or first not in store["pfid"]:
            settings = list(dict.fromkeys([CLEAN, pfid, *curve_settings]))
            decoded, _ = decode_features(tokenizer, self.images, self.extractor, self.info, settings,
                                         seed=self.seeds[0], device="cpu", progress=self.progress)
            store["rfid"] = _fid_kid(decoded[CLEAN][layer], self.real, self.seeds[0], "reconstructions")
            store["pfid"][first] = _fid_kid(decoded[pfid][layer], self.real, self.seeds[0], "perturbed")
            store["curve"][first] = [{"x": x, **_fid_kid(decoded[s][layer], self.real, self.seeds[0], "curve")}
                                     for x, s in zip(curve, curve_settings)]
            save()
        for seed in self.seeds[1:]:
            if str(seed) not in store["pfid"]:
                decoded, _ = decode_features(tokenizer, self.images, self.extractor, self.info, [pfid], seed=seed,
                                             device="cpu", progress=self.progress)
                store["pfid"][str(seed)] = _fid_kid(decoded[pfid][layer], self.real, seed, "perturbed")
                save()
        for seed in self.seeds:
            if str(seed) not in store["gfid"]:
                codes = self.samples(seed, tokenizer.grid_size)
                collector = FeatureCollector(self.extractor, self.info, "cpu", "generated images")
                for start in tqdm(range(0, len(codes), self.opts.batch_size), desc=f"decode seed {seed}",
                                  disable=not self.progress):
                    collector.add(decode_samples(tokenizer, codes[start:start + self.opts.batch_size]).clamp(-1, 1))
                store["gfid"][str(seed)] = _fid_kid(collector.result()[layer], self.real, seed, "generated")
                save()
        return {"path": str(path), "sha256": sha, "rfid": store["rfid"], "curve": store["curve"][first],
                "pfid": [{"seed": seed, **store["pfid"][str(seed)]} for seed in self.seeds],
                "gfid": [{"seed": seed, **store["gfid"][str(seed)]} for seed in self.seeds]}

    def pfid_record(self, tokenizer) -> dict:
        setting = self.pfid_setting(tokenizer)
        if is_continuous(tokenizer):
            return noise_settings(setting, self.seeds[0])
        return {"alpha": setting.alpha, "delta": setting.delta, "seeds": self.seeds, "beta": 1.0}


@torch.no_grad()
def mse_gap_inputs(ev: ArmEvaluation, reference, count: int = MSE_GAP_IMAGES) -> dict:
    """The inputs of the MSE-gap diagnostic on held-out images: (a) grids made the way the cache makes them, by the
    generator from the clean grids of `reference` (the main tokenizer), and (b) those clean grids."""
    cfg = ev.cfg
    pick = torch.linspace(0, len(ev.images) - 1, min(count, len(ev.images))).round().long().unique()
    real, labels = ev.images[pick], ev.labels[pick]
    rng_seed = cfg.cache.seed + 7919          # not the cache's own draws: these images were never cached
    if ev.continuous:
        clean = reference.encode_latent(real).float()
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(rng_seed))
        sf = reference.scaling_factor
        with one_thread():
            made = denoise_from(ev.gpt, clean * sf, labels, cfg.cache.post_strength, cfg.cache.denoise_steps,
                                cfg.cache.denoise_cfg_scale, noise=noise) / sf
        how = {"kind": "latents", "post_strength": cfg.cache.post_strength,
               "relative_change": float(((made - clean).flatten(1).norm(dim=1)
                                         / clean.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())}
    else:
        clean = reference.encode(real)                                              # [n, h, w]
        with one_thread():
            tokens, keep = teacher_forced_sample(ev.gpt, labels, clean.flatten(1), cfg.cache.sigma, rng_seed,
                                                 **cfg.cache.sampling())
        if hasattr(ev.gpt, "free_cache"):
            ev.gpt.free_cache()
        made = tokens.view_as(clean)
        how = {"kind": "tokens", "sigma": cfg.cache.sigma, "keep_fraction": float(keep.float().mean()),
               "changed_fraction": float((made != clean).float().mean())}
    return {"real": real, "made": made, "clean": clean, "images": len(pick), "how": how}


@torch.no_grad()
def mse_gap_row(tokenizer, inputs: dict) -> dict:
    """One decoder's MSE to the real held-out images on the generated and on the clean grids, and the gap
    (generated - clean): the decoder's sensitivity to generator-made codes."""
    decode = tokenizer.decode if inputs["how"]["kind"] == "latents" else tokenizer.decode_codes
    mse = {what: float(((decode(inputs[key]).clamp(-1, 1) - inputs["real"]) ** 2).mean())
           for what, key in (("generated", "made"), ("clean", "clean"))}
    return {**mse, "gap": mse["generated"] - mse["clean"]}


def evaluate_arms(run_dir, arms: dict[str, list], cfg, images: torch.Tensor, labels: torch.Tensor,
                  seeds: list[int], curve: tuple = (), out=None, progress: bool = True,
                  inception_weights=None, split: Optional[dict] = None) -> dict:
    """Measure every checkpoint of every arm (see the module doc); writes `out` (default RUN/eval/arms.json)."""
    started = time.time()
    run_dir = Path(run_dir)
    arms = {arm: [run_dir / p if not os.path.isabs(str(p)) else Path(p) for p in paths] for arm, paths in arms.items()}
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    ev = ArmEvaluation(run_dir, cfg, images, labels, seeds, progress, inception_weights)
    reference_path = arms["main"][0] if "main" in arms else next(iter(arms.values()))[0]
    reference = load_tokenizer(str(reference_path)).eval()
    gap_inputs = mse_gap_inputs(ev, reference)
    measured, gap_rows = {}, {}
    for arm, paths in arms.items():
        measured[arm], gap_rows[arm] = [], []
        for path in paths:                 # every checkpoint is loaded once, for its draws and its MSE gap
            tokenizer = reference if path == reference_path else load_tokenizer(str(path)).eval()
            measured[arm].append(ev.measure(path, tokenizer, curve))
            gap_rows[arm].append(mse_gap_row(tokenizer, gap_inputs))
    mse_gap = {"images": gap_inputs["images"], "split": "val", **gap_inputs["how"], "arms": gap_rows}
    result = {
        "proxy": ev.info.proxy, "label": ev.info.label,
        "extractor": {"name": ev.info.name, "id": ev.info.extractor_id, "weights": ev.info.weights,
                      "weights_path": ev.info.weights_path, "precision": ev.info.precision, "note": ev.info.note,
                      "inception_score": None if ev.info.isc_layer else IS_NOT_MEASURED},
        "num": {"real": len(images), "generated": ev.num_generated}, "split": split or {},
        "seeds": ev.seeds, "curve_axis": "noise" if ev.continuous else "alpha",
        "settings": {"pfid": ev.pfid_record(reference), "generation": ev.sampling.as_dict(),
                     "generation_kind": "dit" if ev.continuous else "ar"},
        "real_stats": {"cached": ev.real_cached, "fingerprint": ev.data_fingerprint},
        "arms": measured,
        "mse_gap": mse_gap,
        "versions": {"torch": torch.__version__},
        "seconds": round(time.time() - started, 1),
    }
    atomic_write_json(out or run_dir / "eval" / "arms.json", result, indent=1)
    return result
