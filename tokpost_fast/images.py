"""Image grids as PNG files: the one writer behind the sample CLI, the stages' sample grids and the report.

    save_image_grid(path, images, nrow)     images [N, 3, H, W] in [-1, 1], nrow images per row

Layout (torchvision's make_grid with padding=pad, pad_value=1): a white `pad`-pixel frame around and between the
images, rows filled left to right, the last row's empty cells white. Written atomically (tokpost_fast/atomic.py):
a reader never sees half a PNG.
"""

from __future__ import annotations

import os

import torch
from PIL import Image

from tokpost_fast.atomic import atomic_write_with


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2) -> torch.Tensor:
    """images [N, 3, H, W] in [-1, 1] -> uint8 [rows * (H + pad) + pad, nrow * (W + pad) + pad, 3] (HWC)."""
    if images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be [N, C, H, W] with N >= 1, got shape {tuple(images.shape)}")
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be an int >= 1, got {nrow!r}")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be an int >= 0, got {pad!r}")
    count, channels, height, width = images.shape
    columns = min(nrow, count)
    rows = -(-count // columns)
    canvas = torch.ones(channels, rows * (height + pad) + pad, columns * (width + pad) + pad)
    pixels = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
    for index in range(count):
        y, x = pad + (index // columns) * (height + pad), pad + (index % columns) * (width + pad)
        canvas[:, y:y + height, x:x + width] = pixels[index]
    return (canvas.permute(1, 2, 0) * 255).round().to(torch.uint8)


def save_image_grid(path: str | os.PathLike, images: torch.Tensor, nrow: int, pad: int = 2) -> None:
    """images [N, 3, H, W] in [-1, 1] -> a PNG grid at `path` with `nrow` images per row (see the module doc)."""
    array = image_grid(images, nrow, pad).numpy()
    atomic_write_with(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
