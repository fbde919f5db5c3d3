"""KLTokenizer: a continuous KL-regularised autoencoder (the SD-VAE, diffusers AutoencoderKL layout).

    x -> encoder -> quant_conv -> (mean, logvar) -> z = mean + std * eps  [-> Gaussian latent perturbation]
      -> post_quant_conv -> decoder -> x_rec

Top-level names are diffusers' (encoder, decoder, quant_conv, post_quant_conv), so the whole state dict is an
AutoencoderKL's. The posterior is diffusers' DiagonalGaussianDistribution (logvar clamped to [-30, 20]); its KL to
N(0, I) is returned as a mean per latent element (docs/INTERFACES.md), not diffusers' sum per sample.

The latent perturbation is our continuous analogue of METHOD.md A2 (which resamples codes of a VQ latent): Gaussian
noise added to the sampled latent of the first `perturb_samples` images, sigma relative to each image's own latent
std (detached) so the encoder cannot make the perturbation negligible by scaling its latents up. Generators
consume z * scaling_factor (SD's 0.18215 makes SD-VAE latents about unit variance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn as nn

from tokpost_fast.models.tokenizer.config import TokenizerConfig
from tokpost_fast.models.tokenizer.kl_blocks import KLDecoder, KLEncoder
from tokpost_fast.models.tokenizer.parameter_groups import AutoencoderParameterGroups

LOGVAR_RANGE = (-30.0, 20.0)   # diffusers / LDM DiagonalGaussianDistribution


@dataclass
class KLOutput:
    z: torch.Tensor          # [B, C, h, w] what the decoder saw: sampled (or the mean), then perturbed
    mean: torch.Tensor       # [B, C, h, w] posterior mean
    logvar: torch.Tensor     # [B, C, h, w] clamped posterior log-variance
    kl_loss: torch.Tensor    # [] KL(q(z|x) || N(0, I)), mean over every latent element of the batch


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per element, averaged: 0.5 * mean(mean^2 + var - 1 - logvar)."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def gaussian_perturb(z: torch.Tensor, noise: float, samples: Optional[int] = None, seed: Optional[int] = None
                     ) -> torch.Tensor:
    """z [B, C, h, w] -> z with z[b] + noise * std(z[b]) * eps_b on the first `samples` rows (None: every row),
    the std over (C, h, w) and detached. eps ~ N(0, I) is drawn on the CPU from a generator keyed by `seed` (the
    same draw on every device; None: torch's global RNG) and is independent of the other rows, so rows past
    `samples` are returned unchanged (bit for bit)."""
    n = z.shape[0] if samples is None else max(0, min(int(samples), z.shape[0]))
    if noise < 0:
        raise ValueError(f"gaussian_perturb: noise={noise} must be >= 0")
    if noise == 0 or n == 0:
        return z
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    eps = torch.randn((n, *z.shape[1:]), generator=gen, dtype=torch.float32).to(device=z.device, dtype=z.dtype)
    head = z[:n]
    scale = head.detach().flatten(1).float().std(dim=1).to(z.dtype).view(n, *([1] * (z.dim() - 1)))
    return torch.cat([head + noise * scale * eps, z[n:]], dim=0)


class KLTokenizer(AutoencoderParameterGroups, nn.Module):
    is_continuous = True

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        if config.arch != "kl_cnn":
            raise ValueError(f"KLTokenizer needs TokenizerConfig.arch 'kl_cnn', got {config.arch!r}")
        self.config = c = config
        self.encoder = KLEncoder(c.block_out_channels, c.layers_per_block, c.latent_channels, c.norm_num_groups,
                                 dropout=c.dropout)
        self.decoder = KLDecoder(c.block_out_channels, c.layers_per_block, c.latent_channels, c.norm_num_groups,
                                 dropout=c.dropout)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1)

    # sizes ---------------------------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def scaling_factor(self) -> float:
        """Multiply latents by it before a generator sees them. None in the config (preset demo_kl) means "not
        measured yet": main training measures it at export; until then 1.0."""
        sf = self.config.scaling_factor
        return 1.0 if sf is None else float(sf)

    semantic_width = None   # no feature width shared with DINOv2: the semantic loss brings its own projection

    # the pipeline --------------------------------------------------------------------------------------------
    def encode_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, 3, H, W] in [-1, 1] -> (mean, logvar), each [B, C, h, w]; logvar clamped as diffusers."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean [B, C, h, w] (deterministic; diffusers' latent_dist.mode())."""
        return self.encode_posterior(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, C, h, w] (unscaled latent) -> image [B, 3, H, W]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, perturb_noise: float = 0.0, perturb_samples: Optional[int] = None,
                seed: Optional[int] = None, sample_posterior: bool = True) -> tuple[torch.Tensor, KLOutput]:
        """Reconstruction through a posterior sample (sample_posterior; the mean otherwise, e.g. for evaluation),
        with the Gaussian latent perturbation on the first `perturb_samples` images (None: all) when
        perturb_noise > 0. The posterior draw uses torch's global RNG (the trainer reseeds it every step); the
        perturbation draw is keyed by `seed`."""
        mean, logvar = self.encode_posterior(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample_posterior else mean
        z = gaussian_perturb(z, perturb_noise, perturb_samples, seed)
        return self.decode(z), KLOutput(z=z, mean=mean, logvar=logvar, kl_loss=gaussian_kl(mean, logvar))

    def semantic_projection(self, features: torch.Tensor) -> torch.Tensor:
        raise ValueError("KLTokenizer has no semantic projection of its own (the semantic loss owns one)")

    # parameter groups (last_layer, encoder / decoder: AutoencoderParameterGroups) ----------------------------
    def codebook_parameters(self) -> Iterator[nn.Parameter]:
        return iter(())


@torch.no_grad()
def estimate_scaling_factor(model: KLTokenizer, images: torch.Tensor, batch_size: int = 64) -> float:
    """1 / std of the posterior means of `images` [N, 3, H, W] over every latent element (how SD's 0.18215 was
    measured), in eval mode and fp32 on the model's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    latents = torch.cat([model.encode_latent(images[i:i + batch_size].to(device)).float().cpu()
                         for i in range(0, images.shape[0], batch_size)])
    model.train(was_training)
    std = float(latents.double().std())
    if not std > 0:
        raise ValueError(f"estimate_scaling_factor: the latents of {images.shape[0]} images have std {std}")
    return 1.0 / std
