"""kmeans: Lloyd's k-means whose assignment step is the fused nearest-code search (as flash-kmeans' FlashAssign).

# x: [N, D], k -> KMeansOutput(centroids [k, D] fp32, indices [N] int64, inertia [] fp32)
Every iteration: assign each row to its nearest centroid with `nearest_codes(x, centroids, k=1)` (never the
N x k distance matrix), then move each centroid to the mean of its rows, summed by the codebook-lookup backward
kernel (a deterministic segmented sum, no float atomics). After the last update the rows are assigned once more,
so `indices` and `inertia` (the sum of squared distances to the assigned centroid) describe the returned
centroids. `iters` counts the updates: iters = 0 returns the initial centroids with their assignment.

- Initialisation: k distinct rows of x drawn with a torch.Generator seeded by `seed` (as vector-quantize-pytorch
  and flash-kmeans), or the `init` centroids.
- metric="cosine" is spherical k-means: rows and centroids are l2-normalised, a centroid is the normalised mean.
- An empty cluster takes the row farthest from its own centroid (the largest assignment distance, ties to the
  lowest row index; the i-th empty cluster takes the i-th farthest row), as scikit-learn relocates empty clusters;
  that row still counts in its old cluster's mean for this update.
- Inputs fp32 / fp16 / bf16; everything runs in fp32.
A plain Python loop over the custom ops, not a custom op itself: the iteration count is a host-side loop and the
op runs once per codebook initialisation, never inside a compiled graph.
`kmeans_reference` is the same algorithm in plain PyTorch, its assignment by `nearest_codes_reference` (the ops'
ground truth, so it follows the nearest-code contract: same distances, ties to the lowest index) and its sums by
index_add_: the ground truth of the tests. benchmarks/kmeans_bench.py times a textbook torch k-means beside it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from tokpost_fast.ops import _backends
from tokpost_fast.ops._validate import FLOAT_DTYPES, check_metric, check_seed
from tokpost_fast.ops.codebook_lookup import _lookup_backward_kernel
from tokpost_fast.ops.nearest_codes import nearest_codes, nearest_codes_reference


class KMeansOutput(NamedTuple):
    centroids: torch.Tensor   # [k, D] fp32 (rows unit-norm for metric="cosine")
    indices: torch.Tensor     # [N] int64, each row's nearest centroid (ties to the lowest index)
    inertia: torch.Tensor     # [] fp32, sum over rows of the squared distance to its centroid


def _check(x, k, iters, metric, seed, init) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D [N, D] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError("x has D = 0")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if init is None and k > x.shape[0]:
        raise ValueError(f"k ({k}) must be <= the number of rows of x ({x.shape[0]}) to initialise from distinct "
                         "rows; pass init= or more rows")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if x.shape[0] == 0:
        raise ValueError("x has no rows (N = 0)")
    check_metric(metric)
    check_seed(seed)
    if init is not None:
        if not isinstance(init, torch.Tensor) or init.shape != (k, x.shape[1]):
            raise ValueError(f"init must be a [k, D] = [{k}, {x.shape[1]}] tensor, got "
                             f"{getattr(init, 'shape', type(init).__name__)}")
        if init.dtype not in FLOAT_DTYPES or init.device != x.device:
            raise ValueError(f"init must be a float tensor on x's device {x.device}, got {init.dtype} on "
                             f"{init.device}")


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def _initial(x: torch.Tensor, k: int, metric: str, seed: int, init: Optional[torch.Tensor]) -> torch.Tensor:
    if init is not None:
        centroids = init.float().clone()
    else:
        rows = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:k]
        centroids = x[rows.to(x.device)].clone()
    return _normalize(centroids) if metric == "cosine" else centroids


def _update(x, centroids, indices, dist, sums, metric) -> torch.Tensor:
    """New centroids from this assignment: cluster means (sums [k, D] fp32 given), empty clusters relocated."""
    k = centroids.shape[0]
    counts = torch.bincount(indices, minlength=k)
    means = sums / counts.clamp(min=1).to(sums.dtype)[:, None]
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        # The farthest rows (stable: equal distances in row order), one per empty cluster.
        far = torch.sort(dist, descending=True, stable=True).indices[:empty.numel()]
        means[empty[:far.numel()]] = x[far]
    return _normalize(means) if metric == "cosine" else means


def kmeans(x: torch.Tensor, k: int, iters: int = 10, metric: str = "l2", seed: int = 0,
           init: Optional[torch.Tensor] = None, backend: str = "auto") -> KMeansOutput:
    """k centroids of the rows of x (see the module docstring).

    # x: [N, D] -> centroids [k, D] fp32, indices [N] int64, inertia [] fp32
    backend: the nearest-code and segmented-sum kernels ("auto" | "triton" | "cuda" | "cpu" | "reference").
    """
    _check(x, k, iters, metric, seed, init)
    _backends.check_backend_name(backend)
    x = x.detach().float()
    if metric == "cosine":
        x = _normalize(x)
    centroids = _initial(x, k, metric, seed, init)
    for it in range(iters + 1):
        # metric="l2" here: the rows are already normalised for cosine, and the centroids are unit-norm.
        dist, idx = nearest_codes(x, centroids, k=1, metric="l2", backend=backend)
        dist, idx = dist[:, 0], idx[:, 0]
        if it == iters:
            break
        sums = _lookup_backward_kernel(x, idx, k, backend).float()
        centroids = _update(x, centroids, idx, dist, sums, metric)
    return KMeansOutput(centroids, idx, dist.clamp(min=0).sum())


def kmeans_reference(x: torch.Tensor, k: int, iters: int = 10, metric: str = "l2", seed: int = 0,
                     init: Optional[torch.Tensor] = None) -> KMeansOutput:
    """Plain PyTorch k-means, the same algorithm as `kmeans` (nearest_codes_reference, index_add_)."""
    _check(x, k, iters, metric, seed, init)
    x = x.detach().float()
    if metric == "cosine":
        x = _normalize(x)
    centroids = _initial(x, k, metric, seed, init)
    for it in range(iters + 1):
        dist, idx = nearest_codes_reference(x, centroids, 1)
        dist, idx = dist[:, 0], idx[:, 0]
        if it == iters:
            break
        sums = torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, idx, x)
        centroids = _update(x, centroids, idx, dist, sums, metric)
    return KMeansOutput(centroids, idx, dist.clamp(min=0).sum())
