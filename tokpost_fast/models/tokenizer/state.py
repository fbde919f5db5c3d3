"""State-dict plumbing shared by the tokenizer, discriminator and teacher loaders: reading a file, strict loading
with errors that name the offending keys and shapes."""

from __future__ import annotations

import pickle
import warnings
from typing import Iterable, Mapping

import torch

from tokpost_fast.atomic import atomic_torch_save  # noqa: F401  (re-exported: save_tokenizer and callers)

SHOW = 5  # how many keys of each kind an error names


def read_checkpoint(path: str) -> object:
    """torch.load on the CPU; safe (weights_only) first. Old research checkpoints pickle argparse Namespaces etc.;
    those are loaded unsafely with a warning, since the user named the file."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        warnings.warn(f"{path}: not loadable with weights_only=True; unpickling it fully (trusted local file)")
        return torch.load(path, map_location="cpu", weights_only=False)


def read_state_dict(path: str, containers: Iterable[str] = ("model",)) -> dict[str, torch.Tensor]:
    """The state dict in a file: the first of `containers` present in a checkpoint dict, else the dict itself."""
    obj = read_checkpoint(path)
    if isinstance(obj, Mapping):
        for key in containers:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: no state dict found (looked for a tensor dict, or one under {list(containers)})")
    return dict(obj)


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]
                        ) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, 'key: given shape vs expected shape' lines)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [f"{k}: {tuple(given[k].shape)} vs expected {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(given)) if tuple(given[k].shape) != tuple(expected[k].shape)]
    return missing, unexpected, shapes


def mismatch_message(what: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - SHOW} more)" if len(items) > SHOW else ""
            parts.append(f"{len(items)} {label}: {items[:SHOW]}{more}")
    return f"{what} does not match the model: " + "; ".join(parts)


def load_state_dict_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """module.load_state_dict(strict=True), but any mismatch is one ValueError naming the first few keys of each
    kind (missing, unexpected, wrong shape) instead of torch's wall of text."""
    missing, unexpected, shapes = state_dict_mismatch(module.state_dict(), state)
    if missing or unexpected or shapes:
        raise ValueError(mismatch_message(what, missing, unexpected, shapes))
    module.load_state_dict(state, strict=True)
