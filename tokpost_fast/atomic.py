"""Crash-safe file writes and file hashes, shared by every stage.

Every file a later run may read (checkpoints, exports, cache shards and indexes, stats, reports) is written to a
temporary name in its own folder, flushed to disk, and renamed over the target: os.replace is atomic on POSIX, so
a process killed at any instant (SIGKILL, pre-emption, OOM) leaves either the old file or the new one, never half
of one. The temporary name starts with "." and ends with ".tmp", so readers that glob never pick it up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable, Iterator

import torch

PathLike = str | os.PathLike


def _prepare(path: PathLike) -> tuple[str, str]:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return path, folder


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (a power cut after os.replace could otherwise roll it back)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                     # some filesystems (and all of Windows) refuse fsync on a directory
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replace_on_success(path: PathLike) -> Iterator[str]:
    """Yields a temporary name beside `path`; when the block ends without error the file under that name is
    flushed to disk and renamed over `path`, else it is deleted."""
    path, folder = _prepare(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator:
    """`with atomic_open(path, "w") as f: ...`: `path` appears, complete, only when the block ends without error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files; mode must be 'w' or 'wb', got {mode!r}")
    with _replace_on_success(path) as tmp, open(tmp, mode) as f:
        yield f


@contextlib.contextmanager
def atomic_folder(path: PathLike) -> Iterator[str]:
    """`with atomic_folder(out) as tmp: ...write files under tmp...`: the folder `out` appears, complete, only when
    the block ends without error (else the temporary folder is deleted). A folder already at `out` is deleted just
    before the rename, so a crash in that instant leaves no folder, never a half-written one."""
    path, parent = _prepare(path)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        if os.path.lexists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_folder(parent)


def atomic_write_with(path: PathLike, write: Callable[[str], None]) -> None:
    """For writers that insist on a file name (safetensors.save_file, PIL, matplotlib): `write(tmp_name)`."""
    with _replace_on_success(path) as tmp:
        write(tmp)


def atomic_torch_save(obj: object, path: PathLike) -> None:
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: PathLike, payload: object, indent: int = 1, sort_keys: bool = False) -> None:
    atomic_write_text(path, json.dumps(payload, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def remove_stale_temps(folder: PathLike) -> list[str]:
    """Delete the temporary files a killed writer left in `folder` (only ours: ".<name>.<random>.tmp"). Call it
    before any writer of this run starts, e.g. on rank 0 before a barrier."""
    removed = []
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") and name.endswith(".tmp") and os.path.isfile(path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(name)
    return removed


def file_sha256(path: PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
