"""Pixel reconstruction loss (METHOD.md A1: MSE, as RobusTok's reconstruction_loss='l2'; L1 optional)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(target: torch.Tensor, recon: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    # target, recon: [B, 3, H, W] -> []; computed in fp32 (bf16 squared errors lose the small residuals)
    if target.shape != recon.shape:
        raise ValueError(f"reconstruction_loss: target {tuple(target.shape)} vs recon {tuple(recon.shape)}")
    if kind == "mse":
        return F.mse_loss(recon.float(), target.float())
    if kind == "l1":
        return F.l1_loss(recon.float(), target.float())
    raise ValueError(f"reconstruction_loss kind must be 'mse' or 'l1', got {kind!r}")
