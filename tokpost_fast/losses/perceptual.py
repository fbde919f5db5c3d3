"""LPIPS perceptual loss (VGG16 trunk) from local weights only.

The `lpips` package ships the calibrated linear layers (lpips/weights/v0.1/vgg.pth, a few KB) but fetches the VGG16
ImageNet trunk from the internet; we build the trunk randomly (pnet_rand=True) and load it from a local file:
- torchvision's vgg16 state dict (vgg16-397923af.pth: features.{i}.weight, classifier ignored), or
- a full LPIPS state dict (net.slice{k}.{i}.weight and lin{k}.model.1.weight), e.g. saved from lpips.LPIPS.
Without a file, build_perceptual(None) returns None and the loss runs with perceptual weight 0 (logged once).
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Optional

import torch
import torch.nn as nn

from tokpost_fast.losses.config import warn_once
from tokpost_fast.models.tokenizer.state import load_state_dict_strict, read_state_dict

# lpips.pretrained_networks.vgg16 splits torchvision's vgg16.features[0:30] into five slices at these indices.
VGG_SLICE_STARTS = (0, 4, 9, 16, 23, 30)


def _vgg_slice(index: int) -> int:
    for k in range(5):
        if VGG_SLICE_STARTS[k] <= index < VGG_SLICE_STARTS[k + 1]:
            return k + 1
    raise ValueError(f"vgg16.features.{index} is beyond relu5_3 (LPIPS uses features[0:30])")


def _default_lin_weights() -> str:
    import lpips

    return os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")


class PerceptualLoss(nn.Module):
    """mean LPIPS(x, y) over the batch; inputs in [-1, 1]. Frozen and always in eval mode (LPIPS's linear layers
    carry dropout, which must stay off)."""

    def __init__(self, lpips_model: nn.Module):
        super().__init__()
        self.lpips = lpips_model.eval()
        for p in self.lpips.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x, y: [B, 3, H, W] -> []; fp32 (LPIPS's unit-normalised features underflow in bf16)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.lpips(x.float(), y.float()).mean()


def _lpips_state(vgg_path: str, lin_path: Optional[str]) -> dict[str, torch.Tensor]:
    state = read_state_dict(vgg_path, containers=("state_dict", "model"))
    out: dict[str, torch.Tensor] = {}
    if any(k.startswith("net.slice") for k in state):                     # a full LPIPS state dict
        out.update({k: v for k, v in state.items() if k.startswith(("net.slice", "lin"))})
    elif any(k.startswith("features.") for k in state):                   # torchvision vgg16
        for key, value in state.items():
            m = re.match(r"features\.(\d+)\.(weight|bias)$", key)
            if m and int(m.group(1)) < VGG_SLICE_STARTS[-1]:
                out[f"net.slice{_vgg_slice(int(m.group(1)))}.{m.group(1)}.{m.group(2)}"] = value
    else:
        raise ValueError(f"{vgg_path}: neither a torchvision vgg16 state dict (features.*) nor an LPIPS one "
                         f"(net.slice*); keys start {sorted(state)[:5]}")
    if not any(k.startswith("lin") for k in out):
        lin = read_state_dict(lin_path or _default_lin_weights())
        out.update({k: v for k, v in lin.items() if re.match(r"lin\d\.model\.1\.weight$", k)})
    # LPIPS registers the linear layers twice (lin{k} and lins.{k}); fill the alias.
    out = {k: v for k, v in out.items() if not k.startswith("lins.")}
    out.update({f"lins.{k[3]}.model.1.weight": out[k] for k in list(out) if re.match(r"lin\d\.model\.1\.weight$", k)})
    return out


def build_perceptual(vgg_weights: Optional[str], lin_weights: Optional[str] = None) -> Optional[PerceptualLoss]:
    """LPIPS-VGG from local files, or None when vgg_weights is None (the caller then uses weight 0)."""
    if vgg_weights is None:
        warn_once("perceptual", "perceptual loss is OFF: no LPIPS network (no VGG16 weights given); weight 0")
        return None
    if not os.path.isfile(vgg_weights):
        raise ValueError(f"perceptual VGG16 weights not found: {vgg_weights}")
    import lpips

    state = _lpips_state(vgg_weights, lin_weights)
    with warnings.catch_warnings():  # torchvision's `pretrained=` deprecation inside lpips
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False)
    state.update({k: v for k, v in model.state_dict().items() if k.startswith("scaling_layer.")})
    load_state_dict_strict(model, state, what=f"LPIPS weights {vgg_weights}")
    return PerceptualLoss(model)
