"""What every training stage shares: the process group, DeepSpeed engines, the LR schedule, the EMA of weights and
the non-finite-loss guard. Checkpoints are in training/checkpoint.py, logging / timing / samples in training/run_log.py.

One code path for every launcher: `deepspeed`, `torchrun` and plain `python` (which gets a 1-rank gloo group), so
a stage never branches on how it was started.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from tokpost_fast.data.folder import SKIPPED_IN_PROCESS

log = logging.getLogger("tokpost_fast.train")

REPO_ROOT = Path(__file__).resolve().parents[2]


# --- process group ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this host right now: the rendezvous port of a launch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_world_size() -> int:
    """The world size the launcher promises (before any process group exists): config checks use it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> DistInfo:
    """Join (or, under plain python, create) the process group: NCCL with a GPU, gloo on the CPU. Idempotent."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:                     # plain `python train.py`: a 1-rank group of our own
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
        barrier()                                        # every rank has mapped the others' all-reduce buffers
        release_shm_buffer()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


def shm_buffer_path() -> Path:
    """The /dev/shm file of this rank's DeepSpeed CPU all-reduce workspace (deepspeed/ops/csrc/cpu/comm/shm.cpp)."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    return Path("/dev/shm") / name


def release_shm_buffer() -> None:
    """DeepSpeed never unlinks its per-rank shared-memory workspace (tens of MB), so every run left one file per
    rank in /dev/shm until the machine's memory filled. Called once all ranks have mapped each other's: the name
    goes, the mappings stay valid, and the memory is freed when the last process exits."""
    shm_buffer_path().unlink(missing_ok=True)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op on one rank); gloo needs CPU tensors, NCCL device tensors."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


# --- precision --------------------------------------------------------------------------------------------------
def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on GPU, fp32 on CPU. bf16 on the CPU is refused: it is slower there than fp32."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type != "cuda":
        raise ValueError("train.precision=bf16 needs a GPU; use fp32 (or auto) on the CPU")
    return precision


def autocast(device: torch.device, precision: str):
    """bf16 autocast over the forward pass with fp32 master weights, gradients and reductions (METHOD.md A1's "bf16
    autocast"). DeepSpeed's own bf16 mode would store bf16 weights and need every loss network cast alike."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- DeepSpeed engines ------------------------------------------------------------------------------------------
def deepspeed_config(path: Union[str, Path], micro_batch: int, world_size: int, zero_stage: int,
                     grad_clip: float) -> dict:
    """The JSON template (configs/deepspeed/zero2.json) with the run's batch, ZeRO stage and clipping filled in.
    Precision is not DeepSpeed's business here (see `autocast`)."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    with open(path) as f:
        cfg = json.load(f)
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = 1
    cfg["train_batch_size"] = micro_batch * world_size
    cfg.setdefault("zero_optimization", {})["stage"] = zero_stage
    cfg["gradient_clipping"] = float(grad_clip)
    for key in ("fp16", "bf16"):
        cfg.pop(key, None)
    return cfg


def adamw(params: Iterable, lr: float, betas: tuple, weight_decay: float) -> torch.optim.AdamW:
    """torch AdamW over `params` (it runs on CPU and GPU alike; DeepSpeed's FusedAdam is GPU-only), with torch's
    fused CUDA kernel when the parameters are on a GPU."""
    params = list(params)
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused)


def fused_adamw(model: torch.nn.Module, lr: float, betas, weight_decay: float, device: torch.device):
    """-> (name, optimizer): AdamW with decay on weight matrices only (the generator's recipe). apex FusedAdam when
    importable, torch's fused CUDA kernel on a GPU, torch's multi-tensor (foreach) AdamW on the CPU
    (DeepSpeedCPUAdam would need a JIT C++ build)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]   # not DiT's fixed pos_embed
    decay = [p for n, p in trainable if p.ndim >= 2 and "emb" not in n]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "emb" not in n)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam
            return "apex.FusedAdam", FusedAdam(groups, lr=lr, betas=tuple(betas), adam_w_mode=True)
        except ImportError:
            return "torch.AdamW(fused)", torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=True)
    return "torch.AdamW(foreach)", torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), foreach=True)


def build_engine(module: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict):
    """DeepSpeed engine around `module` with `optimizer` (adamw / fused_adamw) as the client optimizer. The LR is
    set on the client optimizer's groups (set_lr), which ZeRO keeps as its own."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=copy.deepcopy(ds_config))
    return engine


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Linear warm-up from base_lr / warmup_steps to base_lr, then cosine down to min_lr at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- EMA --------------------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of a module's floating-point state (parameters and buffers), kept in fp32.
    The decay warms up as min(decay, (1 + n) / (10 + n)) so a short run's EMA is not dominated by the
    initialisation (the usual timm / DiT practice)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
                       for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        decay = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(decay).add_(v.detach().float(), alpha=1.0 - decay)
            else:
                self.shadow[k].copy_(v)
        self.updates += 1

    def copy_to(self, module: torch.nn.Module) -> torch.nn.Module:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})
        return module

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model: keys {sorted(missing)[:5]}")
        self.shadow = {k: v.to(self.shadow[k].device) for k, v in state["shadow"].items()}


# --- non-finite losses ------------------------------------------------------------------------------------------
class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteGuard:
    """Skip a step whose loss is NaN/inf on any rank (all ranks agree, so collectives stay in lockstep); stop after
    `max_in_row` such steps in a row. The last checkpoint written before is the last good one."""

    def __init__(self, max_in_row: int, device: torch.device):
        self.max_in_row, self.device = max_in_row, device
        self.in_row = 0
        self.skipped = 0

    def ok(self, *losses: torch.Tensor) -> bool:
        bad = torch.tensor([0.0 if all(torch.isfinite(l.detach()).all() for l in losses) else 1.0],
                           device=self.device)
        all_reduce_sum(bad)
        if bad.item() == 0:
            self.in_row = 0
            return True
        self.in_row += 1
        self.skipped += 1
        if self.in_row >= self.max_in_row:
            raise NonFiniteLossError(f"{self.in_row} non-finite losses in a row ({self.skipped} skipped in all); "
                                     "stopping: the last checkpoint is the last good state")
        return False

    def state_dict(self) -> dict:
        return {"in_row": self.in_row, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.in_row, self.skipped = state["in_row"], state["skipped"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_count(params: Optional[Iterable[torch.nn.Parameter]]) -> int:
    return sum(p.numel() for p in params or ())


def unreadable_images_all_ranks() -> list[str]:
    """Sorted paths of the unreadable images any rank skipped so far (collective when distributed)."""
    mine = sorted(SKIPPED_IN_PROCESS)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return mine
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return sorted({path for paths in everyone for path in paths})
