"""Atomic checkpoints of a stage: DeepSpeed engine states plus our own small state, resumable exactly.

Layout (one folder per checkpoint, the `latest` file written last):
    RUN/checkpoints/step-00000100/<engine name>/ds/...     DeepSpeed save_checkpoint (all ranks)
    RUN/checkpoints/step-00000100/train_state.pt           step, epoch, EMA, LeCam buffers, counters (rank 0)
    RUN/checkpoints/step-00000100/rng-rank<r>.pt           every rank's RNG states
    RUN/checkpoints/latest                                 "step-00000100"
Everything is first written under step-00000100.tmp/ and renamed when complete, so a crash mid-save leaves the
previous checkpoint (and `latest`) untouched.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch

from tokpost_fast.stages.common import DistInfo, barrier

DS_TAG = "ds"
STATE_FILE = "train_state.pt"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, engines: Mapping[str, object], state: dict, info: DistInfo,
                    keep: int = 2) -> Path:
    """Collective: every rank calls it. `state` (rank 0's) holds whatever the stage needs besides the engines."""
    root = checkpoint_root(run_dir)
    tag = f"step-{step:08d}"
    final, tmp = root / tag, root / f"{tag}.tmp"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(tmp / name), tag=DS_TAG, save_latest=False)
    torch.save(rng_state(), tmp / f"rng-rank{info.rank}.pt")
    if info.is_main:
        torch.save(state, tmp / STATE_FILE)
    barrier()
    if info.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(root / "latest", tag)
        _prune(root, keep)
    barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The folder named by RUN/checkpoints/latest, or None when the run has no complete checkpoint."""
    pointer = checkpoint_root(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete (no {STATE_FILE})")
    return path


def load_checkpoint(path: Path, engines: Mapping[str, object], info: DistInfo) -> dict:
    """Collective. Restores the engines (weights + optimizer states), this rank's RNG states, and returns the
    stage's state dict."""
    path = Path(path)
    for name, engine in engines.items():
        load_path, _ = engine.load_checkpoint(str(path / name), tag=DS_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the {name!r} engine from {path / name}")
    rng_file = path / f"rng-rank{info.rank}.pt"
    if rng_file.is_file():                      # absent when resuming on more ranks than saved: reseeded per step
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    # Every rank reads the small state itself (the run folder is shared, as DeepSpeed's own checkpoints need).
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
