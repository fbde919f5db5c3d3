"""gFID / IS / precision-recall inputs: class-balanced generator samples, decoded by the tokenizer.

AR generators (kind "ar") sample token grids (METHOD.md A4) that the VQ tokenizer decodes; a DiT (kind "dit") samples
latents that the continuous tokenizer decodes: models/generator/generate.py, the one sample-and-decode path.

Labels run 0, 1, ..., C-1, 0, 1, ... so every class gets floor(N/C) or ceil(N/C) samples (ImageNet's 50k
evaluation is 50 per class). One torch.Generator seeded with `seed` drives all sampling, so a run is reproducible
for a given seed and batch size.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

from tokpost_fast.metrics.extractor import IS_NEEDS_FILE, ExtractorInfo
from tokpost_fast.metrics.features import FeatureCollector, RealStats, fid_between, fid_statistics, kid_between
from tokpost_fast.models.generator.fit import check_generator_fits
from tokpost_fast.models.generator.generate import (DiTSampling, SamplingSettings, balanced_labels, sample_decoded,
                                                    sampling_for)

PRC_NEIGHBORHOOD = 3  # torch-fidelity's default k for the k-NN manifolds (Kynkaanniemi et al. 2019)


@torch.no_grad()
def generated_features(tokenizer, generator, num: int, extractor, info: ExtractorInfo,
                       sampling: SamplingSettings | DiTSampling | None = None, batch_size: int = 32, seed: int = 0,
                       device="cpu", progress: bool = False) -> dict[str, torch.Tensor]:
    """Features {layer: [num, d]} of `num` class-balanced samples decoded by `tokenizer`. sampling:
    SamplingSettings for an AR generator, DiTSampling for a DiT (None: the kind's defaults)."""
    if num < 1:
        raise ValueError(f"number of generated images must be >= 1, got {num}")
    check_generator_fits(generator, tokenizer)
    sampling = sampling_for(generator, sampling)
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
