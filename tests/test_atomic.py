"""tokpost_fast/atomic.py: a write either lands whole or not at all, and a killed writer's leftovers are ours to
clean; plus the two readers that must survive a kill mid-write (checkpoint manifests, the JSON-lines log)."""

import json
import os

import pytest
import torch

from tokpost_fast.atomic import (atomic_folder, atomic_open, atomic_torch_save, atomic_write_json, atomic_write_with,
                                 file_sha256, remove_stale_temps)
from tokpost_fast.training.checkpoint import MANIFEST, STATE_FILE, checkpoint_problem, latest_checkpoint, manifest_of
from tokpost_fast.training.run_log import JsonlLog


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "state.pt"
    atomic_torch_save({"v": 1}, target)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_open(target, "wb") as f:
            f.write(b"half a checkpoint")
            raise RuntimeError("disk full")
    assert torch.load(target, weights_only=True) == {"v": 1}
    assert sorted(os.listdir(tmp_path)) == ["state.pt"]

    def half_writer(name):
        with open(name, "wb") as f:
            f.write(b"half")
        raise OSError("killed writer")

    with pytest.raises(OSError):
        atomic_write_with(target, half_writer)
    assert sorted(os.listdir(tmp_path)) == ["state.pt"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(target, "a"):
            pass


def test_atomic_folder_lands_whole_or_not_at_all(tmp_path):
    out = tmp_path / "dataset"
    with atomic_folder(out) as tmp:
        os.makedirs(os.path.join(tmp, "a"))
        (tmp_path / "dataset.seen").write_text(str(os.path.exists(out)))     # not there while being written
        with open(os.path.join(tmp, "a", "x.txt"), "w") as f:
            f.write("first")
    assert (tmp_path / "dataset.seen").read_text() == "False" and (out / "a" / "x.txt").read_text() == "first"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_folder(out) as tmp:
            with open(os.path.join(tmp, "partial.txt"), "w") as f:
                f.write("half")
            raise RuntimeError("killed builder")
    assert sorted(os.listdir(out)) == ["a"]                                  # the old folder is untouched
    with atomic_folder(out) as tmp:                                          # a complete rebuild replaces it
        with open(os.path.join(tmp, "y.txt"), "w") as f:
            f.write("second")
    assert sorted(os.listdir(out)) == ["y.txt"]
    assert sorted(os.listdir(tmp_path)) == ["dataset", "dataset.seen"]       # no temporary folder left


def test_remove_stale_temps_removes_only_our_temps(tmp_path):
    for name in (".shard-00001.safetensors.ab12.tmp", ".index.json.x.tmp", "keep.tmp", ".hidden", "shard.pt"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".dir.tmp").mkdir()
    assert remove_stale_temps(tmp_path) == [".index.json.x.tmp", ".shard-00001.safetensors.ab12.tmp"]
    assert sorted(os.listdir(tmp_path)) == [".dir.tmp", ".hidden", "keep.tmp", "shard.pt"]
    assert remove_stale_temps(tmp_path / "absent") == []


def _fake_checkpoint(root, step):
    folder = root / "checkpoints" / f"step-{step:08d}"
    (folder / "autoencoder" / "ds").mkdir(parents=True)
    torch.save({"step": step}, folder / STATE_FILE)
    (folder / "autoencoder" / "ds" / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4096))
    atomic_write_json(folder / MANIFEST, manifest_of(folder), sort_keys=True)
    return folder


def test_latest_checkpoint_verifies_and_falls_back(tmp_path, caplog):
    old, new = _fake_checkpoint(tmp_path, 3), _fake_checkpoint(tmp_path, 6)
    (tmp_path / "checkpoints" / "step-00000009.tmp").mkdir()           # a save killed before its rename
    assert latest_checkpoint(tmp_path) == new
    weights = new / "autoencoder" / "ds" / "mp_rank_00_model_states.pt"
    blob = bytearray(weights.read_bytes())
    blob[100] ^= 1
    weights.write_bytes(bytes(blob))
    assert checkpoint_problem(new) == f"{weights} does not match the sha256 in its manifest"
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(tmp_path) == old
    assert "skipping a damaged checkpoint" in caplog.text and str(weights) in caplog.text

    weights.write_bytes(bytes(blob[:-10]))
    assert "has 4086 bytes, its manifest says 4096" in checkpoint_problem(new)
    (old / STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no usable checkpoint.*4086 bytes.*incomplete"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "elsewhere") is None


def test_manifest_covers_every_file(tmp_path):
    folder = _fake_checkpoint(tmp_path, 1)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert sorted(manifest) == ["autoencoder/ds/mp_rank_00_model_states.pt", STATE_FILE]
    assert manifest[STATE_FILE]["sha256"] == file_sha256(folder / STATE_FILE)
    (folder / "autoencoder" / "ds" / "mp_rank_00_model_states.pt").unlink()
    assert checkpoint_problem(folder).endswith("mp_rank_00_model_states.pt is missing")


def test_jsonl_log_resume_drops_a_half_written_last_row(tmp_path):
    path = tmp_path / "log.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')     # killed mid-row
    log = JsonlLog(path, enabled=True, resume_step=4)
    log.write({"step": 5, "loss": 0.5})
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
