"""Shared fixtures for the metrics tests: real photographs (the embedded data's source) and a tiny tokenizer."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PHOTOS = ("astronaut", "coffee", "chelsea")


def photo_crops(num: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """num random crops (side 96-192 px) of scikit-image's bundled photographs, resized to size x size:
    [num, 3, size, size] in [-1, 1]."""
    import skimage.data

    photos = [torch.from_numpy(np.ascontiguousarray(getattr(skimage.data, name)())).permute(2, 0, 1).float()
              for name in PHOTOS]
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(num):
        photo = photos[i % len(photos)]
        side = int(rng.integers(96, 193))
        top = int(rng.integers(0, photo.shape[1] - side + 1))
        left = int(rng.integers(0, photo.shape[2] - side + 1))
        crop = photo[:, top:top + side, left:left + side][None]
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    images = torch.cat(crops).clamp(0, 255).round()
    return images / 127.5 - 1.0


def tiny_tokenizer_config(**overrides):
    from tokpost_fast.models.tokenizer import TokenizerConfig

    values = dict(arch="vq_cnn", image_size=16, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=32,
                  codebook_size=64, codebook_embed_dim=8)
    values.update(overrides)
    return TokenizerConfig(**values)


def train_tiny_tokenizer(images: torch.Tensor, steps: int, batch: int = 32, lr: float = 2e-3, seed: int = 0):
    """build_tokenizer + `steps` Adam steps of plain MSE + codebook + 0.25 commitment (no GAN, no LPIPS)."""
    from tokpost_fast.models.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    model = build_tokenizer(tiny_tokenizer_config(image_size=images.shape[-1]))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x = images[torch.randint(0, images.shape[0], (batch,), generator=gen)]
        rec, q = model(x)
        loss = F.mse_loss(rec, x) + q.codebook_loss + 0.25 * q.commit_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), float(loss.detach())
