import zlib

import pytest
import torch

from tokpost_fast import ops
from tokpost_fast.ops._validate import l2_normalize

from tokpost_fast.ops.nearest_codes import nearest_codes_reference, squared_distances_reference

from .helpers import ALL_BACKENDS, assert_knn_tie_aware, interpreted, near_tie_clusters, require_backend
from .helpers import true_nearest_violations

# (N, K, D, k): awkward sizes — not multiples of any tile, K not a power of two, D = 1, N = 0 and 1.
CASES = [
    (0, 3, 8, 2),
    (1, 1, 1, 1),
    (1, 4097, 3, 100),
    (37, 3, 1, 2),
    (37, 1000, 257, 7),
    (1000, 1000, 8, 1),
    (1000, 4097, 64, 100),
    (4097, 1000, 3, 7),
    (4097, 4097, 8, 1),
    (37, 1000, 1, 100),
]
# The Triton interpreter runs each program in Python; keep its shapes small but still ragged.
INTERPRETER_CASES = [(0, 3, 8, 2), (1, 1, 1, 1), (37, 3, 1, 2), (37, 97, 17, 7), (130, 300, 3, 100), (5, 257, 64, 1)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_tie_aware(backend, metric, dtype):
    device = require_backend(backend)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{backend}{metric}{dtype}".encode()))
    for n, k_codes, d, k in INTERPRETER_CASES if interpreted(backend) else CASES:
        z = torch.randn(n, d, generator=gen).to(dtype).to(device)
        codebook = torch.randn(k_codes, d, generator=gen).to(dtype).to(device)
        dist, idx = ops.nearest_codes(z, codebook, k=k, metric=metric, backend=backend)
        if metric == "cosine":
            z, codebook = l2_normalize(z), l2_normalize(codebook)
        assert_knn_tie_aware(z.cpu(), codebook.cpu(), dist.cpu(), idx.cpu(), k)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_exact_ties_go_to_lowest_index(backend):
    device = require_backend(backend)
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(-3, 4, (20, 5), generator=gen).float()
    # Every code appears three times: at i, i + 20 and i + 40.
    codebook = torch.cat([base, base, base]).to(device)
    z = torch.randint(-3, 4, (50, 5), generator=gen).float().to(device)
    dist, idx = ops.nearest_codes(z, codebook, k=3, backend=backend)
    ref_dist, ref_idx = ops.nearest_codes(z, codebook, k=3, backend="reference")
    assert torch.equal(idx.cpu(), ref_idx.cpu())
    assert torch.equal(dist.cpu(), ref_dist.cpu())  # integer-valued: exact in fp32 on every backend
    # A code duplicated 3 times: the 3 nearest of a token sitting on it are i, i+20, i+40 in that order.
    on_code = codebook[7:8]
    _, idx = ops.nearest_codes(on_code, codebook, k=3, backend=backend)
    assert idx.cpu().tolist() == [[7, 27, 47]]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_rows_order_as_inf(backend):
    device = require_backend(backend)
    z = torch.randn(6, 4)
    z[2, 1] = float("nan")
    codebook = torch.randn(9, 4)
    dist, idx = ops.nearest_codes(z.to(device), codebook.to(device), k=3, backend=backend)
    assert idx[2].cpu().tolist() == [0, 1, 2]
    assert torch.isinf(dist[2]).all() and (dist[2] > 0).all()
    ref_dist, ref_idx = ops.nearest_codes(z, codebook, k=3, backend="reference")
    assert torch.equal(idx.cpu()[[0, 1, 3, 4, 5]], ref_idx[[0, 1, 3, 4, 5]])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_leading_dims_and_non_contiguous(backend):
    device = require_backend(backend)
    gen = torch.Generator().manual_seed(1)
    z_full = torch.randn(3, 5, 7, 16, generator=gen).to(device)
    z = z_full[:, :, ::2, ::2]  # non-contiguous, D = 8
    codebook = torch.randn(40, 16, generator=gen).to(device)[:, ::2]
    dist, idx = ops.nearest_codes(z, codebook, k=4, backend=backend)
    assert dist.shape == (3, 5, 4, 4) and idx.shape == (3, 5, 4, 4)
    ref_dist, ref_idx = ops.nearest_codes(z.contiguous().cpu(), codebook.contiguous().cpu(), k=4, backend="reference")
    assert_knn_tie_aware(z.reshape(-1, 8).cpu(), codebook.cpu(), dist.reshape(-1, 4).cpu(), idx.reshape(-1, 4).cpu(), 4)
    assert (idx.cpu() == ref_idx).float().mean() > 0.99


def test_mixed_dtypes_run_in_fp32():
    z = torch.randn(30, 8).bfloat16()
    codebook = torch.randn(50, 8)
    dist, idx = ops.nearest_codes(z, codebook, k=2, backend="reference")
    assert_knn_tie_aware(z.float(), codebook, dist, idx, 2)


def test_auto_picks_a_fused_kernel_on_cpu():
    # auto must never silently take the reference when the extension is built.
    from tokpost_fast.ops._backends import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), "nearest_codes") == "cpu"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_near_tie_clusters_return_the_true_nearest(backend):
    # The exact-nearest contract (docs/INTERFACES.md): on codes in tight clusters every backend returns the float64
    # nearest code for 100 % of tokens. The control arm shows the data are hard: the fp32 expanded form, searched
    # alone, gets a sizeable share wrong. The interpreter gets a smaller codebook.
    device = require_backend(backend)
    n, num_codes = (192, 1024) if interpreted(backend) else (1024, 8192)
    z, codebook = near_tie_clusters(n, num_codes, 8, seed=11)
    expanded_idx = squared_distances_reference(z, codebook).argmin(1)
    assert true_nearest_violations(z, codebook, expanded_idx) >= n // 50, "control: the data are not near-ties"
    dist, idx = ops.nearest_codes(z.to(device), codebook.to(device), k=4, backend=backend)
    dist, idx = dist.cpu(), idx.cpu()
    assert true_nearest_violations(z, codebook, idx[:, 0]) == 0
    ref_dist, ref_idx = nearest_codes_reference(z, codebook, 4)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist), "not bit-identical to the exact reference"
