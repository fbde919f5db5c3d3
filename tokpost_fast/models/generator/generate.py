"""Class-conditional samples of either generator kind, decoded by a tokenizer: the one sample-and-decode path of
the sample CLI, the gen stage's sample grids and the generative metrics.

    images = sample_images(generator, tokenizer, labels, SamplingSettings(cfg_scale=4.0), rng)   # [N, 3, H, W]
    codes = sample_codes(generator, labels, sampling, rng, tokenizer.grid_size)   # before any decoder
    images = decode_samples(tokenizer, codes)                                      # ... decoded by any of them

An AR generator (kind "ar") samples token grids (METHOD.md A4) that the VQ tokenizer decodes through its codebook; a DiT
(kind "dit") samples latents x0 = z * scaling_factor with the rectified-flow Euler sampler (diffusion.py:
sample_dit), which the continuous tokenizer decodes as decode(x0 / scaling_factor). One torch.Generator drives all
the draws, batch after batch, so a result depends only on its seed, the labels and the batch size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from tokpost_fast.models import is_continuous
from tokpost_fast.models.generator.diffusion import sample_dit
from tokpost_fast.models.generator.sampling import sample


@dataclass
class SamplingSettings:
    """METHOD.md A4 sampling: guidance scale g, power p of the cosine schedule, temperature T, top-k / top-p."""

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


def sampling_for(generator, sampling: SamplingSettings | DiTSampling | None = None):
    """`sampling`, checked against the generator's kind (None: the kind's defaults)."""
    wanted = DiTSampling if is_continuous(generator) else SamplingSettings
    sampling = sampling or wanted()
    if not isinstance(sampling, wanted):
        raise ValueError(f"a {getattr(generator, 'kind', 'ar')!r} generator samples with {wanted.__name__}, got "
                         f"{type(sampling).__name__}")
    return sampling


def balanced_labels(start: int, stop: int, num_classes: int) -> torch.Tensor:
    """Labels of samples start .. stop - 1 of a class-balanced set: 0, 1, ..., C-1, 0, 1, ... (every class gets
    floor(N/C) or ceil(N/C) of N samples)."""
    return torch.arange(start, stop, dtype=torch.long) % num_classes


@torch.no_grad()
def sample_codes(generator, labels: torch.Tensor, sampling, rng: torch.Generator, grid_size: int) -> torch.Tensor:
    """labels [B] -> what the generator makes, before any decoder: token grids [B, h, w] (AR) or latents
    x0 = z * scaling_factor [B, C, h, w] (DiT). Several decoders can then decode the very same samples."""
    if is_continuous(generator):
        return sample_dit(generator, labels, steps=sampling.steps, cfg_scale=sampling.cfg_scale, generator=rng)
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


@torch.no_grad()
def sample_images(generator, tokenizer, labels: torch.Tensor, sampling=None, rng: torch.Generator | None = None,
                  batch_size: int = 64) -> torch.Tensor:
    """labels [N] -> images [N, 3, H, W] fp32 in [-1, 1], sampled and decoded in chunks of batch_size (all drawn
    from `rng`, in order). sampling: SamplingSettings (AR) or DiTSampling (DiT); None: the kind's defaults."""
    sampling = sampling_for(generator, sampling)
    images = [sample_decoded(tokenizer, generator, chunk, sampling, rng).float().clamp(-1, 1)
              for chunk in labels.split(batch_size)]
    return torch.cat(images)
