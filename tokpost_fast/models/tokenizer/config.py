"""Tokenizer configuration and the size presets (METHOD.md A1).

Three architectures share one config:
- "vq_cnn": LlamaGen's VQ-16 CNN (tokenizer/tokenizer_image/vq_model.py): conv encoder with ch * ch_mult channels,
  one 2x downsample per level but the last, so grid_size = image_size / 2**(len(ch_mult) - 1).
- "vit": the paper's RobusTok ViT (DINOv2-style blocks): image patches + num_latent_tokens learnable latent tokens,
  grid_size = sqrt(num_latent_tokens).
- "kl_cnn": a continuous KL autoencoder, diffusers' AutoencoderKL (the SD-VAE) with its field names
  (block_out_channels, layers_per_block, latent_channels, norm_num_groups, scaling_factor); one 2x downsample per
  block but the last, so grid_size = image_size / 2**(len(block_out_channels) - 1). No codebook: the codebook_*
  fields are ignored.
Defaults are the tiny CPU demo ("demo" preset: the paper's ViT at 64x64, ~0.9M parameters); the paper sizes
and LlamaGen's VQ-16 are presets.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, Optional

from tokpost_fast.checks import build_section, field_check

ARCHS = ("vq_cnn", "vit", "kl_cnn")
VQ_ARCHS = ("vq_cnn", "vit")


@dataclass
class TokenizerConfig:
    arch: str = "vit"
    image_size: int = 64
    codebook_size: int = 1024           # K
    codebook_embed_dim: int = 16        # C, the quantizer's vector dim
    codebook_l2_norm: bool = True       # cosine quantizer (METHOD.md A1); False = plain squared-L2 nearest code
    quantizer_backend: str = "auto"     # tokpost_fast.ops backend
    # vq_cnn (LlamaGen VQ-16 names)
    ch: int = 32
    ch_mult: List[int] = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = 1
    z_channels: int = 64
    dropout: float = 0.0
    # vit (RobusTok: ViT-B from DINOv2, patch 16, 256 latent tokens)
    width: int = 128
    depth: int = 2                      # blocks in the encoder and, separately, in the decoder
    heads: int = 4
    mlp_ratio: float = 4.0
    patch_size: int = 8
    num_latent_tokens: int = 64
    drop_path: float = 0.0              # stochastic depth; the paper's code trains with 0.1
    dinov2_weights: Optional[str] = None  # local DINOv2 state dict (timm or official layout) for both ViTs
    # kl_cnn (diffusers AutoencoderKL names; the defaults are the SD-VAE's)
    block_out_channels: List[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2           # resnets per encoder block (the decoder has one more, as diffusers)
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: Optional[float] = 0.18215  # generators see z * scaling_factor; None: main training measures
                                               # it at export (1 / std of the training latents), as SD did

    def __post_init__(self) -> None:
        self.ch_mult = list(self.ch_mult)
        self.block_out_channels = list(self.block_out_channels)

        check = field_check(self, "TokenizerConfig")

        check("arch", self.arch in ARCHS, f"must be one of {ARCHS}")
        check("image_size", self.image_size >= 1, "must be >= 1")
        check("codebook_size", self.codebook_size >= 1, "must be >= 1")
        check("codebook_embed_dim", self.codebook_embed_dim >= 1, "must be >= 1")
        check("dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)")
        check("drop_path", 0.0 <= self.drop_path < 1.0, "must be in [0, 1)")
        if self.arch == "vq_cnn":
            check("ch_mult", len(self.ch_mult) >= 1 and all(m >= 1 for m in self.ch_mult), "needs >= 1 positive entry")
            # GroupNorm(32) everywhere, as LlamaGen
            check("ch", self.ch >= 32 and all(self.ch * m % 32 == 0 for m in self.ch_mult),
                  "ch * every ch_mult must be a multiple of 32 (GroupNorm with 32 groups)")
            check("num_res_blocks", self.num_res_blocks >= 1, "must be >= 1")
            check("z_channels", self.z_channels >= 1, "must be >= 1")
            down = 2 ** (len(self.ch_mult) - 1)
            check("image_size", self.image_size % down == 0, f"must be a multiple of 2**(len(ch_mult)-1) = {down}")
        elif self.arch == "kl_cnn":
            g = self.norm_num_groups
            check("norm_num_groups", g >= 1, "must be >= 1")
            check("block_out_channels", len(self.block_out_channels) >= 1
                  and all(c >= 1 and c % g == 0 for c in self.block_out_channels),
                  f"needs >= 1 entry, each a positive multiple of norm_num_groups={g} (GroupNorm)")
            check("layers_per_block", self.layers_per_block >= 1, "must be >= 1")
            check("latent_channels", self.latent_channels >= 1, "must be >= 1")
            check("scaling_factor", self.scaling_factor is None or self.scaling_factor > 0,
                  "must be > 0, or None (measured at the end of main training)")
            down = 2 ** (len(self.block_out_channels) - 1)
            check("image_size", self.image_size % down == 0,
                  f"must be a multiple of 2**(len(block_out_channels)-1) = {down}")
        else:
            check("heads", self.heads >= 1 and self.width % self.heads == 0, "width must be a multiple of heads")
            check("depth", self.depth >= 1, "must be >= 1")
            check("patch_size", self.patch_size >= 1 and self.image_size % self.patch_size == 0,
                  "image_size must be a multiple of patch_size")
            g = math.isqrt(self.num_latent_tokens)
            check("num_latent_tokens", self.num_latent_tokens >= 1 and g * g == self.num_latent_tokens,
                  "must be a perfect square (the latent tokens form a grid_size x grid_size grid)")

    @property
    def grid_size(self) -> int:
        if self.arch == "vq_cnn":
            return self.image_size // 2 ** (len(self.ch_mult) - 1)
        if self.arch == "kl_cnn":
            return self.image_size // 2 ** (len(self.block_out_channels) - 1)
        return math.isqrt(self.num_latent_tokens)

    @property
    def is_continuous(self) -> bool:
        """A continuous (KL) tokenizer: latents, no codebook; its model says the same (models.is_continuous)."""
        return self.arch not in VQ_ARCHS

    @classmethod
    def from_dict(cls, values: dict) -> "TokenizerConfig":
        """A saved config (a checkpoint's "config"), strictly: unknown keys and wrong types are a ConfigError
        naming them (tokpost_fast.checks.build_section, which also builds the run config's tokenizer section)."""
        return build_section(cls, values, cls.__name__)


TOKENIZER_PRESETS: dict[str, TokenizerConfig] = {
    # tiny ViT for CPU tests and `make demo`: 64x64, patch 8, 64 latent tokens -> 8x8, width 128, 2+2 blocks,
    # K=1024, C=16 (~0.9M parameters)
    "demo": TokenizerConfig(),
    # tiny LlamaGen-layout CNN: 64x64 -> 8x8 tokens, ch 32, ch_mult [1,2,2,2], K=1024, C=8 (~1.4M parameters;
    # ~3x the demo ViT's CPU time: full-resolution 3x3 convs)
    "demo_cnn": TokenizerConfig(arch="vq_cnn", codebook_embed_dim=8),
    # LlamaGen VQ-16 (vq_ds16_c2i.pt): 256 -> 16x16, K=16384, dim 8, ch 128, ch_mult [1,1,2,2,4], ~72M
    "vq16": TokenizerConfig(arch="vq_cnn", image_size=256, codebook_size=16384, codebook_embed_dim=8, ch=128,
                            ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=256),
    # RobusTok (configs/main-train.yaml): ViT-B/16 from DINOv2, 256 latent tokens -> 16x16, K=4096, dim 64
    "robustok": TokenizerConfig(arch="vit", image_size=256, codebook_size=4096, codebook_embed_dim=64, width=768,
                                depth=12, heads=12, patch_size=16, num_latent_tokens=256, drop_path=0.1),
    # tiny continuous KL autoencoder for the CPU demo: 64x64 -> 16x16 x 4 latents (f4c4, what a tiny DiT with
    # patch 1 models as 256 tokens), blocks (32, 64, 64), one resnet per encoder block (~0.9M parameters);
    # scaling_factor measured at the end of main training
    "demo_kl": TokenizerConfig(arch="kl_cnn", block_out_channels=[32, 64, 64], layers_per_block=1,
                               latent_channels=4, norm_num_groups=32, scaling_factor=None),
    # Stable Diffusion's VAE (diffusers AutoencoderKL, sd-vae-ft-mse / ema): 256 -> 32x32 x 4 (f8c4), ~84M
    "sdvae": TokenizerConfig(arch="kl_cnn", image_size=256, block_out_channels=[128, 256, 512, 512],
                             layers_per_block=2, latent_channels=4, norm_num_groups=32, scaling_factor=0.18215),
}


def tokenizer_config(preset: str, **overrides) -> TokenizerConfig:
    """A preset with fields replaced, e.g. tokenizer_config("robustok", dinov2_weights="/w/dinov2_vitb14.pth")."""
    if preset not in TOKENIZER_PRESETS:
        raise ValueError(f"unknown tokenizer preset {preset!r}; choose from {sorted(TOKENIZER_PRESETS)}")
    base = TOKENIZER_PRESETS[preset]
    lists = {"ch_mult": list(base.ch_mult), "block_out_channels": list(base.block_out_channels)}
    return dataclasses.replace(base, **{**lists, **overrides})


CODEBOOK_INITS = ("uniform", "kmeans")


@dataclass
class CodebookConfig:
    """Codebook health in main training (config section `codebook`, models/tokenizer/quantizer.py). Training-only:
    the exported tokenizer does not depend on these fields. The defaults are the paper's quantizer (METHOD.md A1):
    uniform init, no restarts; dead codes are still counted for the log."""

    init: str = "uniform"          # "uniform": U(-1/K, 1/K), l2-normalised (METHOD.md A1); "kmeans": k-means centroids
                                   # of the encoder outputs of the first training images (ops.kmeans)
    kmeans_images: int = 256       # training images (over all ranks) behind the k-means init; their tokens must
                                   # number >= K
    kmeans_iters: int = 10
    restart_dead: bool = False     # re-initialise dead codes from current encoder outputs (DeadCodeTracker)
    dead_threshold: float = 1.0    # a code assigned fewer tokens per step than this (an EMA over all ranks; the
                                   # uniform share is global tokens per step / K) counts as unused ...
    dead_window: int = 50          # ... and is dead after this many steps in a row unused
    usage_decay: float = 0.99      # EMA decay of the per-code assignment counts

    def __post_init__(self) -> None:
        check = field_check(self, "codebook")

        check("init", self.init in CODEBOOK_INITS, f"must be one of {CODEBOOK_INITS}")
        check("kmeans_images", self.kmeans_images >= 1, "must be >= 1")
        check("kmeans_iters", self.kmeans_iters >= 0, "must be >= 0")
        check("dead_threshold", self.dead_threshold > 0, "must be > 0")
        check("dead_window", self.dead_window >= 1, "must be >= 1")
        check("usage_decay", 0.0 <= self.usage_decay < 1.0, "must be in [0, 1)")
