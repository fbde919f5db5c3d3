"""Bad data at the level a user meets it: `train.py --stage main` on an ImageFolder with a truncated PNG and
a text file named .jpg trains, warns naming each file, and reports the count at the end; with
--on-bad-image error it stops naming the file; an empty folder is a one-line error before any training."""

import json

import pytest

from tests.stages.conftest import run_python, write_image_folder, write_main_config

pytestmark = pytest.mark.slow


@pytest.fixture
def bad_folder(tmp_path):
    root = write_image_folder(tmp_path / "images", classes=2, per_class=8)
    good = (root / "class0" / "img000.png").read_bytes()
    (root / "class0" / "img900_truncated.png").write_bytes(good[: len(good) // 2])
    (root / "class1" / "img901_notes.jpg").write_text("not an image")
    return root


def test_bad_images_are_skipped_named_and_counted(bad_folder, tmp_path):
    config = write_main_config(tmp_path / "tiny.yaml", bad_folder, train={"epochs": 2, "ckpt_interval": 100})
    run = tmp_path / "run"
    result = run_python(["--stage", "main", "--config", config, "--run-dir", run, "--max-steps", 9])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "img900_truncated.png" in result.stderr and "img901_notes.jpg" in result.stderr
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    counted = [r for r in rows if "unreadable" in r]
    assert len(counted) == 1 and counted[0]["event"].startswith("2 unreadable images were skipped")
    assert sorted(p.rsplit("/", 1)[-1] for p in counted[0]["unreadable"]) == ["img900_truncated.png",
                                                                               "img901_notes.jpg"]


def test_bad_image_error_mode_and_empty_folder(bad_folder, tmp_path):
    config = write_main_config(tmp_path / "tiny.yaml", bad_folder)
    result = run_python(["--stage", "main", "--config", config, "--run-dir", tmp_path / "run", "--max-steps", 12,
                         "--on-bad-image", "error"])
    assert result.returncode != 0 and "unreadable image" in result.stderr
    assert "img900_truncated.png" in result.stderr or "img901_notes.jpg" in result.stderr

    (tmp_path / "empty").mkdir()
    config = write_main_config(tmp_path / "empty.yaml", tmp_path / "empty")
    result = run_python(["--stage", "main", "--config", config, "--run-dir", tmp_path / "run2"])
    assert result.returncode != 0
    assert "no class folders" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run2" / "log.jsonl").exists()                     # nothing started
