"""The vector-quantizer module: owns the codebook and calls the fused op (METHOD.md A1, A2); plus the codebook-health
tools that training may switch on around it (config section `codebook`, all off by default for paper fidelity).

# z [B, C, h, w] -> QuantizeOutput(z_q [B, C, h, w], indices [B, h, w], perturbed_indices [B, h, w], losses [])
Keys as LlamaGen's VectorQuantizer: `embedding.weight` [K, C] and, for the LlamaGen CNN layout only, the
`codebook_used` buffer (65536 floats) that its checkpoints carry. We keep that buffer for strict loading but never
write it in forward (usage is computed from `indices` by the caller), so forward mutates no state and compiles
with torch.compile(fullgraph=True) whether or not the tools below are on: they run between training steps.

- `VectorQuantizer.init_from_kmeans`: the codebook becomes the k-means centroids of encoder outputs
  (tokpost_fast.ops.kmeans, the fused nearest-code op in its assignment step), the same on every rank.
- `DeadCodeTracker`: per-code EMA of assignment counts over all ranks; a code below a threshold for a window of
  steps is dead, and `restart` re-initialises dead codes from current encoder outputs sampled across ranks, as
  vector-quantize-pytorch's `threshold_ema_dead_code` and CVQ-VAE (Zheng & Vedaldi 2023) do. Writing a new row
  also resets what the optimizer keeps for it (`overwrite_rows`): the optimizer moments of those rows and, under
  DeepSpeed ZeRO-1/2, the fp32 master partition, which would otherwise copy the old row back at the next step.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tokpost_fast.ops import QuantizeOutput, codebook_lookup, kmeans, quantize

LLAMAGEN_USAGE_SLOTS = 65536


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, codebook_dim: int, l2_norm: bool = True, usage_buffer: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.codebook_size, self.codebook_dim = codebook_size, codebook_dim
        self.l2_norm, self.backend = l2_norm, backend
        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        # U(-1/K, 1/K) then l2-normalised (METHOD.md A1, as LlamaGen and RobusTok): the normalised rows keep the
        # codebook-loss gradient through F.normalize at a sane scale.
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if usage_buffer:
            self.register_buffer("codebook_used", torch.zeros(LLAMAGEN_USAGE_SLOTS))

    @property
    def metric(self) -> str:
        return "cosine" if self.l2_norm else "l2"

    def codebook(self) -> torch.Tensor:
        """The codebook as the quantizer uses it: [K, C], rows l2-normalised for the cosine quantizer."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def forward(self, z: torch.Tensor, perturb_rate: float = 0.0, perturb_topk: int = 1,
                perturb_samples: Optional[int] = None, seed: Optional[int] = None) -> QuantizeOutput:
        """codebook_loss = mean((code - sg(z))^2); commit_loss = mean((sg(code) - z)^2) *unweighted* (the op runs
        with beta_commit=1): LossConfig.commit (0.25) weights it. Both use the clean codes (METHOD.md A2 step 4)."""
        if z.dim() != 4 or z.shape[1] != self.codebook_dim:
            raise ValueError(f"z must be [B, {self.codebook_dim}, h, w], got {tuple(z.shape)}")
        z_last = z.permute(0, 2, 3, 1).contiguous()                                   # [B, h, w, C]
        out = quantize(z_last, self.embedding.weight, rate=perturb_rate, topk=perturb_topk, beta_commit=1.0,
                       metric=self.metric, seed=seed, backend=self.backend, perturb_samples=perturb_samples)
        return out._replace(z_q=out.z_q.permute(0, 3, 1, 2))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B, h, w] -> codes [B, C, h, w] (normalised codes for the cosine quantizer)."""
        codes = codebook_lookup(indices, self.codebook(), backend=self.backend)
        return codes.permute(0, 3, 1, 2)

    @torch.no_grad()
    def init_from_kmeans(self, latents: torch.Tensor, iters: int = 10, seed: int = 0) -> torch.Tensor:
        """Collective. latents [N, C]: this rank's encoder outputs (N equal on every rank). The rows of all ranks
        are pooled, k-means runs with the quantizer's metric (spherical for cosine), and rank 0's centroids become
        every rank's codebook. Call it before the optimizer (or DeepSpeed engine) copies the weights. Returns the
        k-means inertia per row of the pooled latents."""
        if latents.dim() != 2 or latents.shape[1] != self.codebook_dim:
            raise ValueError(f"latents must be [N, {self.codebook_dim}], got {tuple(latents.shape)}")
        pooled = all_gather_rows(latents.detach().float())
        if pooled.shape[0] < self.codebook_size:
            raise ValueError(f"k-means init needs at least K = {self.codebook_size} latent rows over all ranks, got "
                             f"{pooled.shape[0]} (raise codebook.kmeans_images)")
        out = kmeans(pooled, self.codebook_size, iters=iters, metric=self.metric, seed=seed, backend=self.backend)
        weight = self.embedding.weight
        weight.copy_(out.centroids.to(weight.dtype))
        if _world_size() > 1:
            dist.broadcast(weight.data, src=0)
        return out.inertia / pooled.shape[0]


# --- collectives (no-ops on one process) -------------------------------------------------------------------------
def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """[n, C] on every rank (n equal) -> [world * n, C], rank 0's rows first."""
    if _world_size() == 1:
        return rows
    parts = [torch.empty_like(rows) for _ in range(_world_size())]
    dist.all_gather(parts, rows.contiguous())
    return torch.cat(parts)


def _all_gather_object(obj) -> list:
    """[rank 0's obj, rank 1's, ...]; [obj] on one process."""
    if _world_size() == 1:
        return [obj]
    everyone: list = [None] * _world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


def _all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    if _world_size() > 1:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


# --- writing rows of a trained parameter -------------------------------------------------------------------------
@torch.no_grad()
def overwrite_rows(param: nn.Parameter, rows: torch.Tensor, values: torch.Tensor,
                   optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """param[rows] = values everywhere the next optimizer step reads it, and the optimizer's per-element state of
    those rows (Adam's exp_avg / exp_avg_sq, ...) set to zero, as for a fresh parameter. Collective under ZeRO.

    - the module's tensor (what forward reads);
    - DeepSpeed ZeRO-1/2 (and its bf16 optimizer): the fp32 master partitions and their optimizer state, through
      deepspeed.utils.safe_{get,set}_full_{fp32_param,optimizer_state}. DeepSpeed keeps a separate fp32 copy of
      each rank's slice of the flattened parameters (stage_1_and_2.py: single_partition_of_fp32_groups, cloned
      from the model's flat buffer) and copies it back into the module after every step; a row written only into
      the module would be reverted there;
    - a plain torch optimizer (or DeepSpeed without ZeRO, which steps the client optimizer on the parameters
      themselves): `optimizer.state[param]`.
    ZeRO-3 (parameters partitioned away from the module) is not supported: the main stage refuses stage 3."""
    if hasattr(param, "ds_id"):
        raise ValueError("overwrite_rows: ZeRO stage 3 parameters are not supported")
    param.data[rows] = values.to(param.dtype)
    mapping = getattr(param, "_hp_mapping", None)
    if hasattr(param, "_hp_mapping"):
        from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                                     safe_set_full_fp32_param, safe_set_full_optimizer_state)

        master = safe_get_full_fp32_param(param)
        master[rows] = values.to(master.dtype)
        safe_set_full_fp32_param(param, master)
        # The optimizer state is linked to the fragments after the first step; all ranks agree on its keys.
        keys = sorted(mapping.get_optim_state_keys()) if mapping is not None and mapping.optim_fragment else []
        keys = _keys_of_all_ranks(keys)
        for key in keys:
            state = safe_get_full_optimizer_state(param, key)
            state[rows] = 0
            safe_set_full_optimizer_state(param, state, key)
        return
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value[rows] = 0


def _keys_of_all_ranks(keys: list[str]) -> list[str]:
    # A rank whose partition holds no element of the parameter has no fragment (mapping None); rank 0 may be it.
    return sorted({k for ks in _all_gather_object(keys) for k in ks})


def fingerprint(tensor: torch.Tensor) -> str:
    """sha256 (16 hex digits) of a tensor's bytes: compares copies across ranks."""
    data = tensor.detach().cpu().contiguous()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def synchronised_fingerprints(param: nn.Parameter) -> list[str]:
    """Collective: [module, fp32 master] fingerprints of `param` on every rank, rank by rank (the master is ZeRO's
    reassembled fp32 copy; without ZeRO the optimizer steps the module's tensor, so it is that). Raises when they
    are not all equal: after a restart every rank must hold the same codebook, and ZeRO's master the same rows.
    The module's weights must be fp32 (as the stages train them, with bf16 autocast): bf16 module weights would
    differ from the master by rounding."""
    master = None
    if hasattr(param, "_hp_mapping"):
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(param)
    mine = [fingerprint(param.float()), fingerprint((param if master is None else master).float())]
    prints = [p for rank_prints in _all_gather_object(mine) for p in rank_prints]
    if len(set(prints)) != 1:
        raise RuntimeError(f"the copies of a parameter differ across ranks or from ZeRO's fp32 master (module, "
                           f"master per rank: {prints})")
    return prints


# --- dead-code restarts ------------------------------------------------------------------------------------------
class CodeRestart(NamedTuple):
    rows: torch.Tensor     # [n] int64 codes re-initialised (the same on every rank)
    values: torch.Tensor   # [n, C] their new vectors (l2-normalised for the cosine quantizer)


class DeadCodeTracker:
    """Which codes are dead, over all ranks, and their restarts.

    observe(indices) (collective, once per optimizer step) adds the step's code counts summed over ranks to an EMA,
    usage = decay * usage + (1 - decay) * counts (the first step sets usage = counts); a code whose usage stays
    below `threshold` (assignments per step, all ranks together; the uniform share is tokens per step / K) for
    `window` steps in a row is dead. restart() (collective) re-initialises up to every dead code from the latents
    of the last training forward: each rank offers min(dead, tokens) of its own latent rows, the offers of all
    ranks are pooled, and a generator seeded identically on every rank picks which dead codes take which pooled
    rows, so every rank writes the same rows. When there are more dead codes than pooled rows, a random subset is
    restarted now and the rest on later steps (never two codes from one row). A restarted code starts at usage =
    threshold with its count of steps below reset, so it has `window` steps to be picked up before it is dead
    again. Its state (usage, counters) is in state_dict() for checkpoints; with the step-keyed seeds of the main
    stage a resumed run restarts exactly the same codes with the same vectors.

    Latents: a forward pre-hook on the quantizer keeps a detached reference to the input of its last training
    forward (capture=False: pass `latents=` to restart yourself, e.g. around a torch.compile'd quantizer)."""

    def __init__(self, quantizer: VectorQuantizer, threshold: float, window: int, decay: float,
                 capture: bool = True):
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.quantizer, self.threshold, self.window, self.decay = quantizer, float(threshold), window, float(decay)
        device = quantizer.embedding.weight.device
        self.usage = torch.zeros(quantizer.codebook_size, dtype=torch.float64, device=device)
        self.below = torch.zeros(quantizer.codebook_size, dtype=torch.int64, device=device)
        self.steps = 0             # observed steps
        self.restarted = 0         # codes re-initialised so far
        self.latents: Optional[torch.Tensor] = None
        if capture:
            quantizer.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        if module.training:
            z = args[0]
            self.latents = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])       # [B*h*w, C]

    @torch.no_grad()
    def observe(self, indices: torch.Tensor) -> torch.Tensor:
        """Collective. indices: this rank's clean code indices of the step (any shape). Returns the step's code
        counts summed over ranks ([K] float64), for whoever else counts codes (the logged usage)."""
        counts = torch.bincount(indices.detach().reshape(-1), minlength=self.usage.numel())
        counts = _all_reduce(counts.to(self.usage))
        if self.steps == 0:
            self.usage.copy_(counts)
        else:
            self.usage.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.below = torch.where(self.usage < self.threshold, self.below + 1, torch.zeros_like(self.below))
        self.steps += 1
        return counts

    def dead(self) -> torch.Tensor:
        """[K] bool: below the threshold for `window` steps in a row."""
        return self.below >= self.window

    def dead_count(self) -> int:
        return int(self.dead().sum())

    @torch.no_grad()
    def sample(self, seed: int, latents: Optional[torch.Tensor] = None) -> Optional[CodeRestart]:
        """Collective. The rows and new vectors of this step's restart (None: no dead code); changes nothing."""
        dead = self.dead().nonzero().flatten().cpu()
        if dead.numel() == 0:
            return None
        latents = self.latents if latents is None else latents
        if latents is None or latents.dim() != 2 or latents.shape[1] != self.quantizer.codebook_dim:
            raise ValueError(f"latents must be [N, {self.quantizer.codebook_dim}] (the last training forward's "
                             f"encoder outputs), got {None if latents is None else tuple(latents.shape)}")
        offered = torch.tensor([min(dead.numel(), latents.shape[0])], device=latents.device)
        offered = int(_all_reduce(offered, dist.ReduceOp.MIN))
        local = torch.Generator().manual_seed((seed + 0x9E3779B97F4A7C15 * (_rank() + 1)) % 2**63)
        mine = latents[torch.randperm(latents.shape[0], generator=local)[:offered].to(latents.device)]
        pool = all_gather_rows(mine.to(self.quantizer.embedding.weight.dtype))
        shared = torch.Generator().manual_seed(seed)
        count = min(dead.numel(), pool.shape[0])
        rows = dead if count == dead.numel() else dead[torch.randperm(dead.numel(), generator=shared)[:count]]
        values = pool[torch.randperm(pool.shape[0], generator=shared)[:count].to(pool.device)]
        if self.quantizer.l2_norm:
            values = F.normalize(values.float(), dim=-1).to(values.dtype)
        return CodeRestart(rows.sort().values.to(values.device), values)

    @torch.no_grad()
    def restart(self, seed: int, optimizer: Optional[torch.optim.Optimizer] = None,
                latents: Optional[torch.Tensor] = None) -> Optional[CodeRestart]:
        """Collective, after the optimizer step: re-initialise the dead codes (see the class docstring), in the
        module, the optimizer state and a ZeRO master copy (overwrite_rows). `seed` must be the same on every
        rank (the main stage keys it by the step). Returns what was written, or None."""
        restart = self.sample(seed, latents)
        if restart is None:
            return None
        overwrite_rows(self.quantizer.embedding.weight, restart.rows, restart.values, optimizer)
        rows = restart.rows.to(self.usage.device)
        self.usage[rows] = self.threshold
        self.below[rows] = 0
        self.restarted += restart.rows.numel()
        return restart

    def state_dict(self) -> dict:
        return {"usage": self.usage.cpu(), "below": self.below.cpu(), "steps": self.steps,
                "restarted": self.restarted, "threshold": self.threshold, "window": self.window,
                "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        if state["usage"].shape != self.usage.shape:
            raise ValueError(f"dead-code state is for {state['usage'].numel()} codes, the codebook has "
                             f"{self.usage.numel()}")
        self.usage.copy_(state["usage"])
        self.below.copy_(state["below"])
        self.steps, self.restarted = int(state["steps"]), int(state["restarted"])
