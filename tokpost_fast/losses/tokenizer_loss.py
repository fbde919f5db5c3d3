"""TokenizerLoss: the two sides of the tokenizer objective that the trainer calls (METHOD.md A1; RobusTok vq_loss.py).

Generator side:
    L = rec * MSE + perceptual * LPIPS + w * gan * hinge_g(D(aug(x_rec))) + codebook * L_cb + commit * L_commit
        + semantic * InfoNCE,   w = adaptive_gan_weight (or 1), GAN term 0 before disc_start.
    For a continuous (KL) tokenizer the codebook and commitment terms are replaced by kl * KL(q(z|x) || N(0, I)).
Discriminator side (from disc_start on):
    L_D = gan * (hinge_d(D(aug(x)), D(aug(x_rec))) + lecam * LeCam)

The discriminator is passed in as a callable `images -> logits`, so the trainer decides how it runs: in the
generator step through torch.func.functional_call with detached parameters (DeepSpeed), in the discriminator step
through its engine. This module holds the frozen LPIPS / DINOv2 nets, the LeCam EMA buffers and (CNN tokenizer
only) the semantic projection; `trainable_parameters()` lists what must join the autoencoder's optimizer.
Logged values are detached scalar tensors (no device sync until the trainer reads them).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from tokpost_fast.losses.config import LossConfig, warn_once
from tokpost_fast.losses.gan import DiffAugment, LeCamEMA, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from tokpost_fast.losses.perceptual import PerceptualLoss, build_perceptual
from tokpost_fast.losses.reconstruction import reconstruction_loss
from tokpost_fast.losses.semantic import SemanticLoss, build_semantic
from tokpost_fast.models.tokenizer.kl import KLOutput
from tokpost_fast.ops import QuantizeOutput

Discriminator = Callable[[torch.Tensor], torch.Tensor]


class TokenizerLoss(nn.Module):
    def __init__(self, cfg: LossConfig, perceptual: Optional[PerceptualLoss] = None,
                 semantic: Optional[SemanticLoss] = None):
        super().__init__()
        self.cfg = cfg
        self.perceptual = perceptual
        self.semantic = semantic
        self.lecam = LeCamEMA(cfg.lecam_decay)
        self.diffaug = (DiffAugment(cfg.diffaug_policy, cfg.diffaug_translation, cfg.diffaug_cutout)
                        if cfg.diffaug else None)
        self.perceptual_weight = cfg.perceptual if perceptual is not None else 0.0
        self.semantic_weight = cfg.semantic if semantic is not None else 0.0
        if perceptual is None and cfg.perceptual > 0:
            warn_once("perceptual", "perceptual loss is OFF: no LPIPS network (no VGG16 weights given); weight 0")
        if semantic is None and cfg.semantic > 0:
            warn_once("semantic", "semantic loss is OFF: no DINOv2 teacher (no DINOv2 weights given); weight 0")

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms count at this step; the trainer skips the discriminator step when False."""
        return self.cfg.gan > 0 and step >= self.cfg.disc_start

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of this module that train with the autoencoder (the CNN's semantic projection), else []."""
        if self.semantic is not None and self.semantic.proj is not None:
            return list(self.semantic.proj.parameters())
        return []

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return self.diffaug(x) if self.diffaug is not None else x

    def generator_loss(self, images: torch.Tensor, recon: torch.Tensor, *, step: int,
                       q: Optional[Union[QuantizeOutput, KLOutput]] = None, z_q: Optional[torch.Tensor] = None,
                       discriminator: Optional[Discriminator] = None, last_layer: Optional[torch.Tensor] = None,
                       semantic_projection: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images (the clean target) and recon [B, 3, H, W]; q: the tokenizer's QuantizeOutput (codebook/commit
        terms) or KLOutput (KL term), None in post-training, where tokens are given; z_q [B, C, h, w]: the latent
        the decoder saw, for the semantic term (default q.z_q / q.z); discriminator and last_layer are needed once
        gan_active(step); semantic_projection: tokenizer.semantic_projection."""
        cfg = self.cfg
        logs: dict[str, torch.Tensor] = {}
        rec = reconstruction_loss(images, recon, cfg.rec_type)
        nll = cfg.rec * rec
        logs["rec_loss"] = rec.detach()
        if self.perceptual is not None and self.perceptual_weight > 0:
            p_loss = self.perceptual(images, recon)
            nll = nll + self.perceptual_weight * p_loss
            logs["perceptual_loss"] = p_loss.detach()
        total = nll

        if self.gan_active(step):
            if discriminator is None:
                raise ValueError(f"generator_loss at step {step} >= disc_start needs discriminator=")
            g_loss = hinge_g_loss(discriminator(self._augment(recon)))
            if cfg.adaptive_gan_weight:
                if last_layer is None:
                    raise ValueError("adaptive_gan_weight needs last_layer= (tokenizer.last_layer())")
                weight = adaptive_gan_weight(nll, g_loss, last_layer)
            else:
                weight = torch.ones((), device=recon.device)
            total = total + weight * cfg.gan * g_loss
            logs["gan_loss"] = g_loss.detach()
            logs["gan_adaptive_weight"] = weight

        if isinstance(q, KLOutput):
            total = total + cfg.kl * q.kl_loss
            logs["kl_loss"] = q.kl_loss.detach()
        elif q is not None:
            total = total + cfg.codebook * q.codebook_loss + cfg.commit * q.commit_loss
            logs["codebook_loss"] = q.codebook_loss.detach()
            logs["commit_loss"] = q.commit_loss.detach()

        if z_q is not None or q is None:
            latent = z_q
        else:
            latent = q.z if isinstance(q, KLOutput) else q.z_q
        if self.semantic is not None and self.semantic_weight > 0 and latent is not None:
            sem = self.semantic(images, latent, semantic_projection)
            total = total + self.semantic_weight * sem
            logs["semantic_loss"] = sem.detach()

        logs["loss"] = total.detach()
        return total, logs

    def discriminator_loss(self, images: torch.Tensor, recon: torch.Tensor, *, step: int,
                           discriminator: Discriminator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss (+ LeCam) on detached real and reconstructed images. Before disc_start it returns a zero
        with no graph: check gan_active(step) and skip the step instead of back-propagating it."""
        if not self.gan_active(step):
            zero = torch.zeros((), device=images.device)
            return zero, {"disc_loss": zero}
        logits_real = discriminator(self._augment(images.detach()))
        logits_fake = discriminator(self._augment(recon.detach()))
        d_loss = hinge_d_loss(logits_real, logits_fake)
        logs = {"disc_hinge": d_loss.detach(), "logits_real": logits_real.detach().float().mean(),
                "logits_fake": logits_fake.detach().float().mean()}
        if self.cfg.lecam > 0:
            self.lecam.update(logits_real, logits_fake)
            reg = self.lecam.regularizer(logits_real, logits_fake)
            d_loss = d_loss + self.cfg.lecam * reg
            logs["lecam_reg"] = reg.detach()
        total = self.cfg.gan * d_loss
        logs["disc_loss"] = total.detach()
        return total, logs


def build_tokenizer_loss(cfg: LossConfig, tokenizer: nn.Module) -> TokenizerLoss:
    """TokenizerLoss with LPIPS and the DINOv2 teacher built from cfg's local weight paths (each None = off)."""
    perceptual = build_perceptual(cfg.perceptual_weights) if cfg.perceptual > 0 else None
    semantic = None
    if cfg.semantic > 0:
        semantic = build_semantic(cfg.dinov2_weights, tokenizer, cfg.semantic_patch_size, cfg.semantic_logit_scale)
    return TokenizerLoss(cfg, perceptual, semantic)
