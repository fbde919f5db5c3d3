"""ImageFolder loading: torch and DALI (CPU) pipelines, determinism and sharding, bad files, bad folders."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from tokpost_fast.data import DataConfig, build_loader, crop_params, dali_available

CLASSES = ["cat", "dog", "owl"]


def write_folder(root, per_class=4):
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        os.makedirs(root / name)
        for i in range(per_class):
            h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
            # smooth content (upsampled 2x2 noise): the torch-vs-DALI comparison measures geometry, not how two
            # resampling filters treat pixel noise
            coarse = Image.fromarray(rng.integers(0, 256, (2, 2, 3), dtype=np.uint8))
            ext = "png" if i % 2 else "jpg"
            coarse.resize((w, h), Image.BICUBIC).save(root / name / f"{name}{i}.{ext}")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("images"))


def collect(loader):
    return [tuple(t.clone() for t in batch) for batch in loader]


def cfg_for(root, **kw):
    return DataConfig(**{"root": str(root), "image_size": 16, "batch_size": 3, "num_workers": 0,
                         "backend": "torch", **kw})


def test_torch_pipeline_shapes_range_labels(folder):
    loader = build_loader(cfg_for(folder), train=True, rank=0, world_size=1, seed=0, epoch=0)
    assert loader.dataset.classes == CLASSES and len(loader) == 4
    for images, labels, indices in loader:
        assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
        assert images.min() >= -1 and images.max() <= 1
        for label, index in zip(labels.tolist(), indices.tolist()):
            assert loader.dataset.relative_path(index).startswith(CLASSES[label] + os.sep)


def test_deterministic_for_seed_and_epoch_and_sharded(folder):
    cfg = cfg_for(folder)
    first = collect(build_loader(cfg, True, 0, 2, seed=3, epoch=1))
    again = collect(build_loader(cfg_for(folder, num_workers=2), True, 0, 2, seed=3, epoch=1))
    assert all(torch.equal(a, b) for x, y in zip(first, again) for a, b in zip(x, y))   # any worker count
    other_epoch = collect(build_loader(cfg, True, 0, 2, seed=3, epoch=2))
    assert not all(torch.equal(x[2], y[2]) for x, y in zip(first, other_epoch))
    rank1 = collect(build_loader(cfg, True, 1, 2, seed=3, epoch=1))
    seen0 = torch.cat([b[2] for b in first]).tolist()
    seen1 = torch.cat([b[2] for b in rank1]).tolist()
    assert not set(seen0) & set(seen1) and len(seen0) + len(seen1) == 12


def test_eval_is_center_crop_without_flip(folder):
    cfg = cfg_for(folder, batch_size=5)
    loader = build_loader(cfg, train=False)
    batches = collect(loader)
    assert [len(b[0]) for b in batches] == [5, 5, 2]                  # eval keeps the last partial batch
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(12))
    p = crop_params(cfg, train=False, seed=0, epoch=0, index=3)
    assert (p.short, p.crop_x, p.crop_y, p.flip) == (16, 0.5, 0.5, False)


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_cpu_matches_torch(folder):
    for train in (True, False):
        torch_batches = collect(build_loader(cfg_for(folder), train, 0, 1, seed=5, epoch=0))
        dali_loader = build_loader(cfg_for(folder, backend="dali"), train, 0, 1, seed=5, epoch=0)
        assert type(dali_loader).__name__ == "DaliImageLoader" and len(dali_loader) == len(torch_batches)
        dali_batches = collect(dali_loader)
        for (ti, tl, tx), (di, dl, dx) in zip(torch_batches, dali_batches):
            assert di.shape == ti.shape and di.dtype == torch.float32 and not di.is_cuda
            assert di.min() >= -1 and di.max() <= 1
            assert torch.equal(tl, dl) and torch.equal(tx, dx)
            # same geometry; only the resampling filters differ (PIL bicubic vs DALI cubic)
            assert (di - ti).abs().mean() < 0.03


@pytest.fixture
def folder_with_bad_files(tmp_path):
    root = write_folder(tmp_path / "data", per_class=2)
    good = (root / "dog" / "dog1.png").read_bytes()
    (root / "dog" / "dog2_truncated.png").write_bytes(good[: len(good) // 2])
    (root / "owl" / "owl9_notes.jpg").write_text("not an image")
    return root


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_bad_images_are_skipped_with_a_warning(folder_with_bad_files, backend):
    if backend == "dali" and not dali_available():
        pytest.skip("nvidia-dali not installed")
    loader = build_loader(cfg_for(folder_with_bad_files, backend=backend, batch_size=8), train=False)
    with pytest.warns(UserWarning) as record:
        batches = collect(loader)
    text = " ".join(str(w.message) for w in record)
    assert "dog2_truncated.png" in text and "owl9_notes.jpg" in text
    assert set(loader.skipped) == {str(folder_with_bad_files / "dog" / "dog2_truncated.png"),
                                   str(folder_with_bad_files / "owl" / "owl9_notes.jpg")}
    assert sum(len(b[0]) for b in batches) == 8                        # slots refilled with readable images
    good = {i for i, (rel, _) in enumerate(loader.dataset.samples) if "truncated" not in rel and "notes" not in rel}
    assert set(torch.cat([b[2] for b in batches]).tolist()) <= good


def test_bad_image_error_mode(folder_with_bad_files):
    loader = build_loader(cfg_for(folder_with_bad_files, on_bad_image="error", batch_size=8), train=False)
    with pytest.raises(ValueError, match="dog2_truncated.png"):
        collect(loader)


def test_unusable_folders(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        build_loader(cfg_for(tmp_path / "missing"), train=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        build_loader(cfg_for(tmp_path / "empty"), train=True)
    (tmp_path / "noimages" / "cls").mkdir(parents=True)
    (tmp_path / "noimages" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        build_loader(cfg_for(tmp_path / "noimages"), train=True)
    with pytest.raises(ValueError, match="backend"):
        DataConfig(backend="opencv")


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_start_batch_yields_the_rest_of_the_epoch_without_reading_the_skipped(folder, backend, monkeypatch):
    """A resumed epoch: start_batch=2 gives batches 2.. of the same (seed, epoch) order, and never decodes the
    images of batches 0 and 1."""
    if backend == "dali" and not dali_available():
        pytest.skip("nvidia-dali not installed")
    from tokpost_fast.data import folder as folder_module

    cfg = cfg_for(folder, backend=backend, batch_size=3)
    full = collect(build_loader(cfg, train=True, seed=5, epoch=3))           # 12 images: 4 batches
    read = []
    original = folder_module.ImageFolderDataset.path
    monkeypatch.setattr(folder_module.ImageFolderDataset, "path",
                        lambda self, i: read.append(i) or original(self, i))
    loader = build_loader(cfg, train=True, seed=5, epoch=3, start_batch=2)
    rest = collect(loader)
    assert len(loader) == len(full) - 2 and len(rest) == len(full) - 2 >= 1
    for (x, y, i), (fx, fy, fi) in zip(rest, full[2:]):
        assert torch.equal(i, fi) and torch.equal(y, fy) and torch.equal(x, fx)
    skipped = set(torch.cat([b[2] for b in full[:2]]).tolist())
    assert read and not skipped & set(read)
    with pytest.raises(ValueError, match="start_batch"):
        build_loader(cfg, train=True, start_batch=-1)
