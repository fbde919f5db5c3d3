"""What a stage reports while it runs: JSON-lines log, progress bar and per-phase step timing (with the quantizer
timed through hooks on the tokenizer's quantizer module). Codebook usage is in training/codebook.py, sample grids
are written by tokpost_fast/images.py."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from tokpost_fast.atomic import atomic_write_text

log = logging.getLogger("tokpost_fast.train")


def _parse_row(line: str) -> Optional[dict]:
    """A row, or None for a blank line or the half-written last line of a process killed mid-write."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


class JsonlLog:
    """RUN/log.jsonl, rank 0 only, one JSON object per line, flushed per row. On resume from step N, rows past N
    (written after the checkpoint the run restarts from) are dropped so the file reads as one straight run."""

    def __init__(self, path: Path, enabled: bool, resume_step: Optional[int] = None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if (row := _parse_row(line)) is not None and row.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")

    def write(self, row: dict) -> None:
        if self.enabled:
            self._file.write(json.dumps(row, default=float) + "\n")
            self._file.flush()

    def event(self, step: int, message: str, **extra) -> None:
        """A one-time note (e.g. "LPIPS weight 0: no weights configured"), also sent to the console."""
        if self.enabled:
            log.warning(message)
            self.write({"step": step, "event": message, **extra})

    def close(self) -> None:
        if self.enabled:
            self._file.close()


def progress_bar(total: int, initial: int, enabled: bool, desc: str):
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, smoothing=0.1)


class StepTimer:
    """Wall-clock seconds per phase of one step. On a GPU each phase boundary synchronises (when `sync`), so the
    split is true device time at the cost of the overlap between phases."""

    def __init__(self, device: torch.device, sync: bool = True):
        self.sync = sync and device.type == "cuda"
        self.device = device
        self.totals: dict[str, float] = collections.defaultdict(float)
        self.steps = 0
        self._t0: Optional[float] = None
        self.active = False

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = self._now()
        outer, self.active = self.active, True
        try:
            yield
        finally:
            self.totals[name] += self._now() - t0
            self.active = outer

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] += seconds

    def step_done(self) -> None:
        self.steps += 1

    def watch_module(self, module: torch.nn.Module, name: str, inside: str) -> None:
        """Time every forward of `module` as phase `name`, and subtract it from the enclosing phase `inside`
        (so "forward" means the forward pass without the quantizer)."""
        starts: list[float] = []

        def pre_hook(*_):
            if self.active:
                starts.append(self._now())

        def post_hook(*_):
            if self.active and starts:
                elapsed = self._now() - starts.pop()
                self.totals[name] += elapsed
                self.totals[inside] -= elapsed

        module.register_forward_pre_hook(pre_hook)
        module.register_forward_hook(post_hook)

    def summary(self) -> dict:
        """Mean seconds per step of each phase, the step total and each phase's share since the last call."""
        steps = max(1, self.steps)
        means = {k: v / steps for k, v in self.totals.items()}
        total = sum(means.values())
        out = {f"time/{k}": v for k, v in sorted(means.items())}
        out["time/step"] = total
        for k, v in means.items():
            out[f"share/{k}"] = v / total if total > 0 else 0.0
        self.totals.clear()
        self.steps = 0
        return out
