"""The held-out split (data/folder.py): deterministic, disjoint, per class, independent of the listing order; a
val/ folder when the user has one; what the stages and the metrics read."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tokpost_fast.data import DataConfig, ImageFolderDataset, build_loader


def write_images(root, classes=("a", "b", "c"), per_class=10, offset=0):
    rng = np.random.default_rng(offset)
    for name in classes:
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i + offset:03d}.png")
    return root


def cfg(root, **kw):
    return DataConfig(**{"root": str(root), "image_size": 8, "batch_size": 2, "num_workers": 0, "backend": "torch",
                         **kw})


def paths(dataset):
    return [p for p, _ in dataset.samples]


def test_fraction_split_is_per_class_disjoint_and_deterministic(tmp_path):
    root = write_images(tmp_path / "images", per_class=10)
    train = ImageFolderDataset(cfg(root, val_fraction=0.3), train=True)
    val = ImageFolderDataset(cfg(root, val_fraction=0.3), train=False, split="val")
    everything = ImageFolderDataset(cfg(root, val_fraction=0.3), train=False, split="all")
    assert len(val) == 9 and len(train) == 21 and len(everything) == 30          # floor(10 * 0.3) per class
    assert not set(paths(train)) & set(paths(val))
    assert sorted(paths(everything)) == sorted(paths(train) + paths(val))
    assert [sum(1 for _, label in val.samples if label == c) for c in range(3)] == [3, 3, 3]
    assert val.split_sizes == {"train": 21, "val": 9} and "val_fraction 0.3" in val.split_how
    again = ImageFolderDataset(cfg(root, val_fraction=0.3), train=False, split="val")
    assert paths(again) == paths(val)
    other_seed = ImageFolderDataset(cfg(root, val_fraction=0.3, split_seed=1), train=False, split="val")
    assert set(paths(other_seed)) != set(paths(val))


def test_membership_depends_on_the_file_not_the_listing(tmp_path):
    """The same files in another folder (another listing order of directory entries, other mtimes) give the same
    split; adding files to a class keeps most of the old val files in val."""
    root = write_images(tmp_path / "images", per_class=20)
    copy = tmp_path / "copy"
    for name in ("c", "b", "a"):                      # created in another order
        shutil.copytree(root / name, copy / name)
    val = paths(ImageFolderDataset(cfg(root, val_fraction=0.25), train=False, split="val"))
    assert paths(ImageFolderDataset(cfg(copy, val_fraction=0.25), train=False, split="val")) == val
    write_images(copy, per_class=4, offset=100)       # 24 per class now: 6 val each
    grown = paths(ImageFolderDataset(cfg(copy, val_fraction=0.25), train=False, split="val"))
    assert len(grown) == 18 and len(set(grown) & set(val)) >= 12


def test_a_val_folder_is_the_validation_split(tmp_path):
    root = tmp_path / "images"
    write_images(root / "train", per_class=4)
    write_images(root / "val", classes=("a", "c"), per_class=2, offset=50)
    val = ImageFolderDataset(cfg(root, val_fraction=0.5), train=False, split="val")
    train = ImageFolderDataset(cfg(root), train=True)
    assert val.classes == train.classes == ["a", "b", "c"] and len(train) == 12 and len(val) == 4
    assert all(p.startswith("val" + os.sep) for p in paths(val)) and {label for _, label in val.samples} == {0, 2}
    assert "val/ folder" in val.split_how
    image, label, index, _ = val[0]
    assert image.shape == (3, 8, 8) and os.path.isfile(val.path(index))
    # classes next to val/ (no train/ folder) are the training classes
    flat = tmp_path / "flat"
    write_images(flat, per_class=3)
    write_images(flat / "val", classes=("b",), per_class=2, offset=60)
    assert len(ImageFolderDataset(cfg(flat), train=True)) == 9
    assert [label for _, label in ImageFolderDataset(cfg(flat), train=False, split="val").samples] == [1, 1]


def test_bad_splits_are_one_line_errors(tmp_path):
    root = write_images(tmp_path / "images", per_class=3)
    with pytest.raises(ValueError, match=r"the val split is empty \(9 train, 0 val .*raise data.val_fraction"):
        ImageFolderDataset(cfg(root), train=False, split="val")         # floor(3 * 0.1) = 0
    with pytest.raises(ValueError, match="split='test'"):
        ImageFolderDataset(cfg(root), train=False, split="test")
    with pytest.raises(ValueError, match=r"DataConfig.val_fraction=1.0: must be in \[0, 1\)"):
        cfg(root, val_fraction=1.0)
    write_images(root / "val", classes=("zebra",), per_class=1)
    with pytest.raises(ValueError, match=r"class folders \['zebra'\] are not among the training classes"):
        ImageFolderDataset(cfg(root), train=False, split="val")


def test_loaders_read_the_train_split_unless_told(tmp_path):
    root = write_images(tmp_path / "images", per_class=8)
    config = cfg(root, val_fraction=0.25)
    seen = {int(i) for _, _, idx in build_loader(config, train=False) for i in idx}
    val_loader = build_loader(config, train=False, split="val")
    val_seen = {val_loader.dataset.relative_path(int(i)) for _, _, idx in val_loader for i in idx}
    train_paths = {build_loader(config, train=False).dataset.relative_path(i) for i in seen}
    assert len(train_paths) == 18 and len(val_seen) == 6 and not train_paths & val_seen


def test_embedded_demo_split(tmp_path):
    """configs/demo.yaml's split of the embedded set: 32 of each class's 128 crops held out."""
    from tokpost_fast.data.embedded import build_embedded

    root = tmp_path / "embedded"
    build_embedded(str(root), size=16, per_class=16)
    val = ImageFolderDataset(cfg(root, image_size=16, val_fraction=0.25), train=False, split="val")
    assert val.split_sizes == {"train": 12 * len(val.classes), "val": 4 * len(val.classes)}
