"""Symmetric InfoNCE over the global batch (CLIP's loss, as RobusTok's ClipLoss with gather_with_grad=True,
local_loss=False). Depends on torch only."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient of the gathered tensor (all_reduce) and keeps this
    rank's slice, as torch.distributed.nn.all_gather does. Written on the plain collectives because
    torch.distributed.nn's version (torch 2.14) leaves a thread behind that aborts about one process exit in four
    ("terminate called without an active exception") after destroy_process_group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
        sizes = [int(s.item()) for s in sizes]
        if len(set(sizes)) != 1:
            raise ValueError(f"gather_with_grad needs the same local batch on every rank, got {sizes}")
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[B, D] per rank -> [world * B, D], differentiable; identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x.contiguous())


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
