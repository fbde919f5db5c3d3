"""DataConfig: where the images are and how they are cropped and batched (METHOD.md B4)."""

from __future__ import annotations

from dataclasses import dataclass

from tokpost_fast.checks import field_check

BACKENDS = ("auto", "dali", "torch")
ON_BAD_IMAGE = ("skip", "error")


@dataclass
class DataConfig:
    root: str = "data/embedded"     # ImageFolder layout: root/<class>/<image>.{jpg,jpeg,png,...}
    image_size: int = 64            # square output side S
    batch_size: int = 32            # per rank
    num_workers: int = 2            # torch backend: DataLoader workers; dali backend: decoder threads
    random_crop: bool = True        # train: ADM random_crop_arr (shorter side to U{S..ceil(S/0.8)}, random window);
                                    # otherwise (and always in eval) ADM center_crop_arr
    flip: bool = True               # train: horizontal flip with probability 0.5
    backend: str = "auto"           # "auto": DALI when installed and a GPU is present, else torch
    on_bad_image: str = "skip"      # "skip": warn naming the file, count it, use the next readable image
    min_crop_frac: float = 0.8      # random_crop: smallest crop fraction of the shorter side (ADM / RobusTok)
    # held-out split (data/folder.py): a root/val/ folder when there is one, else floor(n * val_fraction) of each
    # class's n files, chosen by a hash of (split_seed, path); training stages never read them, metrics only them
    val_fraction: float = 0.1
    split_seed: int = 0

    def __post_init__(self) -> None:
        check = field_check(self, "DataConfig")

        check("image_size", self.image_size >= 1, "must be >= 1")
        check("batch_size", self.batch_size >= 1, "must be >= 1")
        check("num_workers", self.num_workers >= 0, "must be >= 0")
        check("backend", self.backend in BACKENDS, f"must be one of {BACKENDS}")
        check("on_bad_image", self.on_bad_image in ON_BAD_IMAGE, f"must be one of {ON_BAD_IMAGE}")
        check("min_crop_frac", 0.0 < self.min_crop_frac <= 1.0, "must be in (0, 1]")
        check("val_fraction", 0.0 <= self.val_fraction < 1.0, "must be in [0, 1)")
        check("split_seed", self.split_seed >= 0, "must be >= 0")
