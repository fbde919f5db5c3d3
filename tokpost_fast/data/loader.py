"""build_loader: the per-rank image stream of one epoch (METHOD.md B4).

Sharding and order come from torch's DistributedSampler keyed by (seed, epoch) (shuffled in training, drop_last so
every rank sees the same number of full batches; in eval the sampler pads the last round by repeating samples,
which the returned indices show). Augmentation is keyed by (seed, epoch, index) (data/folder.py). So a given
(seed, epoch, rank, world_size) always yields the same batches, on either backend and with any worker count.
"""

from __future__ import annotations

import itertools
import logging
from typing import Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from tokpost_fast.data.config import DataConfig
from tokpost_fast.data.dali import DaliImageLoader, dali_available
from tokpost_fast.data.folder import ImageFolderDataset, collate, warn_skipped

log = logging.getLogger("tokpost_fast.data")


class ImageLoader:
    """torchvision/PIL pipeline: yields (images [B, 3, S, S] float32 in [-1, 1], labels [B], indices [B]).
    `skipped` maps each unreadable file met so far to the reason."""

    def __init__(self, dataset: ImageFolderDataset, sampler, batch_size: int, drop_last: bool, num_workers: int):
        self.dataset, self.sampler = dataset, sampler
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                 collate_fn=collate, drop_last=drop_last, pin_memory=torch.cuda.is_available())
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """For reuse across epochs (workers are re-created on every iteration, so they see the new epoch)."""
        self.sampler.set_epoch(epoch)
        self.dataset.epoch = epoch

    def __iter__(self):
        for images, labels, indices, bad in self.loader:
            if bad:
                warn_skipped(self.skipped, bad)
            yield images, labels, indices


class OffsetSampler(Sampler):
    """The sampler's order from position `offset` on. A resumed epoch starts at its first unconsumed batch without
    reading (and decoding) the batches before it: the order is a pure function of (seed, epoch), so dropping the
    first offset = consumed batches x batch size indices leaves exactly the batches an uninterrupted run reads."""

    def __init__(self, sampler: DistributedSampler, offset: int):
        self.sampler, self.offset = sampler, offset

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.offset, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.offset)


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "dali" if dali_available() and torch.cuda.is_available() else "torch"
    if backend == "dali" and not dali_available():
        raise ValueError("DataConfig.backend='dali' but nvidia-dali is not installed (pip install nvidia-dali-cuda130)")
    return backend


def build_loader(cfg: DataConfig, train: bool, rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0,
                 device_id: Optional[int] = None, start_batch: int = 0, split: str = "train"):
    """One rank's loader for one epoch of a split ("train", the default; "val" for metrics; data/folder.py):
    ImageLoader (torch) or DaliImageLoader, both yielding (images, labels, indices) and exposing .dataset (classes,
    relative_path(i)), .skipped, .set_epoch(e). `train` switches augmentation and shuffling on.
    start_batch: begin the epoch at that batch (a resumed epoch), without reading the batches before it.
    DALI outputs live on GPU `device_id` (default: the current CUDA device; the CPU when there is none)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"build_loader: rank {rank} is outside world_size {world_size}")
    dataset = ImageFolderDataset(cfg, train=train, seed=seed, epoch=epoch, split=split)
    if len(dataset) < world_size:
        raise ValueError(f"{cfg.root}: {len(dataset)} images cannot be sharded over {world_size} ranks")
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed,
                                 drop_last=train)
    sampler.set_epoch(epoch)
    if train and len(sampler) < cfg.batch_size:
        raise ValueError(f"{cfg.root}: {len(sampler)} images per rank is less than one batch of {cfg.batch_size}")
    if start_batch < 0:
        raise ValueError(f"build_loader: start_batch must be >= 0, got {start_batch}")
    if start_batch:
        sampler = OffsetSampler(sampler, start_batch * cfg.batch_size)
    backend = resolve_backend(cfg.backend)
    if backend == "dali":
        if device_id is None and torch.cuda.is_available():
            device_id = torch.cuda.current_device()
        log.info("data: DALI pipeline on %s", f"cuda:{device_id}" if device_id is not None else "the CPU")
        return DaliImageLoader(dataset, sampler, cfg.batch_size, drop_last=train,
                               num_threads=max(cfg.num_workers, 1), device_id=device_id)
    return ImageLoader(dataset, sampler, cfg.batch_size, drop_last=train, num_workers=cfg.num_workers)
