"""DINOv2 weights from a local file, for the ViT tokenizer's init and the frozen semantic teacher (METHOD.md A1).

Accepted layouts (nothing is downloaded):
- timm's `vit_{small,base,large}_patch14_dinov2.lvd142m` state dict (pytorch_model.bin / model.safetensors), and
- the official facebookresearch/dinov2 `dinov2_vit{s,b,l}14_pretrain.pth`.
They differ only in the official `mask_token`, which is dropped. Register-token ("reg4") and SwiGLU (giant)
variants are refused with a ValueError. The architecture is read from the weights: width = cls_token dim,
depth = number of blocks, heads = width / 64 (every DINOv2 ViT uses 64-dim heads), mlp_ratio from mlp.fc1.
Like RobusTok (timm create_model with img_size=256, patch_size=16) the 14-pixel patch embedding is resampled to
our patch size (FlexiViT pseudo-inverse resize) and the position table to our grid (bicubic).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from tokpost_fast.models.tokenizer.state import load_state_dict_strict, read_state_dict

DINOV2_HEAD_DIM = 64


@dataclass(frozen=True)
class DINOv2Arch:
    width: int
    depth: int
    heads: int
    mlp_ratio: float
    patch_size: int


def load_dinov2_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A DINOv2 backbone state dict in timm key names (see module docstring)."""
    if not os.path.isfile(path):
        raise ValueError(f"DINOv2 weights not found: {path}")
    state = read_state_dict(path, containers=("model", "state_dict", "teacher"))
    state = {re.sub(r"^(module\.|backbone\.|model\.)+", "", k): v for k, v in state.items()}
    if "register_tokens" in state:
        raise ValueError(f"{path}: DINOv2 with register tokens is not supported (use a plain *_dinov2 model)")
    if any(".mlp.w12." in k for k in state):
        raise ValueError(f"{path}: SwiGLU DINOv2 (ViT-g) is not supported")
    if "cls_token" not in state or "pos_embed" not in state:
        raise ValueError(f"{path}: not a DINOv2 ViT state dict (no cls_token / pos_embed); "
                         f"keys start {sorted(state)[:5]}")
    state.pop("mask_token", None)
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def dinov2_arch(state: dict[str, torch.Tensor]) -> DINOv2Arch:
    width = state["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    return DINOv2Arch(width=width, depth=depth, heads=max(width // DINOV2_HEAD_DIM, 1),
                      mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / width,
                      patch_size=state["patch_embed.proj.weight"].shape[-1])


def adapt_dinov2(state: dict[str, torch.Tensor], grid: int, patch_size: int, with_patch_embed: bool
                 ) -> dict[str, torch.Tensor]:
    """Resample the position table to a grid x grid patch grid and the patch kernel to patch_size."""
    state = dict(state)
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"].float(), (grid, grid), num_prefix_tokens=1)
    if with_patch_embed:
        weight = state["patch_embed.proj.weight"].float()
        if weight.shape[-1] != patch_size:
            state["patch_embed.proj.weight"] = resample_patch_embed(weight, (patch_size, patch_size))
    else:
        state = {k: v for k, v in state.items() if not k.startswith("patch_embed.")}
    return state


def load_dinov2_into(backbone: torch.nn.Module, path: str) -> DINOv2Arch:
    """Initialise a ViTBackbone (models/tokenizer/vit.py) from DINOv2 weights; strict, mismatches named."""
    state = load_dinov2_state_dict(path)
    arch = dinov2_arch(state)
    with_patch_embed = hasattr(backbone, "patch_embed")
    state = adapt_dinov2(state, backbone.grid, _patch_size(backbone, arch), with_patch_embed)
    load_state_dict_strict(backbone, state, what=f"DINOv2 weights {path}")
    return arch


def _patch_size(backbone: torch.nn.Module, arch: DINOv2Arch) -> int:
    if hasattr(backbone, "patch_embed"):
        return backbone.patch_embed.proj.weight.shape[-1]
    return arch.patch_size
