"""Rectified flow for the DiT generator: the training pair, the Euler sampler, and partial denoising for
the continuous post-training set.

    x_t = (1 - t) x0 + t eps,   eps ~ N(0, I),   t in [0, 1]     (t = 0: data, t = 1: noise)
    the model predicts the velocity v = dx_t/dt = eps - x0, trained with the MSE to it
    sampling integrates dx/dt = v from t = 1 to t = 0 with Euler steps on a uniform grid

Classifier-free guidance mixes the velocities, v = v_u + g (v_c - v_u), with the "no class" label for v_u; the two
halves run as one doubled batch. x0 is the generator's latent, z * scaling_factor of the tokenizer.

denoise_from(x0, strength s) is the diffusion analogue of the AR teacher forcing of METHOD.md A5.1 (our reading of the
paper): noise the real latent to level s, x_s = (1 - s) x0 + s eps, and let the generator bring it back to t = 0.
s = 0 returns x0 itself; s = 1 starts from pure noise and equals sample_dit with the same noise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tokpost_fast.models.generator.config import TIME_SAMPLINGS


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, I) of x's shape, drawn on the generator's device (so a CPU generator gives the same noise for a run on
    any device), returned on x's device in fp32."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device)


def sample_time(batch: int, device, method: str = "uniform", generator: torch.Generator | None = None):
    """Training times [batch] in [0, 1]: uniform, or logit-normal (sigmoid of N(0, 1), SD3), which spends more of
    the batch on the middle of the path."""
    draw_device = generator.device if generator is not None else device
    if method == "uniform":
        t = torch.rand(batch, generator=generator, device=draw_device)
    elif method == "logit_normal":
        t = torch.sigmoid(torch.randn(batch, generator=generator, device=draw_device))
    else:
        raise ValueError(f"time sampling must be one of {TIME_SAMPLINGS}, got {method!r}")
    return t.to(device)


def flow_pair(x0: torch.Tensor, generator: torch.Generator | None = None, time_sampling: str = "uniform"):
    """x0: [B, ...] -> (x_t, t [B], target velocity), all fp32. Draws t first, then eps."""
    x0 = x0.float()
    t = sample_time(x0.shape[0], x0.device, time_sampling, generator)
    eps = _noise_like(x0, generator)
    t_ = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t_) * x0 + t_ * eps, t, eps - x0


def flow_loss(velocity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(velocity.float(), target.float())


def guided_velocity(dit, x: torch.Tensor, t: float, labels: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """The (guided) velocity at time t for every row of x [B, C, h, w]; fp32."""
    times = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
    if cfg_scale == 1.0:
        return dit(x, times, labels)
    null = torch.full_like(labels, dit.null_label)
    cond, uncond = dit(torch.cat([x, x]), torch.cat([times, times]), torch.cat([labels, null])).chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def time_grid(t_start: float, steps: int) -> list[float]:
    """The Euler grid from t_start down to 0: the points of the full uniform `steps`-step grid on [0, 1] that lie
    below t_start, with t_start in front. t_start = 1 gives the full grid; t_start = s uses ceil(s * steps) steps,
    so a partial denoise costs what its share of the path costs."""
    count = max(1, math.ceil(t_start * steps - 1e-9))
    return [t_start] + [(count - 1 - i) / steps for i in range(count)]


@torch.no_grad()
def integrate(dit, x: torch.Tensor, labels: torch.Tensor, t_start: float, steps: int, cfg_scale: float = 1.0):
    """Euler from t_start to 0. x: [B, C, h, w] at t_start -> x at t = 0 (fp32; the state stays fp32 under
    autocast, only the model runs in low precision)."""
    was_training = dit.training
    dit.eval()
    x = x.float()
    try:
        grid = time_grid(t_start, steps)
        for t_cur, t_next in zip(grid[:-1], grid[1:]):
            x = x + (t_next - t_cur) * guided_velocity(dit, x, t_cur, labels, cfg_scale)
    finally:
        dit.train(was_training)
    return x


def _check(dit, labels: torch.Tensor, steps: int, cfg_scale: float) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    dit.check_labels(labels)


@torch.no_grad()
def sample_dit(dit, labels: torch.Tensor, steps: int = 50, cfg_scale: float = 1.0,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Class-conditional latents. labels: [B] on the model's device -> x0 [B, C, h, w] fp32 (z * scaling_factor:
    divide by the tokenizer's scaling_factor before decode). noise: the starting eps [B, C, h, w] (default: drawn
    from `generator`)."""
    _check(dit, labels, steps, cfg_scale)
    cfg = dit.config
    shape = (labels.shape[0], cfg.latent_channels, cfg.grid_size, cfg.grid_size)
    if noise is None:
        noise = _noise_like(torch.empty(shape, device=labels.device), generator)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must be {list(shape)}, got {list(noise.shape)}")
    return integrate(dit, noise.to(labels.device), labels, 1.0, steps, cfg_scale)


@torch.no_grad()
def denoise_from(dit, x0: torch.Tensor, labels: torch.Tensor, strength: float, steps: int = 50,
                 cfg_scale: float = 1.0, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
    """Noise x0 [B, C, h, w] to level `strength` and integrate back to t = 0 -> [B, C, h, w] fp32.
    strength 0 returns x0 bit for bit (as a copy; no noise is drawn); strength 1 equals sample_dit with the same
    noise. noise: eps [B, C, h, w] (default: drawn from `generator`), e.g. one seeded draw per image."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    _check(dit, labels, steps, cfg_scale)
    if strength == 0.0:
        return x0.clone()
    if noise is None:
        noise = _noise_like(x0, generator)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise must have x0's shape {list(x0.shape)}, got {list(noise.shape)}")
    x_s = (1 - strength) * x0.float() + strength * noise.to(x0.device).float()
    return integrate(dit, x_s, labels, strength, steps, cfg_scale)
