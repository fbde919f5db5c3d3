"""ImageFolder data set, its train / val split, and the crop/flip geometry shared by the torch and DALI pipelines
(METHOD.md B4).

Split (deterministic, so every stage and the evaluation agree without storing anything): when the folder has a
`val/` subfolder (root/val/<class>/..., training images in root/train/<class>/... or root/<class>/...), that is the
validation split. Otherwise each class's files are ranked by blake2b(f"{split_seed}:{relative path}") and the first
floor(n * val_fraction) of them are validation images: the same files for any listing order, and adding files to
a class moves few others. Tokenizer, generator, cache and post-training read split "train"; every reported metric
reads split "val".

The random choices of a sample are a pure function of (seed, epoch, sample index), drawn from their own numpy
generator: the same (seed, epoch) gives the same images whatever the worker count, world size or backend.
Geometry (ADM's center_crop_arr / random_crop_arr, as RobusTok and LlamaGen train):
  resize the shorter side to `short` (S in eval; U{ceil(S), ..., ceil(S / min_crop_frac)} in random-crop training),
  take the S x S window at relative position (crop_x, crop_y) in [0, 1] (0.5, 0.5 = centre), optionally mirror.
Both backends take these parameters, so only the resampling filters differ.
"""

from __future__ import annotations

import hashlib
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


def scan_image_folder(root: str, exclude: tuple[str, ...] = (), classes: list[str] | None = None,
                      relative_to: str | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(relative path, label)]) with classes and files sorted; an unusable root is a ValueError.
    exclude: top-level folder names that are not classes; classes: label the folders by this list instead (a
    folder outside it is an error); relative_to: the folder the paths are relative to (default root)."""
    if not os.path.isdir(root):
        raise ValueError(f"image folder not found: {root}")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
                   and e.name not in exclude)
    if not found:
        raise ValueError(f"no class folders in {root} (expected root/<class>/<image>)")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{root}: class folders {unknown} are not among the training classes {classes}")
    samples = []
    for name in found:
        label = classes.index(name)
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.relpath(os.path.join(dirpath, filename), relative_to or root), label))
    if not samples:
        raise ValueError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) under the {len(found)} class folders of {root}")
    return classes, samples


SPLITS = ("train", "val", "all")
VAL_FOLDER, TRAIN_FOLDER = "val", "train"


def _split_rank(seed: int, relative_path: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{relative_path}".encode(), digest_size=8).digest()


def split_image_folder(cfg: DataConfig) -> tuple[list[str], dict[str, list[tuple[str, int]]], str]:
    """(classes, {"train": samples, "val": samples}, how the split was made). Paths are relative to cfg.root."""
    root = cfg.root
    if os.path.isdir(os.path.join(root, VAL_FOLDER)):
        train_root = os.path.join(root, TRAIN_FOLDER)
        if os.path.isdir(train_root):
            classes, train = scan_image_folder(train_root, relative_to=root)
        else:
            classes, train = scan_image_folder(root, exclude=(VAL_FOLDER,))
        _, val = scan_image_folder(os.path.join(root, VAL_FOLDER), classes=classes, relative_to=root)
        return classes, {"train": train, "val": val}, f"the {VAL_FOLDER}/ folder"
    classes, samples = scan_image_folder(root)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    val = set()
    for members in by_class.values():
        ranked = sorted(members, key=lambda sample: _split_rank(cfg.split_seed, sample[0]))
        val.update(path for path, _ in ranked[:math.floor(len(members) * cfg.val_fraction)])
    split = {"train": [s for s in samples if s[0] not in val], "val": [s for s in samples if s[0] in val]}
    return classes, split, f"val_fraction {cfg.val_fraction:g} of each class (split_seed {cfg.split_seed})"


def read_image(path: str) -> Image.Image:
    """Fully decoded RGB image; a truncated or non-image file raises one of BAD_IMAGE_ERRORS."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


class ImageFolderDataset(torch.utils.data.Dataset):
    """root/<class>/<image> -> (image [3, S, S] in [-1, 1], label, sample index, unreadable paths seen).

    split: "train" (the default: what every training stage reads), "val" (what every metric is measured on) or
    "all" (train then val); `train` only switches the augmentation on. With on_bad_image="skip" an unreadable file
    is replaced by the next readable one of the split (indices wrap), and its path is returned in the 4th field so
    the loader can warn and count it; "error" raises a ValueError naming it."""

    def __init__(self, cfg: DataConfig, train: bool, seed: int = 0, epoch: int = 0, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: must be one of {SPLITS}")
        self.cfg, self.train, self.seed, self.epoch, self.split = cfg, train, seed, epoch, split
        self.root = cfg.root
        self.classes, splits, self.split_how = split_image_folder(cfg)
        self.split_sizes = {name: len(samples) for name, samples in splits.items()}
        self.samples = splits["train"] + splits["val"] if split == "all" else splits[split]
        if not self.samples:
            raise ValueError(f"{cfg.root}: the {split} split is empty ({self.split_sizes['train']} train, "
                             f"{self.split_sizes['val']} val images; split by {self.split_how}); raise "
                             "data.val_fraction or add a val/ folder" if split == "val" else
                             f"{cfg.root}: the {split} split is empty (split by {self.split_how})")

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
