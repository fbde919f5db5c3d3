"""Symmetric InfoNCE over the global batch (CLIP's loss, as RobusTok's ClipLoss with gather_with_grad=True,
local_loss=False). Depends on torch only."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[B, D] per rank -> [world * B, D], differentiable; identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn  # noqa: F401  (registers the autograd-aware collectives)

    return torch.cat(torch.distributed.nn.all_gather(x.contiguous()), dim=0)


def info_nce(features_a: torch.Tensor, features_b: torch.Tensor, logit_scale: float = 1.0,
             gather: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP loss): pair i of a matches pair i of b.
    # features_a, features_b: [B, D] -> []; fp32."""
    if features_a.shape != features_b.shape or features_a.dim() != 2:
        raise ValueError(f"info_nce needs two [B, D] tensors, got {tuple(features_a.shape)} and "
                         f"{tuple(features_b.shape)}")
    a, b = features_a.float(), features_b.float()
    if gather:
        a, b = gather_with_grad(a), gather_with_grad(b)
    logits = logit_scale * a @ b.t()                                       # [N, N]
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
