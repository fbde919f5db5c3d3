"""NVIDIA DALI pipeline with the torch pipeline's transforms (METHOD.md B4).

Python keeps the sampler and the per-sample crop parameters (data/folder.py), reads the encoded bytes and feeds
them through external_source; DALI decodes ("mixed" = nvJPEG on a GPU, "cpu" without one), resizes the shorter side
(cubic, antialiased), crops the S x S window at the same relative position, mirrors and scales to [-1, 1] in one
crop_mirror_normalize. device_id=None runs everything on the CPU (how the tests exercise it).

A file DALI cannot decode fails the whole batch; the batch is then checked with PIL, unreadable files are replaced
by the next readable image exactly as in the torch path, the pipeline is rebuilt and the batch rerun.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from tokpost_fast.data.folder import ImageFolderDataset, first_readable, warn_skipped


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class DaliBatchDecoder:
    """encoded images + crop parameters -> images [B, 3, S, S] float32 in [-1, 1] (on the GPU when device_id)."""

    def __init__(self, image_size: int, max_batch: int, num_threads: int = 2, device_id: Optional[int] = None):
        self.image_size, self.max_batch = image_size, max_batch
        self.num_threads, self.device_id = max(1, num_threads), device_id
        self.pipe = self._build()

    def _build(self):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        gpu = self.device_id is not None
        pipe = Pipeline(batch_size=self.max_batch, num_threads=self.num_threads, device_id=self.device_id,
                        prefetch_queue_depth=1, exec_dynamic=True)
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            short = fn.external_source(name="short", dtype=types.FLOAT, ndim=0)
            crop_x = fn.external_source(name="crop_x", dtype=types.FLOAT, ndim=0)
            crop_y = fn.external_source(name="crop_y", dtype=types.FLOAT, ndim=0)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
            images = fn.resize(images, resize_shorter=short, interp_type=types.INTERP_CUBIC, antialias=True)
            images = fn.crop_mirror_normalize(
                images, crop=(self.image_size, self.image_size), crop_pos_x=crop_x, crop_pos_y=crop_y,
                mirror=mirror, mean=[127.5] * 3, std=[127.5] * 3, output_layout="CHW", dtype=types.FLOAT)
            pipe.set_outputs(images)
        pipe.build()
        return pipe

    def __call__(self, encoded: list[np.ndarray], params: list) -> torch.Tensor:
        self.pipe.feed_input("encoded", encoded)
        self.pipe.feed_input("short", [np.float32(p.short) for p in params])
        self.pipe.feed_input("crop_x", [np.float32(p.crop_x) for p in params])
        self.pipe.feed_input("crop_y", [np.float32(p.crop_y) for p in params])
        self.pipe.feed_input("mirror", [np.int32(p.flip) for p in params])
        (out,) = self.pipe.run()
        if self.device_id is None:
            return torch.from_numpy(out.as_array())
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = out.as_tensor()
        result = torch.empty(tensor.shape(), dtype=torch.float32, device=f"cuda:{self.device_id}")
        feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(self.device_id))
        return result

    def rebuild(self) -> None:
        """After a decode failure DALI may refuse further runs; start a fresh pipeline."""
        del self.pipe
        self.pipe = self._build()


class DaliImageLoader:
    """Yields (images [B, 3, S, S], labels [B], indices [B]) from an index sampler, like ImageLoader."""

    def __init__(self, dataset: ImageFolderDataset, sampler, batch_size: int, drop_last: bool,
                 num_threads: int = 2, device_id: Optional[int] = None):
        self.dataset, self.sampler = dataset, sampler
        self.batch_size, self.drop_last = batch_size, drop_last
        self.decoder = DaliBatchDecoder(dataset.cfg.image_size, batch_size, num_threads, device_id)
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.epoch = epoch

    def _decode(self, indices: list[int]) -> tuple[torch.Tensor, list[int]]:
        encoded = [np.fromfile(self.dataset.path(i), dtype=np.uint8) for i in indices]
        try:
            return self.decoder(encoded, [self.dataset.params(i) for i in indices]), indices
        except RuntimeError:
            pass
        # Some file failed: find it with PIL, substitute, retry on a fresh pipeline.
        fixed = []
        for i in indices:
            j, bad = first_readable(self.dataset, i)
            warn_skipped(self.skipped, bad)
            fixed.append(j)
        self.decoder.rebuild()
        if fixed == indices:
            raise RuntimeError(f"DALI failed on a batch that PIL reads fine: {[self.dataset.path(i) for i in indices]}")
        encoded = [np.fromfile(self.dataset.path(i), dtype=np.uint8) for i in fixed]
        return self.decoder(encoded, [self.dataset.params(i) for i in fixed]), fixed

    def __iter__(self):
        order = list(self.sampler)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                break
            images, used = self._decode(batch)
            labels = torch.tensor([self.dataset.samples[i][1] for i in used], dtype=torch.int64)
            indices = torch.tensor(used, dtype=torch.int64)
            if images.is_cuda:
                labels, indices = labels.to(images.device), indices.to(images.device)
            yield images, labels, indices
