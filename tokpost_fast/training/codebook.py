"""Codebook health while the main stage trains a VQ tokenizer: k-means init of the codebook, the codes used and
their perplexity over a window of steps, dead codes and their restarts (models/tokenizer/quantizer.py:
DeadCodeTracker). A step's codes are counted once (DeadCodeTracker.observe, summed over ranks) and feed both the
dead-code state and the logged usage."""

from __future__ import annotations

import collections
import time
from typing import Optional

import torch

from tokpost_fast.config import Config
from tokpost_fast.data import build_loader
from tokpost_fast.models.tokenizer import Tokenizer
from tokpost_fast.models.tokenizer.quantizer import DeadCodeTracker, synchronised_fingerprints
from tokpost_fast.perturb import step_seed
from tokpost_fast.training.engine import EMA, DistInfo


class CodebookUsage:
    """Code counts over the last `window` steps: the fraction of the K codes used and the perplexity exp(H(p)) of
    the code distribution. add() takes a step's counts summed over ranks (DeadCodeTracker.observe returns them), so
    every rank holds the same window; counts stay on their device (no sync per step)."""

    def __init__(self, codebook_size: int, window: int):
        self.K = codebook_size
        self.window: collections.deque = collections.deque(maxlen=window)
        self.counts: Optional[torch.Tensor] = None

    def add(self, step_counts: torch.Tensor) -> None:
        """step_counts: [K] code counts of one step (all ranks)."""
        step_counts = step_counts.detach().double()
        if self.counts is None:
            self.counts = torch.zeros_like(step_counts)
        if len(self.window) == self.window.maxlen:
            self.counts -= self.window[0]
        self.window.append(step_counts)
        self.counts += step_counts

    def summary(self) -> dict:
        counts = self.counts.cpu() if self.counts is not None else torch.zeros(self.K, dtype=torch.float64)
        total = counts.sum()
        if total <= 0:
            return {"codebook/used": 0.0, "codebook/perplexity": 0.0}
        p = counts[counts > 0] / total
        entropy = -(p * p.log()).sum()
        return {"codebook/used": float((counts > 0).double().mean()), "codebook/perplexity": float(entropy.exp())}


class CodebookHealth:
    """Usage, dead codes and restarts of the main stage's VQ tokenizer (section `codebook`). update() is collective:
    every rank calls it after each good step's optimizer update."""

    def __init__(self, tokenizer: Tokenizer, cfg: Config):
        cb = cfg.codebook
        self.tokenizer, self.restart_dead, self.seed = tokenizer, cb.restart_dead, cfg.train.seed
        self.tracker = DeadCodeTracker(tokenizer.quantize, cb.dead_threshold, cb.dead_window, cb.usage_decay)
        self.usage = CodebookUsage(tokenizer.codebook_size, cfg.train.usage_window)
        self.restart_prints: Optional[list] = None   # per-rank fingerprints after the interval's last restart

    def update(self, step: int, indices: torch.Tensor, optimizer: torch.optim.Optimizer, ema: EMA) -> None:
        self.usage.add(self.tracker.observe(indices))
        if not self.restart_dead:
            return
        restart = self.tracker.restart(step_seed(self.seed, step, 0, stream="restart"), optimizer)
        if restart is not None:                       # the EMA's copy restarts too: a blend is neither
            shadow = ema.shadow["quantize.embedding.weight"]
            shadow[restart.rows.to(shadow.device)] = restart.values.to(shadow)
            self.restart_prints = synchronised_fingerprints(self.tokenizer.quantize.embedding.weight)

    def row(self) -> dict:
        """The log row's codebook keys; a restart's fingerprints are reported once."""
        row = {**self.usage.summary(), "codebook/dead": self.tracker.dead_count(),
               "codebook/restarted": self.tracker.restarted}
        if self.restart_prints is not None:
            row["codebook/restart_fingerprints"], self.restart_prints = self.restart_prints, None
        return row

    def state_dict(self) -> dict:
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state)


def train_batches(cfg: Config, info: DistInfo, epoch: int, skip: int):
    """This rank's training batches of an epoch after the first `skip`: the order depends on (seed, epoch) only."""
    return iter(build_loader(cfg.data, train=True, rank=info.rank, world_size=info.world_size, seed=cfg.train.seed,
                             epoch=epoch, start_batch=skip))


@torch.no_grad()
def kmeans_init_codebook(cfg: Config, info: DistInfo, tokenizer: Tokenizer) -> dict:
    """codebook.init = kmeans (collective): the codebook becomes the k-means centroids (ops.kmeans) of the encoder
    outputs of the first ceil(codebook.kmeans_images / world) epoch-0 training images of every rank."""
    t0 = time.perf_counter()
    per_rank = -(-cfg.codebook.kmeans_images // info.world_size)
    latents, seen = [], 0
    tokenizer.eval()
    for batch in train_batches(cfg, info, epoch=0, skip=0):
        z = tokenizer.encode_latent(batch[0][:per_rank - seen].to(info.device))
        latents.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float())
        seen += z.shape[0]
        if seen >= per_rank:
            break
    tokenizer.train()
    rows = torch.cat(latents)
    inertia = tokenizer.quantize.init_from_kmeans(rows, cfg.codebook.kmeans_iters, seed=cfg.train.seed)
    return {"images": seen * info.world_size, "latent_rows": rows.shape[0] * info.world_size,
            "iters": cfg.codebook.kmeans_iters, "inertia_per_row": float(inertia),
            "seconds": time.perf_counter() - t0}
