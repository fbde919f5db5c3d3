"""Atomic checkpoints of a stage: DeepSpeed engine states plus our own small state, resumable exactly.

Layout (one folder per checkpoint, the `latest` file written last):
    RUN/checkpoints/step-00000100/<engine name>/ds/...     DeepSpeed save_checkpoint (all ranks)
    RUN/checkpoints/step-00000100/train_state.pt           step, epoch, EMA, LeCam buffers, counters (rank 0)
    RUN/checkpoints/step-00000100/rng-rank<r>.pt           every rank's RNG states
    RUN/checkpoints/step-00000100/manifest.json            size + sha256 of every file above (rank 0, last)
    RUN/checkpoints/latest                                 "step-00000100"
Everything is first written under step-00000100.tmp/ and renamed when complete, so a crash mid-save leaves the
previous checkpoint (and `latest`) untouched: the folder-level form of tokpost_fast/atomic.py's temp-and-rename
(DeepSpeed writes its own files into the folder, so the folder is what is renamed; the `latest` pointer and
the manifest go through atomic.py). On resume the newest checkpoint whose files match its manifest is
used; a damaged one (disk error, a file edited or truncated by hand) is reported by name and the previous one is
tried, so --resume never loads a corrupt state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from tokpost_fast.atomic import atomic_write_json, atomic_write_text, file_sha256
from tokpost_fast.training.engine import DistInfo, barrier

log = logging.getLogger("tokpost_fast.train")

DS_TAG = "ds"
STATE_FILE = "train_state.pt"
MANIFEST = "manifest.json"


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
        atomic_write_json(tmp / MANIFEST, manifest_of(tmp), sort_keys=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / "latest", tag)
        _prune(root, keep)
    barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def manifest_of(folder: Path) -> dict:
    """{relative path: {"bytes": size, "sha256": digest}} of every file under `folder` but the manifest."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def checkpoint_problem(path: Path) -> Optional[str]:
    """None when the checkpoint folder is complete and matches its manifest, else what is wrong (names a file)."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        return f"{path.name} is incomplete (no {STATE_FILE})"
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        return None                # written before manifests existed: nothing to check against
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"{manifest_file} is unreadable ({err})"
    for rel, expected in manifest.items():
        file = path / rel
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{file} has {file.stat().st_size} bytes, its manifest says {expected['bytes']}"
        if file_sha256(file) != expected["sha256"]:
            return f"{file} does not match the sha256 in its manifest"
    return None


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete, verified checkpoint folder of the run, or None when it has none. A newer one that fails
    verification is skipped with a warning naming the damaged file; if checkpoints exist but none verifies, the
    error lists why each was refused (resuming from scratch silently would throw away days of training).

    Collective when torch.distributed is initialised with more than one rank: rank 0 verifies and broadcasts its
    answer, rather than every rank hashing the same multi-GB files of the shared run folder."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return _latest_verified(run_dir)
    answer: list = [None]
    if dist.get_rank() == 0:
        try:
            answer = [("found", _latest_verified(run_dir))]
        except FileNotFoundError as err:
            answer = [("error", str(err))]
    dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "error":
        raise FileNotFoundError(value)
    return value


def _latest_verified(run_dir: Path) -> Optional[Path]:
    root = checkpoint_root(run_dir)
    done = sorted((p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True)
    refused = []
    for path in done:
        problem = checkpoint_problem(path)
        if problem is None:
            for why in refused:
                log.warning("skipping a damaged checkpoint: %s; resuming from %s", why, path.name)
            log.info("latest verified checkpoint: %s", path)
            return path
        refused.append(problem)
    if refused:
        raise FileNotFoundError(f"no usable checkpoint in {root}: " + "; ".join(refused))
    return None


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


def state_hash(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors of a state dict in key order (name, dtype, bytes): names exported weights, and an
    in-memory model where no file exists."""
    h = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()
