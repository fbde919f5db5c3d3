"""The csrc extension (tokpost_fast._C) called directly: torch.ops.tokpost_fast.{knn_codes, perturb_codes,
codebook_lookup, codebook_lookup_backward, built_with_cuda} on the CPU, against the plain-PyTorch references.

The backend-parametrized suites (test_nearest_codes.py, ...) go through the public API; this file pins the kernel
contract itself (docs/INTERFACES.md): awkward shapes, exact ties, NaN/inf rows, bit-identical perturbation, the
deterministic lookup backward, and TORCH_CHECK errors that name the argument.
"""

import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F

import tokpost_fast._C  # noqa: F401  (registers torch.ops.tokpost_fast.*)
from tokpost_fast.ops.codebook_lookup import codebook_lookup_backward_reference
from tokpost_fast.ops.nearest_codes import nearest_codes_reference, squared_distances_reference
from tokpost_fast.ops.perturb_codes import perturb_codes_reference
from tokpost_fast.ops.philox import ranks_for_threshold

from .helpers import assert_knn_tie_aware, near_tie_clusters

ops = torch.ops.tokpost_fast
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Every (N, K, D, k) with k <= K whose fp64 ground truth stays cheap, plus the big corners explicitly: this keeps
# each value of every axis (N in {0, 1, 37, 1000}, K in {1, 3, 1000, 4097}, D in {1, 3, 8, 64, 257},
# k in {1, 2, 7, 100}) in play against both small and large partners, within the file's ~60 s budget.
_AXES = ([0, 1, 37, 1000], [1, 3, 1000, 4097], [1, 3, 8, 64, 257], [1, 2, 7, 100])
KNN_CASES = sorted(
    {c for c in itertools.product(*_AXES) if c[3] <= c[1] and c[0] * c[1] * c[2] <= 3_000_000}
    | {(1000, 4097, 8, 100), (1000, 4097, 64, 1), (1000, 1000, 257, 7), (37, 4097, 257, 100), (1000, 4097, 16, 2),
       (1000, 1000, 4, 7)}
)


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_knn_codes_tie_aware_on_awkward_shapes(dtype):
    for n, k_codes, d, k in KNN_CASES:
        gen = _gen(n, k_codes, d, k, dtype)
        z = torch.randn(n, d, generator=gen).to(dtype)
        codebook = torch.randn(k_codes, d, generator=gen).to(dtype)
        dist, idx = ops.knn_codes(z, codebook, k)
        # The tie-aware check compares with fp64 distances of the values the kernel saw (already rounded to dtype),
        # so the tolerance is fp32 accumulation error whatever the storage dtype.
        assert_knn_tie_aware(z.float(), codebook.float(), dist, idx, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k_codes,d,k", [(2000, 1000, 8, 7), (300, 4097, 8, 1), (300, 4097, 8, 100), (200, 1000, 64, 1),
                                         (200, 1000, 64, 33), (50, 700, 257, 5), (64, 65, 3, 64)])
def test_knn_codes_bit_identical_to_the_exact_reference(dtype, n, k_codes, d, k):
    # The contract: dist is the difference form (same fp32 bits on every backend), ordered by (dist, index).
    gen = _gen("ref", n, k_codes, d, k, dtype)
    z, codebook = torch.randn(n, d, generator=gen).to(dtype), torch.randn(k_codes, d, generator=gen).to(dtype)
    dist, idx = ops.knn_codes(z, codebook, k)
    ref_dist, ref_idx = nearest_codes_reference(z, codebook, k)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)


@pytest.mark.parametrize("k", [1, 5, 100])
def test_knn_codes_exact_on_near_tie_clusters(k):
    # Near-tie data (D = 8, tight clusters): the expanded form ||z||^2 - 2 z.c + ||c||^2 cancels and
    # misorders codes; the kernel's candidates within its error bound, re-ranked in the difference form, do not.
    z, codebook = near_tie_clusters(400, 16384, 8, seed=k)
    dist, idx = ops.knn_codes(z, codebook, k)
    ref_dist, ref_idx = nearest_codes_reference(z, codebook, k)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)
    true = torch.cdist(z.double(), codebook.double()).pow(2)
    assert torch.equal(idx[:, 0], true.argmin(1)), "the difference form picks the float64 nearest code here"
    # The data really is near-tie: the plain expanded form gets some rows wrong (else this test proves nothing).
    assert (squared_distances_reference(z, codebook).argmin(1) != idx[:, 0]).any()


@pytest.mark.parametrize("k", [1, 7, 300])
def test_candidate_overflow_and_huge_inputs_fall_back_exactly(k):
    gen = _gen("overflow", k)
    # 3000 identical codes: every one is inside every row's window, far more than the candidate buffer holds.
    codebook = torch.cat([torch.ones(3000, 4), torch.randn(500, 4, generator=gen)])[torch.randperm(3500, generator=gen)]
    z = torch.randn(40, 4, generator=gen)
    z[:10] = 1.0  # rows sitting on the duplicated code
    for zz, cb in ((z, codebook), (z * 1e19, codebook * 1e19), (z * 1e-21, codebook * 1e-21)):
        dist, idx = ops.knn_codes(zz, cb, k)  # huge: the bound's guard; tiny: subnormal differences
        ref_dist, ref_idx = nearest_codes_reference(zz, cb, k)
        assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)


@pytest.mark.parametrize("k", [1, 3, 40, 120])
def test_exact_ties_go_to_the_lowest_index(k):
    gen = _gen("ties", k)
    base = torch.randint(-3, 4, (40, 5), generator=gen).float()
    codebook = torch.cat([base, base, base])  # code i == code i + 40 == code i + 80
    z = torch.randint(-3, 4, (300, 5), generator=gen).float()
    dist, idx = ops.knn_codes(z, codebook, k)
    ref_dist, ref_idx = nearest_codes_reference(z, codebook, k)
    # Integer-valued inputs: every distance is exact in fp32, so the result is unique and bit-identical.
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)
    # All codes equal: the k nearest are 0..k-1.
    same = torch.ones(120, 5)
    _, idx = ops.knn_codes(torch.zeros(3, 5), same, k)
    assert idx.tolist() == [list(range(k))] * 3


@pytest.mark.parametrize("k", [1, 3, 100])
def test_nan_and_inf_rows_order_as_inf(k):
    gen = _gen("nan", k)
    z = torch.randn(9, 8, generator=gen)
    z[2, 1] = float("nan")
    z[5, 0] = float("inf")
    codebook = torch.randn(300, 8, generator=gen)
    dist, idx = ops.knn_codes(z, codebook, k)
    for row in (2, 5):
        assert idx[row].tolist() == list(range(k))
        assert torch.isinf(dist[row]).all() and (dist[row] > 0).all()
    finite = [0, 1, 3, 4, 6, 7, 8]
    _, ref_idx = nearest_codes_reference(z[finite], codebook, k)
    assert torch.equal(idx[finite], ref_idx)


def test_nan_and_inf_codes_match_the_reference():
    gen = _gen("nan-ref")
    z = torch.randn(30, 8, generator=gen)
    z[3, 2], z[4, 0] = float("nan"), -float("inf")
    codebook = torch.randn(500, 8, generator=gen)
    codebook[[0, 7, 99]] = float("nan")
    codebook[11, 3], codebook[12, 0] = float("inf"), -float("inf")
    for k in (1, 6, 500):
        dist, idx = ops.knn_codes(z, codebook, k)
        ref_dist, ref_idx = nearest_codes_reference(z, codebook, k)
        assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)


def test_nan_code_is_never_preferred():
    gen = _gen("nan-code")
    codebook = torch.randn(50, 4, generator=gen)
    codebook[[0, 7]] = float("nan")
    z = torch.randn(20, 4, generator=gen)
    dist, idx = ops.knn_codes(z, codebook, 50)
    # The 48 finite codes come first (ascending), then the NaN codes at +inf in index order.
    assert (idx[:, -2:] == torch.tensor([0, 7])).all()
    assert torch.isinf(dist[:, -2:]).all() and torch.isfinite(dist[:, :-2]).all()
    assert (dist[:, 1:] >= dist[:, :-1]).all()


def test_k_up_to_all_codes_is_a_full_sort():
    gen = _gen("full")
    z, codebook = torch.randint(-5, 6, (37, 3), generator=gen).float(), torch.randint(-5, 6, (1000, 3), generator=gen).float()
    dist, idx = ops.knn_codes(z, codebook, 1000)
    ref_dist, ref_idx = nearest_codes_reference(z, codebook, 1000)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)
    assert (idx.sort(1).values == torch.arange(1000)).all()


def test_knn_codes_is_independent_of_threads_and_batch_split():
    gen = _gen("threads")
    z, codebook = torch.randn(3001, 8, generator=gen), torch.randn(4097, 8, generator=gen)
    for k in (1, 100):
        full = ops.knn_codes(z, codebook, k)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            single = ops.knn_codes(z, codebook, k)
        finally:
            torch.set_num_threads(threads)
        split = [ops.knn_codes(z[a:b].contiguous(), codebook, k) for a, b in ((0, 7), (7, 3001))]
        for got in (single, tuple(torch.cat(parts) for parts in zip(*split))):
            assert torch.equal(got[0], full[0]) and torch.equal(got[1], full[1])


# (seed, position_offset, threshold, topk): rate 1, 1/2, 0.8, 0, topk 1 and topk = K.
PERTURB_CASES = [
    (0, 0, 2**32, 100),
    (2**40 + 17, 12345, 2**31, 7),
    (5, 2**33, int(0.8 * 2**32), 2),
    (11, 0, 0, 9),
    (3, 7, 2**32, 1),
    (2**62 + 1, 99, 2**32, 211),
]


@pytest.mark.parametrize("seed,offset,threshold,topk", PERTURB_CASES)
def test_perturb_codes_bit_identical_to_reference(seed, offset, threshold, topk):
    # Integer-valued inputs make every distance exact, so neighbour order cannot depend on rounding and the only
    # things compared are the Philox draw and the selection.
    gen = _gen("perturb", seed)
    z = torch.randint(-8, 9, (513, 6), generator=gen).float()
    codebook = torch.randint(-8, 9, (211, 6), generator=gen).float()
    got = ops.perturb_codes(z, codebook, topk, threshold, seed, offset)
    ref = perturb_codes_reference(z, codebook, topk, threshold, seed, offset)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_codes_equals_knn_codes_at_the_drawn_rank(dtype):
    # Same distance arithmetic as knn_codes, so on arbitrary float data the fused op picks exactly knn[n, rank].
    gen = _gen("fused", dtype)
    z, codebook = torch.randn(1500, 8, generator=gen).to(dtype), torch.randn(4097, 8, generator=gen).to(dtype)
    topk, threshold, seed, offset = 100, 2**31 + 12345, 77, 1000
    idx, pert = ops.perturb_codes(z, codebook, topk, threshold, seed, offset)
    _, knn = ops.knn_codes(z, codebook, topk)
    ranks = ranks_for_threshold(seed, torch.arange(1500) + offset, threshold, topk)
    assert torch.equal(idx, knn[:, 0])
    assert torch.equal(pert, knn.gather(1, ranks[:, None]).squeeze(1))
    # Batch split with position offsets reproduces the whole call.
    head = ops.perturb_codes(z[:600].contiguous(), codebook, topk, threshold, seed, offset)
    tail = ops.perturb_codes(z[600:].contiguous(), codebook, topk, threshold, seed, offset + 600)
    assert torch.equal(torch.cat([head[1], tail[1]]), pert)


def test_perturb_codes_nan_rows_and_empty():
    z = torch.randn(4, 3)
    z[1] = float("nan")
    codebook = torch.randn(10, 3)
    idx, pert = ops.perturb_codes(z, codebook, 5, 2**32, 0, 0)
    ranks = ranks_for_threshold(0, torch.arange(4), 2**32, 5)
    assert idx[1] == 0 and pert[1] == ranks[1]  # a NaN row's candidates are codes 0..4 in order
    idx, pert = ops.perturb_codes(torch.empty(0, 3), codebook, 5, 2**31, 0, 0)
    assert idx.shape == (0,) and pert.shape == (0,) and idx.dtype == torch.int64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k_codes,d", [(0, 3, 4), (1, 1, 1), (1000, 37, 3), (4097, 1000, 257), (3000, 5, 64)])
def test_codebook_lookup_forward_backward(dtype, n, k_codes, d):
    gen = _gen("lookup", n, k_codes, d, dtype)
    idx = torch.randint(0, k_codes, (n,), generator=gen)
    codebook = torch.randn(k_codes, d, generator=gen).to(dtype)
    grad = torch.randn(n, d, generator=gen).to(dtype)
    assert torch.equal(ops.codebook_lookup(idx, codebook), F.embedding(idx, codebook))
    got = ops.codebook_lookup_backward(grad, idx, k_codes)
    assert got.dtype == dtype and got.shape == (k_codes, d)
    exact = torch.zeros(k_codes, d, dtype=torch.float64).index_add_(0, idx, grad.double())
    # fp32 accumulation of up to ~1000 unit-scale rows errs ~1e-5; then one rounding to dtype.
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.double(), exact, atol=tol * max(1.0, exact.abs().max().item()), rtol=tol)
    ref = codebook_lookup_backward_reference(grad, idx, k_codes)
    torch.testing.assert_close(got.float(), ref.float(), atol=2 * tol * max(1.0, exact.abs().max().item()), rtol=2 * tol)


def test_codebook_lookup_backward_is_bit_deterministic_across_threads():
    gen = _gen("det")
    idx = torch.randint(0, 16, (200_000,), generator=gen)  # heavy collisions per code
    grad = torch.randn(200_000, 8, generator=gen)
    runs = [ops.codebook_lookup_backward(grad, idx, 16) for _ in range(3)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs.append(ops.codebook_lookup_backward(grad, idx, 16))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    # Codes nobody uses get an exact zero gradient.
    assert torch.equal(ops.codebook_lookup_backward(grad[:5], torch.zeros(5, dtype=torch.int64), 4)[1:], torch.zeros(3, 8))


def test_built_with_cuda_reports_the_registered_kernels():
    built = ops.built_with_cuda()
    assert isinstance(built, bool)
    for name in ("knn_codes", "perturb_codes", "codebook_lookup", "codebook_lookup_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tokpost_fast::{name}", "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tokpost_fast::{name}", "CUDA") == built


def test_meta_tensors_give_shapes():
    z, codebook = torch.empty(5, 8, device="meta"), torch.empty(7, 8, device="meta")
    dist, idx = ops.knn_codes(z, codebook, 3)
    assert dist.shape == (5, 3) and dist.dtype == torch.float32 and idx.dtype == torch.int64
    assert ops.perturb_codes(z, codebook, 3, 2**31, 1, 0)[1].shape == (5,)
    assert ops.codebook_lookup(torch.empty(4, dtype=torch.int64, device="meta"), codebook).shape == (4, 8)
    assert ops.codebook_lookup_backward(torch.empty(4, 8, device="meta"), torch.empty(4, dtype=torch.int64, device="meta"), 7).shape == (7, 8)


Z, CB = torch.randn(5, 4), torch.randn(7, 4)
IDX = torch.tensor([0, 6, 2])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.knn_codes(Z.double(), CB, 1), "z must be float32"),
        (lambda: ops.knn_codes(Z, CB.long(), 1), "codebook must be float32"),
        (lambda: ops.knn_codes(Z, CB.half(), 1), "same dtype"),
        (lambda: ops.knn_codes(torch.randn(4, 5).T, CB, 1), "z must be contiguous"),
        (lambda: ops.knn_codes(Z, torch.randn(4, 7).T, 1), "codebook must be contiguous"),
        (lambda: ops.knn_codes(torch.randn(5, 3), CB, 1), "z's dim"),
        (lambda: ops.knn_codes(Z, torch.randn(7), 1), "codebook must be 2-D"),
        (lambda: ops.knn_codes(torch.randn(2, 5, 4), CB, 1), "z must be 2-D"),
        (lambda: ops.knn_codes(Z, torch.randn(0, 4), 1), "codebook is empty"),
        (lambda: ops.knn_codes(Z, CB, 8), r"k \(8\) must be <="),
        (lambda: ops.knn_codes(Z, CB, 0), "k must be >= 1"),
        (lambda: ops.perturb_codes(Z, CB, 8, 0, 0, 0), r"topk \(8\) must be <="),
        (lambda: ops.perturb_codes(Z, CB, 2, 2**32 + 1, 0, 0), "threshold"),
        (lambda: ops.perturb_codes(Z, CB, 2, 5, -1, 0), "seed"),
        (lambda: ops.perturb_codes(Z, CB, 2, 5, 0, -1), "position_offset"),
        (lambda: ops.codebook_lookup(IDX.int(), CB), "idx must be int64"),
        (lambda: ops.codebook_lookup(IDX, CB.long()), "codebook must be float32"),
        (lambda: ops.codebook_lookup(torch.tensor([0, 7]), CB), r"idx holds 7"),
        (lambda: ops.codebook_lookup(torch.tensor([-1]), CB), r"idx holds -1"),
        (lambda: ops.codebook_lookup_backward(torch.randn(4, 4), IDX, 7), r"idx must have shape \(grad_out.size\(0\)\)"),
        (lambda: ops.codebook_lookup_backward(torch.randn(3, 4), IDX, 0), "num_codes must be >= 1"),
        (lambda: ops.codebook_lookup_backward(torch.randn(3, 4), IDX, 5), r"idx holds 6"),
        (lambda: ops.codebook_lookup_backward(torch.randn(3, 4).double(), IDX, 7), "grad_out must be float32"),
    ],
)
def test_bad_input_raises_runtime_error_naming_the_argument(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()
