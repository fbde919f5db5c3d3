"""Generator construction and checkpoints, for every generator kind: GPT and RAR (kind "ar", by the config's
arch) and the DiT (kind "dit").

    model = build_generator(generator_config("demo"))
    save_generator(model, "RUN/generator.pt", extra={"tokenizer_hash": ...})    # atomic
    model = load_generator("RUN/generator.pt")           # model.checkpoint_extra holds the extras

File layout: {"config": {"kind": ..., **asdict(cfg)}, "model": state_dict, **extra}; files without a config kind
are AR generators.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from tokpost_fast.atomic import atomic_torch_save
from tokpost_fast.models.generator.config import config_from_dict, config_to_dict
from tokpost_fast.models.generator.dit import DiT
from tokpost_fast.models.generator.gpt import GPT
from tokpost_fast.models.generator.rar import RAR
from tokpost_fast.models.tokenizer.state import load_state_dict_strict


def build_generator(cfg):
    """GPT or RAR for a GeneratorConfig (kind "ar", by its arch), DiT for a DiTConfig (kind "dit")."""
    if cfg.kind == "dit":
        return DiT.from_config(cfg)
    if cfg.arch == "rar":
        return RAR.from_config(cfg)
    return GPT.from_config(cfg)


def save_generator(model, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Atomic: {"config": {"kind": ..., **asdict(cfg)}, "model": state_dict, **extra} to a temp file in the same
    folder, fsync, rename; a crash leaves the old file or the new one, never half of one. GPT or DiT."""
    model = getattr(model, "module", model)   # a DeepSpeed engine or DDP wrapper
    extra = dict(extra or {})
    clash = sorted({"config", "model"} & set(extra))
    if clash:
        raise ValueError(f"extra may not override {clash}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"config": config_to_dict(model.config), "model": state, **extra}
    atomic_torch_save(payload, path)


def read_generator_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """The raw checkpoint dict (config, model, and extras such as "tokenizer_hash")."""
    payload = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    missing = [k for k in ("config", "model") if k not in payload]
    if missing:
        raise ValueError(f"{path}: not a generator checkpoint, missing {missing}")
    return payload


def load_state_strict(model: nn.Module, state: dict, source: str = "checkpoint") -> None:
    """load_state_dict(strict=True) with one error naming the missing, unexpected and mis-shaped keys."""
    load_state_dict_strict(model, state, what=f"{source} (generator)")


def load_generator(path: str | os.PathLike, map_location="cpu"):
    """Rebuild the generator (GPT or DiT, by the saved config's kind; files without one are GPTs) from its
    checkpoint; strict keys. The checkpoint's extras (e.g. "tokenizer_hash") are kept as model.checkpoint_extra."""
    payload = read_generator_checkpoint(path, "cpu")
    model = build_generator(config_from_dict(payload["config"]))
    load_state_strict(model, payload["model"], source=os.fspath(path))
    model.checkpoint_extra = {k: v for k, v in payload.items() if k not in ("config", "model")}
    return model.to(map_location)
