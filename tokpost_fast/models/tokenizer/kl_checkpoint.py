"""Stable Diffusion VAE files (diffusers AutoencoderKL layout) as a KLTokenizer, with strict key checking.

Accepted: `.safetensors` (diffusers' diffusion_pytorch_model.safetensors; needs the `safetensors` package) or a
torch file (`.bin`, `.pt`, `.ckpt`) holding the state dict, bare or under "state_dict" / "model". Attention weights
under the legacy names (query / key / value / proj_attn, diffusers < 0.14 files) are renamed to to_q / to_k / to_v
/ to_out.0 as diffusers' own loader does (ModelMixin._convert_deprecated_attention_blocks), and 1x1-conv shaped
attention weights [C, C, 1, 1] are flattened to Linear [C, C]. The original CompVis/LDM layout (encoder.down.0.
block.0...) is not converted: convert it with diffusers first.

Sizes come from the tensors; norm_num_groups and scaling_factor (not stored in the weights) from a diffusers
config.json beside the file when there is one, else the SD-VAE's 32 and 0.18215.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Optional

import torch

from tokpost_fast.models.tokenizer.config import TokenizerConfig
from tokpost_fast.models.tokenizer.kl import KLTokenizer
from tokpost_fast.models.tokenizer.state import load_state_dict_strict, read_state_dict

SD_NORM_GROUPS = 32
SD_SCALING_FACTOR = 0.18215
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LINEAR_RE = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def rename_legacy_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Legacy attention names -> current ones, conv-shaped attention weights -> Linear; other keys unchanged."""
    out = {}
    for key, value in state.items():
        m = _LEGACY_RE.match(key)
        if m:
            key = f"{m.group(1)}.{LEGACY_ATTENTION[m.group(2)]}.{m.group(3)}"
        if _LINEAR_RE.search(key) and value.dim() == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        if key in out:
            raise ValueError(f"SD-VAE state dict holds {key} under both its legacy and its current name")
        out[key] = value
    return out


def _diffusers_config(path: Path) -> dict:
    """config.json beside `path` when it is a diffusers AutoencoderKL config, else {}."""
    candidate = path.parent / "config.json"
    if not candidate.is_file():
        return {}
    with open(candidate) as f:
        config = json.load(f)
    return config if isinstance(config, dict) and config.get("_class_name") == "AutoencoderKL" else {}


def sdvae_config(state: dict[str, torch.Tensor], image_size: int = 256, norm_num_groups: int = SD_NORM_GROUPS,
                 scaling_factor: float = SD_SCALING_FACTOR) -> TokenizerConfig:
    """A kl_cnn TokenizerConfig for a diffusers AutoencoderKL state dict, with the sizes read from its tensors."""
    try:
        blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
        layers = 1 + max(int(m.group(1)) for k in state
                         if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)))
        channels = [state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(blocks)]
        latent = state["post_quant_conv.weight"].shape[0]
    except (KeyError, ValueError) as err:
        hint = ""
        if any(k.startswith(("encoder.down.", "first_stage_model.")) for k in state):
            hint = " (this looks like the CompVis/LDM layout: convert it to diffusers' layout first)"
        raise ValueError(f"not a diffusers AutoencoderKL state dict: cannot read its sizes ({err!r}){hint}; "
                         f"keys start {sorted(state)[:5]}") from None
    return TokenizerConfig(arch="kl_cnn", image_size=image_size, block_out_channels=channels,
                           layers_per_block=layers, latent_channels=latent, norm_num_groups=norm_num_groups,
                           scaling_factor=scaling_factor)


def read_sdvae_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The (renamed) state dict in an SD-VAE file; a .safetensors file without the package is a clear error."""
    if str(path).endswith(".safetensors") and importlib.util.find_spec("safetensors") is None:
        raise ValueError(f"{path}: reading .safetensors needs the `safetensors` package (pip install "
                         "safetensors), or save the state dict with torch.save as a .bin/.pt")
    state = read_state_dict(path, containers=("state_dict", "model"))
    return rename_legacy_attention({k.removeprefix("module."): v for k, v in state.items()})


def load_sdvae_checkpoint(path: str, config: Optional[TokenizerConfig] = None, image_size: int = 256
                          ) -> KLTokenizer:
    """An SD-VAE file in diffusers' layout as a KLTokenizer, strict keys (a wrong file is a ValueError naming the
    first few missing / unexpected / wrong-shape keys). Sizes come from `config` when given, else from the tensors
    and a diffusers config.json beside the file."""
    state = read_sdvae_state_dict(path)
    if config is None:
        extra = _diffusers_config(Path(path))
        config = sdvae_config(state, image_size, norm_num_groups=extra.get("norm_num_groups", SD_NORM_GROUPS),
                              scaling_factor=extra.get("scaling_factor", SD_SCALING_FACTOR))
        for name in ("block_out_channels", "layers_per_block", "latent_channels"):
            if name not in extra:
                continue
            given = list(extra[name]) if isinstance(extra[name], (list, tuple)) else extra[name]
            if given != getattr(config, name):
                raise ValueError(f"{path}: config.json says {name}={given}, the weights have {getattr(config, name)}")
    if config.arch != "kl_cnn":
        raise ValueError(f"load_sdvae_checkpoint needs arch 'kl_cnn', got {config.arch!r}")
    model = KLTokenizer(config)
    load_state_dict_strict(model, state, what=f"SD-VAE file {path}")
    return model
