"""gFID / IS / precision-recall inputs: class-balanced generator samples, decoded by the tokenizer.

Labels run 0, 1, ..., C-1, 0, 1, ... so every class gets floor(N/C) or ceil(N/C) samples (ImageNet's 50k
evaluation is 50 per class). One torch.Generator seeded with `seed` drives all sampling, so a run is reproducible
for a given seed and batch size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from tokpost_fast.metrics.extractor import ExtractorInfo
from tokpost_fast.metrics.features import FeatureCollector


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


def check_generator_matches(tokenizer, generator) -> None:
    cfg = generator.config
    grid = tokenizer.grid_size
    if cfg.vocab_size != tokenizer.codebook_size or cfg.seq_len != grid * grid:
        raise ValueError(f"generator (vocab {cfg.vocab_size}, {cfg.seq_len} tokens) does not match the tokenizer "
                         f"(K={tokenizer.codebook_size}, {grid}x{grid} grid)")


def balanced_labels(start: int, stop: int, num_classes: int) -> torch.Tensor:
    return torch.arange(start, stop, dtype=torch.long) % num_classes


@torch.no_grad()
def generated_features(tokenizer, generator, num: int, extractor, info: ExtractorInfo,
                       sampling: SamplingSettings | None = None, batch_size: int = 32, seed: int = 0,
                       device="cpu", progress: bool = False) -> dict[str, torch.Tensor]:
    """Features {layer: [num, d]} of `num` class-balanced samples decoded by `tokenizer`."""
    if num < 1:
        raise ValueError(f"number of generated images must be >= 1, got {num}")
    check_generator_matches(tokenizer, generator)
    sampling = sampling or SamplingSettings()
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
    from tokpost_fast.models.generator import sample

    grid = tokenizer.grid_size
    rng = torch.Generator(device=device).manual_seed(seed)
    collector = FeatureCollector(extractor, info, device, "generated images")
    with tqdm(total=num, unit="img", desc="sample + features", disable=not progress) as bar:
        for start in range(0, num, batch_size):
            stop = min(num, start + batch_size)
            labels = balanced_labels(start, stop, generator.config.num_classes).to(device)
            tokens = sample(generator, labels, generator=rng, **sampling.as_dict())   # [B, L]
            collector.add(tokenizer.decode_codes(tokens.reshape(-1, grid, grid)))
            bar.update(stop - start)
    return collector.result()
