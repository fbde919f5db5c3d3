"""Training stages, one file each, following the data's path: main -> gen -> cache -> post (METHOD.md B3).

Each stage module defines `run(cfg: Config, run_dir: Path, resume: bool = False) -> dict` and is started by
tokpost_fast/train.py. `SECTIONS` names the config section holding a stage's own settings (where `--max-steps`
lands).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

STAGES = ("main", "gen", "cache", "post")
SECTIONS = {"main": "train", "gen": "gen", "cache": "cache", "post": "post"}


class StageNotImplemented(RuntimeError):
    pass


def get_stage(name: str) -> Callable:
    """The stage's `run` function; a stage whose module does not exist yet is a clear error, not a traceback."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose from {', '.join(STAGES)}")
    try:
        module = importlib.import_module(f"tokpost_fast.stages.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"tokpost_fast.stages.{name}":
            raise
        raise StageNotImplemented(f"stage {name!r} is not implemented yet (tokpost_fast/stages/{name}.py does not "
                                  "exist); implemented: " + ", ".join(implemented_stages())) from None
    if not hasattr(module, "run"):
        raise StageNotImplemented(f"tokpost_fast/stages/{name}.py has no run(cfg, run_dir, resume) function")
    return module.run


def implemented_stages() -> list[str]:
    return [s for s in STAGES if importlib.util.find_spec(f"tokpost_fast.stages.{s}") is not None]
