"""VQTokenizer: encoder -> quant_conv -> VectorQuantizer -> post_quant_conv -> decoder (docs/INTERFACES.md).

Top-level names are LlamaGen's VQModel (encoder, quant_conv, quantize, post_quant_conv, decoder); for arch "vq_cnn"
the whole state dict is LlamaGen's. For arch "vit" the backbones are models/tokenizer/vit.py and quant_conv /
post_quant_conv are the paper's 1x1 convs width -> C and C -> width around the quantizer.
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional, Union

import torch
import torch.nn as nn

from tokpost_fast.models.tokenizer.cnn import Decoder, Encoder
from tokpost_fast.models.tokenizer.config import VQ_ARCHS, TokenizerConfig
from tokpost_fast.models.tokenizer.kl import KLTokenizer
from tokpost_fast.models.tokenizer.parameter_groups import AutoencoderParameterGroups
from tokpost_fast.models.tokenizer.quantizer import VectorQuantizer
from tokpost_fast.models.tokenizer.vit import ViTDecoder, ViTEncoder
from tokpost_fast.ops import QuantizeOutput

log = logging.getLogger("tokpost_fast.tokenizer")


class VQTokenizer(AutoencoderParameterGroups, nn.Module):
    is_continuous = False   # discrete codes; the continuous KLTokenizer (models/tokenizer/kl.py) says True

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        c = config
        if c.arch not in VQ_ARCHS:
            raise ValueError(f"VQTokenizer needs TokenizerConfig.arch in {VQ_ARCHS}, got {c.arch!r} "
                             "(build_tokenizer picks the class)")
        if c.arch == "vq_cnn":
            self.encoder = Encoder(3, c.ch, c.ch_mult, c.num_res_blocks, c.dropout, c.z_channels)
            self.decoder = Decoder(c.z_channels, c.ch, c.ch_mult, c.num_res_blocks, c.dropout, 3)
            hidden = c.z_channels
        else:
            vit = dict(image_size=c.image_size, patch_size=c.patch_size, width=c.width, depth=c.depth, heads=c.heads,
                       mlp_ratio=c.mlp_ratio, num_latent_tokens=c.num_latent_tokens, drop_path=c.drop_path)
            self.encoder = ViTEncoder(**vit)
            self.decoder = ViTDecoder(**vit)
            hidden = c.width
        self.quantize = VectorQuantizer(c.codebook_size, c.codebook_embed_dim, c.codebook_l2_norm,
                                        usage_buffer=c.arch == "vq_cnn", backend=c.quantizer_backend)
        self.quant_conv = nn.Conv2d(hidden, c.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.codebook_embed_dim, hidden, 1)

    # sizes ---------------------------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def codebook_dim(self) -> int:
        return self.config.codebook_embed_dim

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def semantic_width(self) -> Optional[int]:
        """Feature width that semantic_projection accepts (the ViT width), None for the CNN."""
        return self.config.width if self.config.arch == "vit" else None

    # the pipeline --------------------------------------------------------------------------------------------
    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, H, W] in [-1, 1] -> z [B, C, h, w], before the quantizer."""
        h = self.encoder(x)
        if self.config.arch == "vit":                                   # [B, L, W] -> [B, W, g, g]
            g = self.grid_size
            h = h.transpose(1, 2).reshape(h.shape[0], -1, g, g)
        return self.quant_conv(h)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q [B, C, h, w] -> image [B, 3, H, W]."""
        h = self.post_quant_conv(z_q)
        if self.config.arch == "vit":
            h = h.flatten(2).transpose(1, 2)                            # [B, L, W]
        return self.decoder(h)

    def forward(self, x: torch.Tensor, perturb_rate: float = 0.0, perturb_topk: int = 1,
                perturb_samples: Optional[int] = None, seed: Optional[int] = None
                ) -> tuple[torch.Tensor, QuantizeOutput]:
        q = self.quantize(self.encode_latent(x), perturb_rate, perturb_topk, perturb_samples, seed)
        return self.decode(q.z_q), q

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Clean nearest codes [B, h, w] int64."""
        return self.quantize(self.encode_latent(x)).indices

    def decode_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B, h, w] -> image [B, 3, H, W]."""
        return self.decode(self.quantize.lookup(indices))

    def semantic_projection(self, features: torch.Tensor) -> torch.Tensor:
        """The paper maps the DINOv2 class feature through quant_conv itself (METHOD.md A1): [B, W] -> [B, C]."""
        if self.semantic_width is None or features.shape[-1] != self.semantic_width:
            raise ValueError(f"semantic_projection takes [B, {self.semantic_width}] features, "
                             f"got {tuple(features.shape)}")
        return self.quant_conv(features[:, :, None, None]).flatten(1)

    # parameter groups (last_layer, encoder / decoder: AutoencoderParameterGroups) ----------------------------
    def codebook_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.quantize.parameters()


Tokenizer = Union[VQTokenizer, KLTokenizer]


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """A KLTokenizer for arch "kl_cnn", else a VQTokenizer; for arch "vit" with cfg.dinov2_weights, both
    backbones start from DINOv2 (RobusTok)."""
    if cfg.arch == "kl_cnn":
        if cfg.dinov2_weights:
            raise ValueError("TokenizerConfig.dinov2_weights applies to arch 'vit' only")
        return KLTokenizer(cfg)
    model = VQTokenizer(cfg)
    if cfg.arch == "vit" and cfg.dinov2_weights:
        from tokpost_fast.models.tokenizer.dinov2 import dinov2_arch, load_dinov2_into, load_dinov2_state_dict

        arch = dinov2_arch(load_dinov2_state_dict(cfg.dinov2_weights))
        want = (cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio)
        if (arch.width, arch.depth, arch.heads, arch.mlp_ratio) != want:
            raise ValueError(f"DINOv2 weights {cfg.dinov2_weights} are width {arch.width}, depth {arch.depth}, "
                             f"heads {arch.heads}, mlp_ratio {arch.mlp_ratio}; the config asks for width, depth, "
                             f"heads, mlp_ratio = {want}")
        for part in (model.encoder, model.decoder):
            load_dinov2_into(part.model, cfg.dinov2_weights)
        log.info("ViT tokenizer initialised from DINOv2 %s", cfg.dinov2_weights)
    elif cfg.dinov2_weights:
        raise ValueError("TokenizerConfig.dinov2_weights applies to arch 'vit' only")
    return model
