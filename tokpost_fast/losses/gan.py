"""GAN pieces of the tokenizer objective (METHOD.md A1): hinge losses, the adaptive generator weight, DiffAugment and
the LeCam regulariser. The discriminator itself is models/tokenizer/discriminator.py."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-E[D(G(z))]."""
    return -logits_fake.float().mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """clamp(||d rec / d W|| / (||d gan / d W|| + 1e-4), 0, 1e4), detached; W = the decoder's last weight
    (taming / LlamaGen calculate_adaptive_weight). rec_loss is the weighted rec + perceptual sum."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.float().norm() / (gan_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach()


class DiffAugment:
    """Differentiable augmentation applied to every discriminator input (StyleGAN-T's DiffAug as RobusTok runs it,
    prob 1): per sample, in policy order,
    - color: brightness + U(-0.5, 0.5); saturation x U(0, 2); contrast x U(0.5, 1.5);
    - translation: integer shift up to `translation` of the size in each axis, zero fill;
    - cutout: zero a square of `cutout` of the size at a uniform centre.
    Gradients flow to the input (the generator step back-propagates through it)."""

    def __init__(self, policy: str = "color,translation,cutout", translation: float = 0.125, cutout: float = 0.2):
        self.ops = [op.strip() for op in policy.split(",") if op.strip()]
        unknown = [op for op in self.ops if op not in ("color", "translation", "cutout")]
        if unknown:
            raise ValueError(f"DiffAugment: unknown ops {unknown}")
        self.translation, self.cutout = translation, cutout

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        # x: [B, C, H, W] -> [B, C, H, W]
        for op in self.ops:
            x = getattr(self, f"_{op}")(x, generator)
        return x

    @staticmethod
    def _rand(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        return torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=generator, dtype=torch.float32).to(x.dtype)

    def _color(self, x, generator):
        x = x + (self._rand(x, generator) - 0.5)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (self._rand(x, generator) * 2) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (self._rand(x, generator) + 0.5) + mean

    def _translation(self, x, generator):
        b, _, h, w = x.shape
        max_h, max_w = round(h * self.translation), round(w * self.translation)
        shift_h = (self._rand(x, generator).view(b, 1).float() * (2 * max_h + 1)).floor().long() - max_h
        shift_w = (self._rand(x, generator).view(b, 1).float() * (2 * max_w + 1)).floor().long() - max_w
        # Index into a 1-pixel zero border: sources outside the image land on it.
        rows = (torch.arange(h, device=x.device).view(1, h) + shift_h + 1).clamp(0, h + 1)     # [B, H]
        cols = (torch.arange(w, device=x.device).view(1, w) + shift_w + 1).clamp(0, w + 1)     # [B, W]
        padded = F.pad(x, (1, 1, 1, 1))
        batch = torch.arange(b, device=x.device).view(b, 1, 1)
        return padded.permute(0, 2, 3, 1)[batch, rows.view(b, h, 1), cols.view(b, 1, w)].permute(0, 3, 1, 2)

    def _cutout(self, x, generator):
        b, _, h, w = x.shape
        size_h, size_w = round(h * self.cutout), round(w * self.cutout)
        if size_h == 0 or size_w == 0:
            return x
        top = (self._rand(x, generator).view(b, 1).float() * (h + 1 - size_h % 2)).floor().long() - size_h // 2
        left = (self._rand(x, generator).view(b, 1).float() * (w + 1 - size_w % 2)).floor().long() - size_w // 2
        r = torch.arange(h, device=x.device).view(1, h)
        c = torch.arange(w, device=x.device).view(1, w)
        in_rows = (r >= top) & (r < top + size_h)                                              # [B, H]
        in_cols = (c >= left) & (c < left + size_w)                                            # [B, W]
        keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
        return x * keep[:, None].to(x.dtype)


class LeCamEMA(nn.Module):
    """LeCam regulariser (Tseng et al. 2021) with EMAs of the mean real / fake logits, as RobusTok's LeCAM_EMA:
    reg = E[relu(D(x) - ema_fake)^2] + E[relu(ema_real - D(G(z)))^2], the EMAs updated first (decay 0.999,
    init 0). The EMAs are buffers (checkpointed with the loss) and averaged over ranks when distributed, so every
    rank holds the same values."""

    def __init__(self, decay: float = 0.999, init: float = 0.0):
        super().__init__()
        self.decay = decay
        self.register_buffer("logits_real_ema", torch.tensor(float(init)))
        self.register_buffer("logits_fake_ema", torch.tensor(float(init)))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        means = torch.stack([logits_real.float().mean(), logits_fake.float().mean()])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            means = means.to(self.logits_real_ema.device)
            dist.all_reduce(means)
            means /= dist.get_world_size()
        means = means.to(self.logits_real_ema.device)
        self.logits_real_ema.mul_(self.decay).add_(means[0] * (1 - self.decay))
        self.logits_fake_ema.mul_(self.decay).add_(means[1] * (1 - self.decay))

    def regularizer(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        real_ema = self.logits_real_ema.to(logits_real.device)
        fake_ema = self.logits_fake_ema.to(logits_real.device)
        return (F.relu(logits_real.float() - fake_ema).pow(2).mean()
                + F.relu(real_ema - logits_fake.float()).pow(2).mean())
