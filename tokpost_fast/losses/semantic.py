"""Semantic regulariser (METHOD.md A1): InfoNCE between a frozen DINOv2 class feature of the input, mapped to the
codebook dim, and the spatial mean of the (possibly perturbed) quantized latent.

As RobusTok (xqgan_model.py + ClipLoss): the teacher is DINOv2 run at our image size with patch 16; its class
token (after the final norm) goes through the tokenizer's own quant_conv (ViT width -> C) when the widths match,
else through a trainable nn.Linear owned here (the CNN case; RobusTok's sem_linear). Features are not normalised,
logit scale 1; the loss is the symmetric cross-entropy over the *global* batch: with torch.distributed initialised
both feature sets are all-gathered with gradient (losses/contrastive.gather_with_grad) and every rank computes the
same global loss. Built only when DINOv2 weights are given.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn as nn

from tokpost_fast.losses.config import warn_once
from tokpost_fast.losses.contrastive import info_nce
from tokpost_fast.models.tokenizer.dinov2 import adapt_dinov2, dinov2_arch, load_dinov2_state_dict
from tokpost_fast.models.tokenizer.state import load_state_dict_strict
from tokpost_fast.models.tokenizer.vit import ViTBackbone

log = logging.getLogger("tokpost_fast.losses")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DINOv2Teacher(nn.Module):
    """Frozen DINOv2: image in [-1, 1] -> class feature [B, width]."""

    def __init__(self, weights: str, image_size: int, patch_size: int = 16):
        super().__init__()
        state = load_dinov2_state_dict(weights)
        arch = dinov2_arch(state)
        if image_size % patch_size:
            raise ValueError(f"semantic teacher: image_size {image_size} is not a multiple of patch {patch_size}")
        self.model = ViTBackbone(image_size, patch_size, arch.width, arch.depth, arch.heads, arch.mlp_ratio)
        load_state_dict_strict(self.model, adapt_dinov2(state, self.model.grid, patch_size, True),
                               what=f"DINOv2 weights {weights}")
        self.width = arch.width
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "DINOv2Teacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images.float() + 1) / 2 - self.mean) / self.std
        x = self.model.with_cls(self.model.patch_embed(x))
        return self.model.run_blocks(x)[:, 0]


class SemanticLoss(nn.Module):
    def __init__(self, teacher: DINOv2Teacher, codebook_dim: int, own_projection: bool,
                 logit_scale: float = 1.0):
        super().__init__()
        self.teacher = teacher
        self.logit_scale = logit_scale
        self.proj = nn.Linear(teacher.width, codebook_dim) if own_projection else None

    def forward(self, images: torch.Tensor, z_q: torch.Tensor,
                projection: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1], z_q [B, C, h, w] -> [] (unweighted). `projection` maps [B, width] ->
        [B, C]: the tokenizer's semantic_projection (its quant_conv); required unless this loss owns one."""
        features = self.teacher(images)                                    # [B, width], no grad
        project = self.proj if self.proj is not None else projection
        if project is None:
            raise ValueError("SemanticLoss needs projection= (the tokenizer's semantic_projection)")
        with torch.autocast(device_type=z_q.device.type, enabled=False):
            target = project(features.float())                             # [B, C], trains the projection
            latent = z_q.float().mean(dim=(2, 3))                          # [B, C]
            return info_nce(target, latent, self.logit_scale)


def build_semantic(dinov2_weights: Optional[str], tokenizer: nn.Module, patch_size: int = 16,
                   logit_scale: float = 1.0) -> Optional[SemanticLoss]:
    """SemanticLoss for this tokenizer, or None without DINOv2 weights (the caller then uses weight 0)."""
    if dinov2_weights is None:
        warn_once("semantic", "semantic loss is OFF: no DINOv2 teacher (no DINOv2 weights given); weight 0")
        return None
    teacher = DINOv2Teacher(dinov2_weights, tokenizer.config.image_size, patch_size)
    own = tokenizer.semantic_width != teacher.width
    if own:
        log.info("semantic loss: teacher width %d != tokenizer width %s; using its own trainable projection",
                 teacher.width, tokenizer.semantic_width)
    # the InfoNCE compares against the spatial mean of the latent: codebook vectors, or continuous latent channels
    dim = tokenizer.latent_channels if getattr(tokenizer, "is_continuous", False) else tokenizer.codebook_dim
    return SemanticLoss(teacher, dim, own_projection=own, logit_scale=logit_scale)
