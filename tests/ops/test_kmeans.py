"""ops.kmeans (Lloyd's k-means on the fused nearest-code op) against its plain-PyTorch reference."""

import zlib

import pytest
import torch

from tokpost_fast import ops
from tokpost_fast.ops._validate import l2_normalize

from .helpers import ALL_BACKENDS, assert_knn_tie_aware, interpreted, require_backend

# (N, k, D): awkward sizes, k not a power of two, D = 1 and odd D, N = k (every row its own cluster).
CASES = [(1, 1, 1), (37, 5, 3), (300, 37, 17), (1000, 97, 8), (2049, 300, 64), (97, 97, 5)]
INTERPRETER_CASES = [(1, 1, 1), (37, 5, 3), (130, 9, 17)]


def blobs(n: int, k: int, d: int, gen: torch.Generator, spread: float = 1e-3) -> torch.Tensor:
    """n rows around k centres far apart, row i < k around centre i. Started from x[:k] (one centroid per blob),
    every row's nearest centroid is unambiguous at every iteration, so every backend must follow the reference
    iteration for iteration; a random start could put two centroids in one blob, where the rows' choice between
    them is decided by rounding."""
    centres = torch.randn(k, d, generator=gen) * 10
    owner = torch.cat([torch.arange(k), torch.randint(0, k, (n - k,), generator=gen)])
    return centres[owner] + spread * torch.randn(n, d, generator=gen)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_follows_the_reference_on_separated_clusters(backend, metric):
    device = require_backend(backend)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{backend}{metric}".encode()))
    for n, k, d in INTERPRETER_CASES if interpreted(backend) else CASES:
        x = blobs(n, k, d, gen)
        if metric == "cosine" and d == 1:
            continue                      # 1-D unit vectors are +-1: two directions, no room for k clusters
        ref = ops.kmeans_reference(x, k, iters=4, metric=metric, init=x[:k])
        out = ops.kmeans(x.to(device), k, iters=4, metric=metric, init=x[:k].to(device), backend=backend)
        assert out.centroids.shape == (k, d) and out.centroids.dtype == torch.float32
        assert out.indices.dtype == torch.int64 and out.indices.shape == (n,)
        assert torch.equal(out.indices.cpu(), ref.indices), (n, k, d)
        torch.testing.assert_close(out.centroids.cpu(), ref.centroids, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.inertia.cpu(), ref.inertia, rtol=1e-3, atol=1e-3 * n)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_reference_backend_is_the_reference_bit_for_bit(metric):
    """Unstructured data (near-ties, empty clusters), seeded random start: the op on the reference kernels runs
    the reference algorithm exactly."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(700, 5, generator=gen)
    for k in (1, 9, 150):
        out = ops.kmeans(x, k, iters=6, metric=metric, seed=k, backend="reference")
        ref = ops.kmeans_reference(x, k, iters=6, metric=metric, seed=k)
        assert torch.equal(out.indices, ref.indices) and torch.equal(out.centroids, ref.centroids)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_the_assignment_is_a_nearest_centroid_tie_aware(backend):
    """On unstructured data (near-ties everywhere) the assignment must still be *a* nearest centroid."""
    device = require_backend(backend)
    gen = torch.Generator().manual_seed(1)
    for n, k, d in INTERPRETER_CASES if interpreted(backend) else CASES:
        x = torch.randn(n, d, generator=gen)
        init = torch.randn(k, d, generator=gen)
        out = ops.kmeans(x.to(device), k, iters=0, init=init.to(device), backend=backend)
        assert torch.equal(out.centroids.cpu(), init)
        dist = (x - init[out.indices.cpu()]).pow(2).sum(1)
        assert_knn_tie_aware(x, init, dist[:, None], out.indices.cpu()[:, None], 1)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_one_update_moves_each_centroid_to_its_rows_mean(metric):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(500, 6, generator=gen)
    init = torch.randn(23, 6, generator=gen)
    first = ops.kmeans(x, 23, iters=0, metric=metric, init=init)
    second = ops.kmeans(x, 23, iters=1, metric=metric, init=init)
    rows = l2_normalize(x) if metric == "cosine" else x
    counts = torch.bincount(first.indices, minlength=23)
    assert (counts > 0).all()             # this seed leaves no cluster empty: the plain Lloyd update applies
    means = torch.zeros(23, 6).index_add_(0, first.indices, rows) / counts[:, None]
    expected = l2_normalize(means) if metric == "cosine" else means
    torch.testing.assert_close(second.centroids, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_inertia_never_increases(metric):
    """Lloyd's iteration (spherical for cosine; relocating empty clusters) cannot increase the objective."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3000, 8, generator=gen)
    inertia = [float(ops.kmeans(x, 64, iters=i, metric=metric, seed=5).inertia) for i in range(8)]
    for before, after in zip(inertia, inertia[1:]):
        assert after <= before * (1 + 1e-5), inertia
    assert inertia[-1] < 0.9 * inertia[0], inertia


def test_an_empty_cluster_takes_the_farthest_row():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0], [5.0, 5.0]])
    init = torch.tensor([[0.3, 0.3], [10.0, 0.5], [100.0, 100.0]])        # cluster 2 gets no row
    out = ops.kmeans(x, 3, iters=1, init=init)
    # assignment: rows 0-2 -> 0, rows 3-4 -> 1, row 5 -> 0 or 1; the farthest row from its centroid is row 5
    assert torch.equal(out.centroids[2], x[5])
    ref = ops.kmeans_reference(x, 3, iters=1, init=init)
    torch.testing.assert_close(out.centroids, ref.centroids)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_run_in_fp32(dtype):
    gen = torch.Generator().manual_seed(4)
    x = blobs(400, 13, 8, gen).to(dtype)
    out = ops.kmeans(x, 13, iters=3, init=x[:13])
    ref = ops.kmeans_reference(x.float(), 13, iters=3, init=x[:13].float())
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.centroids, ref.centroids, rtol=1e-5, atol=1e-5)


def test_seeds_draw_distinct_rows_and_differ():
    x = torch.arange(50.0)[:, None].repeat(1, 2)
    a = ops.kmeans(x, 10, iters=0, seed=1).centroids
    b = ops.kmeans(x, 10, iters=0, seed=2).centroids
    assert a[:, 0].unique().numel() == 10 and not torch.equal(a, b)
    assert torch.equal(a, ops.kmeans(x, 10, iters=0, seed=1).centroids)


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=torch.randn(10), k=2), "x must be a 2-D"),
    (dict(x=torch.randn(10, 3).double(), k=2), "x must be float32"),
    (dict(x=torch.randn(10, 3), k=0), "k must be an int >= 1"),
    (dict(x=torch.randn(10, 3), k=11), r"k \(11\) must be <= the number of rows"),
    (dict(x=torch.randn(10, 3), k=2, iters=-1), "iters must be"),
    (dict(x=torch.randn(10, 3), k=2, metric="dot"), "metric must be"),
    (dict(x=torch.randn(10, 3), k=2, seed=-1), "seed must be"),
    (dict(x=torch.randn(10, 3), k=2, init=torch.randn(3, 3)), r"init must be a \[k, D\]"),
    (dict(x=torch.randn(10, 3), k=2, backend="gpu"), "backend must be"),
    (dict(x=torch.randn(0, 3), k=1, init=torch.randn(1, 3)), "x has no rows"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.kmeans(**kwargs)
