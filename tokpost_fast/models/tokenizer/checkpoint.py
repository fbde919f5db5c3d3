"""Tokenizer files: our own format (save_tokenizer / load_tokenizer) and LlamaGen's released checkpoints.

Our format: torch.save of {"config": asdict(TokenizerConfig), "model": state_dict, **extra}, written atomically;
one format for every arch (VQ and continuous), load_tokenizer rebuilds the class config["arch"] names.
LlamaGen's (vq_ds16_c2i.pt): {"model": state_dict, ...}; sizes are read from the tensors.
Stable Diffusion VAE files (diffusers layout): models/tokenizer/kl_checkpoint.py.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import torch

from tokpost_fast.models.tokenizer.config import TokenizerConfig
from tokpost_fast.models.tokenizer.model import Tokenizer, VQTokenizer, build_tokenizer
from tokpost_fast.models.tokenizer.state import (atomic_torch_save, load_state_dict_strict, read_checkpoint,
                                                 read_state_dict)


def save_tokenizer(model: Tokenizer, path: str, extra: Optional[dict] = None) -> None:
    """Atomic (temp file + os.replace). `extra` keys (optimizer state, step, ema, ...) sit beside config/model."""
    extra = dict(extra or {})
    clash = sorted({"config", "model"} & set(extra))
    if clash:
        raise ValueError(f"save_tokenizer: extra may not use the reserved keys {clash}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"config": dataclasses.asdict(model.config), "model": state, **extra}, path)


def load_tokenizer(path: str, map_location: str | torch.device = "cpu", state_key: str = "model") -> Tokenizer:
    """Rebuild a saved tokenizer; strict: mismatched keys or shapes are a ValueError naming them.
    state_key="ema" loads an EMA copy stored by the trainer under extra["ema"]."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "config" not in ckpt or state_key not in ckpt:
        raise ValueError(f"{path}: not a tokpost_fast tokenizer checkpoint (needs 'config' and {state_key!r})")
    # The weights come from the checkpoint: no DINOv2 init (its file need not exist any more).
    cfg = TokenizerConfig.from_dict({**ckpt["config"], "dinov2_weights": None})
    model = build_tokenizer(cfg)
    load_state_dict_strict(model, ckpt[state_key], what=f"tokenizer checkpoint {path}")
    return model.to(map_location)


def llamagen_config(state: dict[str, torch.Tensor], image_size: int = 256) -> TokenizerConfig:
    """A TokenizerConfig for a LlamaGen VQ state dict, with the sizes read from its tensors."""
    try:
        codebook_size, dim = state["quantize.embedding.weight"].shape
        ch = state["encoder.conv_in.weight"].shape[0]
        z_channels = state["quant_conv.weight"].shape[1]
        levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k)))
        res = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k)))
        ch_mult = [state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(levels)]
    except (KeyError, ValueError) as err:
        raise ValueError(f"not a LlamaGen VQ state dict: cannot read its sizes ({err!r}); "
                         f"keys start {sorted(state)[:5]}") from None
    return TokenizerConfig(arch="vq_cnn", image_size=image_size, codebook_size=codebook_size, codebook_embed_dim=dim,
                           ch=ch, ch_mult=ch_mult, num_res_blocks=res, z_channels=z_channels)


def load_llamagen_checkpoint(path: str, config: Optional[TokenizerConfig] = None, image_size: int = 256
                             ) -> VQTokenizer:
    """A LlamaGen VQ checkpoint (e.g. vq_ds16_c2i.pt, weights under "model") as a VQTokenizer, strict keys.
    Sizes come from `config` when given, else from the tensors. A wrong file is a ValueError naming the first few
    missing / unexpected / wrong-shape keys."""
    state = read_state_dict(path, containers=("model", "ema", "state_dict"))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    cfg = config or llamagen_config(state, image_size)
    if cfg.arch != "vq_cnn":
        raise ValueError(f"load_llamagen_checkpoint needs arch 'vq_cnn', got {cfg.arch!r}")
    model = build_tokenizer(cfg)
    # The usage ring buffer is bookkeeping; a state dict saved with codebook_show_usage=False lacks it.
    state.setdefault("quantize.codebook_used", model.quantize.codebook_used.clone())
    load_state_dict_strict(model, state, what=f"LlamaGen checkpoint {path}")
    return model
