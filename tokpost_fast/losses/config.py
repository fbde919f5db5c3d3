"""LossConfig: every weight of the tokenizer objective (METHOD.md A1), with the values RobusTok's main training ran
(configs/main-train.yaml, xqgan_train.py defaults) unless noted."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from tokpost_fast.checks import field_check

log = logging.getLogger("tokpost_fast.losses")
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Log a warning the first time `key` comes up in this process (e.g. a loss term switched off)."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message)

DIFFAUG_OPS = ("color", "translation", "cutout")


@dataclass
class LossConfig:
    rec: float = 1.0                    # pixel reconstruction weight
    rec_type: str = "mse"               # "mse" (RobusTok's l2) | "l1"
    perceptual: float = 1.0             # LPIPS weight; forced to 0 (logged once) without perceptual_weights
    perceptual_weights: Optional[str] = None  # local VGG16 weights (torchvision or full LPIPS state dict)
    gan: float = 0.5                    # hinge GAN weight (xqgan_train --disc-weight), both sides
    adaptive_gan_weight: bool = True    # scale the generator's GAN term by ||grad rec|| / ||grad gan|| (last layer)
    disc_start: int = 0                 # optimizer step at which the GAN terms (and the discriminator) switch on
    disc_ndf: int = 64                  # PatchGAN width
    disc_layers: int = 3                # PatchGAN depth
    codebook: float = 1.0               # ||z_q - sg(z)||^2
    commit: float = 0.25                # ||sg(z_q) - z||^2 (the quantizer returns it unweighted)
    # continuous (KL) tokenizers only, instead of codebook / commit: KL(q(z|x) || N(0, I)) as a mean per latent
    # element. SD/LDM's 1e-6 multiplies a per-sample *sum* against a summed pixel loss; against our mean MSE the
    # same number weighs the KL (3 H W) / (C h w) times more (48x at f8c4): a firmer pull towards N(0, I)
    kl: float = 1e-6
    semantic: float = 0.1               # InfoNCE weight; 0 without dinov2_weights
    semantic_logit_scale: float = 1.0   # RobusTok's sem_loss_scale (unnormalised features, scale 1)
    semantic_patch_size: int = 16       # the teacher DINOv2 runs at patch 16 on our image size, as RobusTok
    dinov2_weights: Optional[str] = None  # local DINOv2 weights for the frozen semantic teacher
    lecam: float = 0.001                # LeCam regulariser weight on the discriminator side
    lecam_decay: float = 0.999          # EMA decay of the mean real / fake logits
    diffaug: bool = True                # DiffAugment on every discriminator input (real and fake)
    # RobusTok's DiffAug(prob=1, cutout=0.2) applies color, translation (1/8) and cutout (0.2) each step
    diffaug_policy: str = "color,translation,cutout"
    diffaug_translation: float = 0.125
    diffaug_cutout: float = 0.2

    def __post_init__(self) -> None:
        check = field_check(self, "LossConfig")

        for name in ("rec", "perceptual", "gan", "codebook", "commit", "kl", "semantic", "lecam"):
            check(name, getattr(self, name) >= 0, "weights must be >= 0")
        check("rec_type", self.rec_type in ("mse", "l1"), "must be 'mse' or 'l1'")
        check("disc_start", self.disc_start >= 0, "must be >= 0")
        check("lecam_decay", 0.0 <= self.lecam_decay < 1.0, "must be in [0, 1)")
        ops = [op.strip() for op in self.diffaug_policy.split(",") if op.strip()]
        check("diffaug_policy", all(op in DIFFAUG_OPS for op in ops), f"ops must be among {DIFFAUG_OPS}")
        check("diffaug_translation", 0.0 <= self.diffaug_translation < 1.0, "must be in [0, 1)")
        check("diffaug_cutout", 0.0 <= self.diffaug_cutout < 1.0, "must be in [0, 1)")
