"""Features and statistics: the glue between our image batches and torch-fidelity's metric code.

torch-fidelity computes the statistics and the metrics (fid_features_to_statistics, fid_statistics_to_metric,
isc_features_to_metric, prc_features_to_metric, kid_features_to_metric); what it cannot do for us is take images
that exist only as decodes of token batches, so the batching loop and the real-image statistics cache live here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from tqdm.auto import tqdm

from tokpost_fast.atomic import atomic_torch_save
from tokpost_fast.metrics.extractor import ExtractorInfo

STATS_FORMAT = 1


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] float in [-1, 1] -> uint8 [0, 255], rounded (the inverse of x / 127.5 - 1, so real images
    loaded from 8-bit files come back bit-exact)."""
    if images.dtype == torch.uint8:
        return images
    return ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def iter_image_batches(images) -> Iterator[torch.Tensor]:
    """Accept a tensor [N, 3, H, W], or an iterable of tensors or of (images, labels, indices) tuples (what
    tokpost_fast.data.build_loader yields), and yield image tensors."""
    if torch.is_tensor(images):
        if images.dim() != 4:
            raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
        yield images
        return
    for batch in images:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def count_images(images, num: int | None = None) -> int | None:
    """How many images a source will give (for progress bars), when it can tell: min(num, its size)."""
    if torch.is_tensor(images):
        size = images.shape[0]
    else:
        dataset = getattr(images, "dataset", None)
        try:
            size = len(dataset) if dataset is not None else None
        except TypeError:
            size = None
    if size is None:
        return num
    return size if num is None else min(num, size)


class FeatureCollector:
    """Runs an extractor over image batches and concatenates the requested layers. Checks what the metrics assume:
    3-channel images, all of one size."""

    def __init__(self, extractor, info: ExtractorInfo, device: str | torch.device = "cpu", what: str = "images"):
        self.extractor, self.info, self.device, self.what = extractor, info, torch.device(device), what
        self.image_shape: tuple[int, ...] | None = None
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.count = 0

    @torch.no_grad()
    def add(self, images: torch.Tensor) -> None:
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.what}: expected image batches [B, 3, H, W], got {getattr(images, 'shape', images)}")
        shape = tuple(images.shape[1:])
        if self.image_shape is None:
            self.image_shape = shape
        elif shape != self.image_shape:
            raise ValueError(f"{self.what}: images of different sizes: {'x'.join(map(str, self.image_shape))} "
                             f"then {'x'.join(map(str, shape))} (FID compares one image size)")
        if images.shape[0] == 0:
            return
        features = self.extractor(images_to_uint8(images.to(self.device)))
        for name, value in self.extractor.convert_features_tuple_to_dict(features).items():
            self.parts.setdefault(name, []).append(value.detach().float().cpu())
        self.count += images.shape[0]

    def result(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise ValueError(f"{self.what}: no images (the image source was empty)")
        return {name: torch.cat(parts) for name, parts in self.parts.items()}


def extract_features(images, extractor, info: ExtractorInfo, device="cpu", num: int | None = None,
                     progress: bool = False, what: str = "images") -> dict[str, torch.Tensor]:
    """Features of the first `num` images (all when None) of a tensor / iterable of batches: {layer: [N, d]}."""
    collector = FeatureCollector(extractor, info, device, what)
    with tqdm(total=count_images(images, num), unit="img", desc=f"features: {what}", disable=not progress) as bar:
        for batch in iter_image_batches(images):
            if num is not None:
                batch = batch[: num - collector.count]
            collector.add(batch)
            bar.update(batch.shape[0])
            if num is not None and collector.count >= num:
                break
    return collector.result()


@dataclass
class FIDStats:
    mu: np.ndarray        # [d] float64
    sigma: np.ndarray     # [d, d] float64
    count: int


def fid_statistics(features: torch.Tensor, what: str = "images") -> FIDStats:
    """Mean and covariance of features [N, d] (torch-fidelity's fid_features_to_statistics); needs N >= 2."""
    if features.dim() != 2:
        raise ValueError(f"{what}: features must be [N, d], got {tuple(features.shape)}")
    if features.shape[0] < 2:
        raise ValueError(f"{what}: FID needs at least 2 images, got {features.shape[0]} (a covariance needs two)")
    stats = fid_features_to_statistics(features.double())
    return FIDStats(mu=stats["mu"], sigma=np.atleast_2d(stats["sigma"]), count=int(features.shape[0]))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), via torch-fidelity's fid_statistics_to_metric
    (the trace of the square root as the sum of sqrt(eigenvalues of S1 S2)); inputs as float64 arrays."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance: mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    return float(fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2},
                                          verbose=False)[KEY_METRIC_FID])


def fid_between(stats1: FIDStats, stats2: FIDStats) -> float:
    return frechet_distance(stats1.mu, stats1.sigma, stats2.mu, stats2.sigma)


KID_SUBSETS = 100       # torch-fidelity's default


def kid_between(features: torch.Tensor, real_features: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over KID_SUBSETS random subsets) of features [N, d] against real ones [M, d]: torch-fidelity's
    unbiased polynomial-kernel estimator. Subsets hold min(1000, N // 2, M // 2) images (torch-fidelity's 1000 is
    for 50k images; a subset of all N would make every subset the same set and the std 0), so the std shows the
    sampling noise of the sets. Unlike FID, KID has no bias from few images: it stands beside every FID here."""
    size = min(1000, features.shape[0] // 2, real_features.shape[0] // 2)
    if size < 2:
        raise ValueError(f"KID needs at least 4 images in each set, got {features.shape[0]} and "
                         f"{real_features.shape[0]}")
    kid = kid_features_to_metric(features.double(), real_features.double(), kid_subsets=KID_SUBSETS,
                                 kid_subset_size=size, kid_kernel="poly", kid_kernel_poly_degree=3,
                                 kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, rng_seed=seed, verbose=False)
    return float(kid[KEY_METRIC_KID_MEAN]), float(kid[KEY_METRIC_KID_STD])


# --- real-image statistics cache -------------------------------------------------------------------------------

def fingerprint(payload: object) -> str:
    """sha256 of a JSON-able description (dataset files, transform, image count)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def dataset_fingerprint(dataset, description: dict) -> str:
    """A dataset's identity: `description` (data config, split, image count) plus, when the dataset lists its
    files (torchvision ImageFolder's `samples`), each file's relative path, size and mtime."""
    files = []
    samples = getattr(dataset, "samples", None)
    root = getattr(dataset, "root", None)
    if samples:
        for path, label in samples:
            full = os.path.join(root, path) if root and not os.path.isabs(path) else path
            name = os.path.relpath(full, root) if root else path
            try:
                st = os.stat(full)
                files.append((name, label, st.st_size, st.st_mtime_ns))
            except OSError:
                files.append((name, label, None, None))
    return fingerprint({"description": description, "files": files})


@dataclass
class RealStats:
    stats: FIDStats
    features: torch.Tensor   # [N, d] FID-layer features, kept for precision-recall and KID
    extractor_id: str
    dataset_fingerprint: str


def real_stats_path(cache_dir: str, info: ExtractorInfo, data_fingerprint: str) -> str:
    safe_id = info.extractor_id.replace(":", "-").replace(os.sep, "_")
    return os.path.join(cache_dir, f"real-{safe_id}-{data_fingerprint[:16]}.pt")


def load_real_stats(path: str, info: ExtractorInfo, data_fingerprint: str) -> RealStats | None:
    """The cached statistics at `path` if they match this extractor and dataset, else None."""
    if not os.path.isfile(path):
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        return None  # a torn or foreign file: recompute and overwrite
    if (payload.get("format") != STATS_FORMAT or payload.get("extractor_id") != info.extractor_id
            or payload.get("dataset_fingerprint") != data_fingerprint):
        return None
    stats = FIDStats(mu=payload["mu"], sigma=payload["sigma"], count=int(payload["count"]))
    return RealStats(stats, payload["features"], payload["extractor_id"], payload["dataset_fingerprint"])


def save_real_stats(path: str, real: RealStats) -> None:
    atomic_torch_save({"format": STATS_FORMAT, "mu": real.stats.mu, "sigma": real.stats.sigma,
                        "count": real.stats.count, "features": real.features, "extractor_id": real.extractor_id,
                        "dataset_fingerprint": real.dataset_fingerprint}, path)


def cached_real_stats(cache_dir: str | None, info: ExtractorInfo, data_fingerprint: str,
                      compute_features) -> tuple[RealStats, bool]:
    """Real-image statistics from `cache_dir` when present for (extractor id, dataset fingerprint), else from
    compute_features() -> {layer: [N, d]} (then saved). Returns (stats, loaded_from_cache)."""
    path = real_stats_path(cache_dir, info, data_fingerprint) if cache_dir else None
    if path:
        cached = load_real_stats(path, info, data_fingerprint)
        if cached is not None:
            return cached, True
    features = compute_features()[info.fid_layer]
    real = RealStats(fid_statistics(features, "real images"), features, info.extractor_id, data_fingerprint)
    if path:
        save_real_stats(path, real)
    return real, False

