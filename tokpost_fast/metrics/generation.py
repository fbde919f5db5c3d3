"""gFID / IS / precision-recall inputs: class-balanced generator samples, decoded by the tokenizer.

AR generators (kind "ar") sample token grids (SPEC A4) that the VQ tokenizer decodes; a DiT (kind "dit") samples
latents x0 = z * scaling_factor with the rectified-flow Euler sampler (models/generator/diffusion.py: sample_dit),
which the continuous tokenizer decodes as decode(x0 / scaling_factor).

Labels run 0, 1, ..., C-1, 0, 1, ... so every class gets floor(N/C) or ceil(N/C) samples (ImageNet's 50k
evaluation is 50 per class). One torch.Generator seeded with `seed` drives all sampling, so a run is reproducible
for a given seed and batch size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

from tokpost_fast.metrics.extractor import IS_NEEDS_FILE, ExtractorInfo
from tokpost_fast.metrics.features import FeatureCollector, RealStats, fid_between, fid_statistics, kid_between
from tokpost_fast.models.generator.fit import check_generator_fits

PRC_NEIGHBORHOOD = 3  # torch-fidelity's default k for the k-NN manifolds (Kynkaanniemi et al. 2019)


@dataclass
class SamplingSettings:
    """SPEC A4 sampling: guidance scale g, power p of the cosine schedule, temperature T, top-k / top-p."""

    cfg_scale: float = 1.0
    cfg_power: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class DiTSampling:
    """The DiT's sampler: Euler steps of the rectified flow, guidance scale g on the velocity."""

    cfg_scale: float = 1.0
    steps: int = 50

    def as_dict(self) -> dict:
        return asdict(self)


def generator_kind(generator) -> str:
    return getattr(generator, "kind", "ar")


@torch.no_grad()
def sample_codes(generator, labels: torch.Tensor, sampling, rng: torch.Generator, grid_size: int) -> torch.Tensor:
    """labels [B] -> what the generator makes, before any decoder: token grids [B, h, w] (AR) or latents
    x0 = z * scaling_factor [B, C, h, w] (DiT). Several decoders can then decode the very same samples."""
    if generator_kind(generator) == "dit":
        from tokpost_fast.models.generator import sample_dit

        return sample_dit(generator, labels, steps=sampling.steps, cfg_scale=sampling.cfg_scale, generator=rng)
    from tokpost_fast.models.generator import sample

    tokens = sample(generator, labels, generator=rng, **sampling.as_dict())   # [B, L]
    return tokens.reshape(-1, grid_size, grid_size)


@torch.no_grad()
def decode_samples(tokenizer, codes: torch.Tensor) -> torch.Tensor:
    """sample_codes' output -> images [B, 3, H, W]: token ids through the codebook, DiT latents as
    decode(x0 / scaling_factor) with this tokenizer's own scaling factor."""
    if codes.is_floating_point():
        return tokenizer.decode(codes / tokenizer.scaling_factor)
    return tokenizer.decode_codes(codes)


@torch.no_grad()
def sample_decoded(tokenizer, generator, labels: torch.Tensor, sampling, rng: torch.Generator) -> torch.Tensor:
    """labels [B] -> images [B, 3, H, W]: one sampling call of either generator kind, decoded by the tokenizer."""
    return decode_samples(tokenizer, sample_codes(generator, labels, sampling, rng, tokenizer.grid_size))


def balanced_labels(start: int, stop: int, num_classes: int) -> torch.Tensor:
    return torch.arange(start, stop, dtype=torch.long) % num_classes


@torch.no_grad()
def generated_features(tokenizer, generator, num: int, extractor, info: ExtractorInfo,
                       sampling: SamplingSettings | DiTSampling | None = None, batch_size: int = 32, seed: int = 0,
                       device="cpu", progress: bool = False) -> dict[str, torch.Tensor]:
    """Features {layer: [num, d]} of `num` class-balanced samples decoded by `tokenizer`. sampling:
    SamplingSettings for an AR generator, DiTSampling for a DiT (None: the kind's defaults)."""
    if num < 1:
        raise ValueError(f"number of generated images must be >= 1, got {num}")
    check_generator_fits(generator, tokenizer)
    wanted = DiTSampling if generator_kind(generator) == "dit" else SamplingSettings
    sampling = sampling or wanted()
    if not isinstance(sampling, wanted):
        raise ValueError(f"a {generator_kind(generator)!r} generator samples with {wanted.__name__}, got "
                         f"{type(sampling).__name__}")
    device = torch.device(device)
    modes = (tokenizer.training, generator.training)
    tokenizer.eval()
    generator.eval()
    try:
        return _sample_features(tokenizer, generator, num, extractor, info, sampling, batch_size, seed, device,
                                progress)
    finally:
        tokenizer.train(modes[0])
        generator.train(modes[1])


def _sample_features(tokenizer, generator, num, extractor, info, sampling, batch_size, seed, device, progress):
    rng = torch.Generator(device=device).manual_seed(seed)
    collector = FeatureCollector(extractor, info, device, "generated images")
    with tqdm(total=num, unit="img", desc="sample + features", disable=not progress) as bar:
        for start in range(0, num, batch_size):
            stop = min(num, start + batch_size)
            labels = balanced_labels(start, stop, generator.config.num_classes).to(device)
            collector.add(sample_decoded(tokenizer, generator, labels, sampling, rng))
            bar.update(stop - start)
    return collector.result()


def generative_values(gen: dict, real: RealStats, info: ExtractorInfo, wanted: list[str], seed: int,
                       skipped: dict) -> dict:
    """gFID (with its KID beside it), IS, precision / recall, KID of generated features against the real ones
    (torch-fidelity's code)."""
    label, values, kid = info.label, {}, None
    gen_pool, count = gen[info.fid_layer], gen[info.fid_layer].shape[0]
    if "gfid" in wanted:
        values[f"gfid{label}"] = fid_between(fid_statistics(gen_pool, "generated images"), real.stats)
        kid = kid_between(gen_pool, real.features, seed)
        values[f"gfid_kid{label}"], values[f"gfid_kid_std{label}"] = kid
    if "is" in wanted and info.isc_layer is None:
        skipped["is"] = IS_NEEDS_FILE
    elif "is" in wanted:
        splits = max(1, min(10, count // 2))  # torch-fidelity's 10 splits, fewer for tiny sample counts
        isc = isc_features_to_metric(gen[info.isc_layer], splits=splits, shuffle=True, rng_seed=seed)
        values[f"is{label}"], values[f"is_std{label}"] = isc[KEY_METRIC_ISC_MEAN], isc[KEY_METRIC_ISC_STD]
    if "prec" in wanted or "rec" in wanted:
        if min(count, real.features.shape[0]) <= PRC_NEIGHBORHOOD:
            for m in ("prec", "rec"):
                if m in wanted:
                    skipped[m] = f"needs more than {PRC_NEIGHBORHOOD} images in each set"
        else:
            prc = prc_features_to_metric(gen_pool, real.features, prc_neighborhood=PRC_NEIGHBORHOOD,
                                         prc_batch_size=10000, save_cpu_ram=False, verbose=False)
            if "prec" in wanted:
                values[f"prec{label}"] = prc[KEY_METRIC_PRECISION]
            if "rec" in wanted:
                values[f"rec{label}"] = prc[KEY_METRIC_RECALL]
    if "kid" in wanted:
        values[f"kid{label}"], values[f"kid_std{label}"] = kid or kid_between(gen_pool, real.features, seed)
    return values
