"""The embedded data set built from scikit-image's photographs: classes, layout, idempotence, loadability."""

import json
import os

import pytest

from tokpost_fast.data import DataConfig, build_loader
from tokpost_fast.data.embedded import MANIFEST, PHOTOS, build_embedded, main, skimage_photos


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded") / "set"
    manifest = build_embedded(str(out), size=16, per_class=3, seed=0)
    return out, manifest


def test_builds_one_class_per_photo(embedded):
    out, manifest = embedded
    present = skimage_photos()
    assert len(present) >= 4 and set(present) <= set(PHOTOS)
    assert manifest["classes"] == sorted(present) == sorted(e.name for e in os.scandir(out) if e.is_dir())
    for name in manifest["classes"]:
        assert sorted(os.listdir(out / name)) == [f"{name}_{i:05d}.png" for i in range(3)]
    assert manifest["num_images"] == 3 * len(present)
    loader = build_loader(DataConfig(root=str(out), image_size=16, batch_size=4, num_workers=0, backend="torch"),
                          train=True)
    images, labels, _ = next(iter(loader))
    assert images.shape == (4, 3, 16, 16)


def test_idempotent_and_rebuilt_on_new_settings(embedded, capsys):
    out, manifest = embedded
    stamp = os.path.getmtime(out / MANIFEST)
    file = out / manifest["files"][0]
    before = file.read_bytes()
    assert main(["--out", str(out), "--size", "16", "--per-class", "3"]) == 0      # complete: left alone
    assert os.path.getmtime(out / MANIFEST) == stamp and file.read_bytes() == before
    assert "images" in capsys.readouterr().out
    os.remove(file)                                                               # incomplete: rebuilt
    again = build_embedded(str(out), size=16, per_class=3, seed=0)
    assert file.read_bytes() == before and again["files"] == manifest["files"]    # deterministic
    bigger = build_embedded(str(out), size=16, per_class=4, seed=0)               # other settings: rebuilt
    assert bigger["num_images"] == 4 * len(manifest["classes"])
    with open(out / MANIFEST) as f:
        assert json.load(f)["per_class"] == 4
    assert not [p for p in os.listdir(out.parent) if ".tmp-" in p]                # no temp folders left
