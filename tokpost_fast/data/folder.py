"""ImageFolder data set and the crop/flip geometry shared by the torch and DALI pipelines (SPEC B4).

The random choices of a sample are a pure function of (seed, epoch, sample index), drawn from their own numpy
generator: the same (seed, epoch) gives the same images whatever the worker count, world size or backend.
Geometry (ADM's center_crop_arr / random_crop_arr, as RobusTok and LlamaGen train):
  resize the shorter side to `short` (S in eval; U{ceil(S), ..., ceil(S / min_crop_frac)} in random-crop training),
  take the S x S window at relative position (crop_x, crop_y) in [0, 1] (0.5, 0.5 = centre), optionally mirror.
Both backends take these parameters, so only the resampling filters differ.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
import numpy as np
import torch
from PIL import Image

from tokpost_fast.data.config import DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# What PIL raises on a truncated or non-image file (UnidentifiedImageError is an OSError).
BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class CropParams:
    short: int          # shorter side after resizing
    crop_x: float       # relative window position, 0 = left edge, 1 = right edge
    crop_y: float
    flip: bool


def crop_params(cfg: DataConfig, train: bool, seed: int, epoch: int, index: int) -> CropParams:
    size = cfg.image_size
    if not train:
        return CropParams(size, 0.5, 0.5, False)
    rng = np.random.default_rng([seed, epoch, index])
    if cfg.random_crop:
        short = int(rng.integers(size, math.ceil(size / cfg.min_crop_frac) + 1))
        crop_x, crop_y = float(rng.random()), float(rng.random())
    else:
        short, crop_x, crop_y = size, 0.5, 0.5
        rng.random(2)  # keep the flip draw at the same stream position either way
    flip = bool(cfg.flip and rng.random() < 0.5)
    return CropParams(short, crop_x, crop_y, flip)


def crop_image(image: Image.Image, size: int, params: CropParams) -> Image.Image:
    """PIL RGB image -> size x size crop per params (BOX halving first, then BICUBIC, as ADM)."""
    while min(image.size) >= 2 * params.short:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = params.short / min(image.size)
    width, height = max(size, round(image.size[0] * scale)), max(size, round(image.size[1] * scale))
    image = image.resize((width, height), resample=Image.BICUBIC)
    # round half up, as DALI's crop_pos (Python's round() would go to even)
    left = math.floor(params.crop_x * (width - size) + 0.5)
    top = math.floor(params.crop_y * (height - size) + 0.5)
    image = image.crop((left, top, left + size, top + size))
    return image.transpose(Image.FLIP_LEFT_RIGHT) if params.flip else image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float32 in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def scan_image_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(relative path, label)]) with classes and files sorted; an unusable root is a ValueError."""
    if not os.path.isdir(root):
        raise ValueError(f"image folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"no class folders in {root} (expected root/<class>/<image>)")
    samples = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.relpath(os.path.join(dirpath, filename), root), label))
    if not samples:
        raise ValueError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) under the {len(classes)} class folders of {root}")
    return classes, samples


def read_image(path: str) -> Image.Image:
    """Fully decoded RGB image; a truncated or non-image file raises one of BAD_IMAGE_ERRORS."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


class ImageFolderDataset(torch.utils.data.Dataset):
    """root/<class>/<image> -> (image [3, S, S] in [-1, 1], label, sample index, unreadable paths seen).

    With on_bad_image="skip" an unreadable file is replaced by the next readable one (indices wrap), and its path
    is returned in the 4th field so the loader can warn and count it; "error" raises a ValueError naming it."""

    def __init__(self, cfg: DataConfig, train: bool, seed: int = 0, epoch: int = 0):
        self.cfg, self.train, self.seed, self.epoch = cfg, train, seed, epoch
        self.root = cfg.root
        self.classes, self.samples = scan_image_folder(cfg.root)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.samples[index][0])

    def relative_path(self, index: int) -> str:
        return self.samples[index][0]

    def params(self, index: int) -> CropParams:
        return crop_params(self.cfg, self.train, self.seed, self.epoch, index)

    def __getitem__(self, index: int):
        bad: list[tuple[str, str]] = []
        for offset in range(len(self)):
            i = (index + offset) % len(self)
            try:
                image = read_image(self.path(i))
            except BAD_IMAGE_ERRORS as err:
                if self.cfg.on_bad_image == "error":
                    raise ValueError(f"unreadable image {self.path(i)}: {err}") from None
                bad.append((self.path(i), f"{type(err).__name__}: {err}"))
                continue
            image = to_tensor(crop_image(image, self.cfg.image_size, self.params(i)))
            return image, self.samples[i][1], i, tuple(bad)
        raise ValueError(f"no readable image in {self.root} ({len(bad)} files failed)")


def collate(batch):
    """-> images [B, 3, S, S], labels [B] int64, indices [B] int64, unreadable (path, reason) tuples."""
    images, labels, indices, bad = zip(*batch)
    return (torch.stack(images), torch.tensor(labels, dtype=torch.int64), torch.tensor(indices, dtype=torch.int64),
            tuple(item for items in bad for item in items))


def first_readable(dataset: ImageFolderDataset, index: int) -> tuple[int, list[tuple[str, str]]]:
    """The DALI path's fallback: index of the first readable image at or after `index` (wrapping), and the
    unreadable ones passed over; on_bad_image="error" raises instead."""
    bad: list[tuple[str, str]] = []
    for offset in range(len(dataset)):
        i = (index + offset) % len(dataset)
        try:
            read_image(dataset.path(i))
            return i, bad
        except BAD_IMAGE_ERRORS as err:
            if dataset.cfg.on_bad_image == "error":
                raise ValueError(f"unreadable image {dataset.path(i)}: {err}") from None
            bad.append((dataset.path(i), f"{type(err).__name__}: {err}"))
    raise ValueError(f"no readable image in {dataset.root}")


# Every unreadable file this process met, across loaders and epochs (a stage builds a loader per epoch), so the
# stage can report one count at the end.
SKIPPED_IN_PROCESS: dict[str, str] = {}


def warn_skipped(seen: dict[str, str], bad) -> None:
    """Record unreadable files in `seen` and warn once per file, naming it."""
    for path, reason in bad:
        SKIPPED_IN_PROCESS.setdefault(path, reason)
        if path not in seen:
            seen[path] = reason
            warnings.warn(f"skipping unreadable image {path} ({reason}); {len(seen)} skipped so far", stacklevel=3)
