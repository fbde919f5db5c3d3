"""The tokenizer objective (METHOD.md A1): reconstruction, LPIPS perceptual, hinge GAN with the adaptive weight,
DiffAugment and LeCam, the DINOv2 semantic InfoNCE; LossConfig holds every weight, TokenizerLoss combines them."""

from tokpost_fast.losses.config import LossConfig
from tokpost_fast.losses.contrastive import info_nce
from tokpost_fast.losses.gan import DiffAugment, LeCamEMA, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from tokpost_fast.losses.perceptual import PerceptualLoss, build_perceptual
from tokpost_fast.losses.reconstruction import reconstruction_loss
from tokpost_fast.losses.semantic import DINOv2Teacher, SemanticLoss, build_semantic
from tokpost_fast.losses.tokenizer_loss import TokenizerLoss, build_tokenizer_loss

__all__ = [
    "DINOv2Teacher",
    "DiffAugment",
    "LeCamEMA",
    "LossConfig",
    "PerceptualLoss",
    "SemanticLoss",
    "TokenizerLoss",
    "adaptive_gan_weight",
    "build_perceptual",
    "build_semantic",
    "build_tokenizer_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "info_nce",
    "reconstruction_loss",
]
