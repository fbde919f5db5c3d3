"""The A2 operator: statistics with seeds and 5-sigma bounds, determinism, cross-backend identity."""

import math

import pytest
import torch

from tokpost_fast import ops
from tokpost_fast.ops.philox import perturb_ranks, philox4x32, rate_threshold

from .helpers import ALL_BACKENDS, interpreted, require_backend


def test_philox_known_answers():
    # Random123's kat_vectors for philox4x32_10.
    assert [int(x) for x in philox4x32(0, 0, 0, 0, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = 0xFFFFFFFF
    assert [int(x) for x in philox4x32(ones, ones, ones, ones, ones, ones)] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    pi = philox4x32(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0)
    assert [int(x) for x in pi] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_rate_threshold_corners():
    assert rate_threshold(0.0) == 0
    assert rate_threshold(1.0) == 2**32
    assert rate_threshold(0.5) == 2**31


def _within_5_sigma(count, n, p):
    sigma = math.sqrt(n * p * (1 - p)) if 0 < p < 1 else 0.0
    return abs(count - n * p) <= 5 * sigma + 1e-9


@pytest.mark.parametrize("rate,topk", [(1.0, 100), (0.5, 7), (0.1, 2), (0.3, 13)])
def test_rank_distribution(rate, topk):
    n = 200_000
    ranks = perturb_ranks(seed=1234, positions=torch.arange(n), rate=rate, topk=topk)
    counts = torch.bincount(ranks, minlength=topk)
    assert counts.numel() == topk
    # P(rank 0) = 1 - rate + rate / topk; P(rank j > 0) = rate / topk.
    assert _within_5_sigma(int(counts[0]), n, 1 - rate + rate / topk)
    for j in range(1, topk):
        assert _within_5_sigma(int(counts[j]), n, rate / topk), (j, int(counts[j]))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("rate,topk", [(1.0, 10), (0.4, 5), (0.25, 2)])
def test_changed_fraction_and_membership(backend, rate, topk):
    device = require_backend(backend)
    n = 3000 if interpreted(backend) else 40_000
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(n, 8, generator=gen).to(device)
    codebook = torch.randn(300, 8, generator=gen).to(device)
    idx, pert = ops.perturb_codes(z, codebook, rate, topk, seed=99, backend=backend)
    # The same backend's own top-k: near-ties may order differently from the reference on random data.
    _, knn = ops.nearest_codes(z, codebook, k=topk, backend=backend)
    idx, pert, knn = idx.cpu(), pert.cpu(), knn.cpu()
    assert torch.equal(idx, knn[:, 0])
    member = (knn == pert[:, None]).any(1)
    assert member.all(), "a perturbed code is outside the token's top-k"
    changed = int((pert != idx).sum())
    assert _within_5_sigma(changed, n, rate * (topk - 1) / topk), changed


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bit_identical_to_reference_on_exact_inputs(backend):
    # Integer-valued inputs make every distance exact in fp32, so neighbour order cannot depend on rounding and the
    # only thing compared is the random draw and the selection.
    device = require_backend(backend)
    gen = torch.Generator().manual_seed(3)
    z = torch.randint(-8, 9, (513, 6), generator=gen).float()
    codebook = torch.randint(-8, 9, (211, 6), generator=gen).float()
    for seed, offset, rate, topk in [(0, 0, 1.0, 100), (2**40 + 17, 12345, 0.5, 7), (5, 2**33, 0.8, 2), (11, 0, 0.0, 9)]:
        ref = ops.perturb_codes(z, codebook, rate, topk, seed=seed, backend="reference", position_offset=offset)
        got = ops.perturb_codes(z.to(device), codebook.to(device), rate, topk, seed=seed, backend=backend, position_offset=offset)
        assert torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[1].cpu(), ref[1]), (seed, offset, rate, topk)


def test_seed_determinism_and_sensitivity():
    z = torch.randn(2000, 8)
    codebook = torch.randn(128, 8)
    a = ops.perturb_codes(z, codebook, 1.0, 16, seed=5)
    b = ops.perturb_codes(z, codebook, 1.0, 16, seed=5)
    c = ops.perturb_codes(z, codebook, 1.0, 16, seed=6)
    assert torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_batch_split_invariance(backend):
    require_backend(backend)
    z = torch.randn(4, 9, 8)  # 36 tokens
    codebook = torch.randn(64, 8)
    _, whole = ops.perturb_codes(z, codebook, 1.0, 8, seed=21, backend=backend)
    _, head = ops.perturb_codes(z[:1], codebook, 1.0, 8, seed=21, backend=backend)
    _, tail = ops.perturb_codes(z[1:], codebook, 1.0, 8, seed=21, backend=backend, position_offset=9)
    assert torch.equal(torch.cat([head, tail]), whole)


def test_rate_zero_and_topk_one_are_identity():
    z = torch.randn(500, 4)
    codebook = torch.randn(50, 4)
    for rate, topk in [(0.0, 10), (1.0, 1)]:
        idx, pert = ops.perturb_codes(z, codebook, rate, topk, seed=1)
        assert torch.equal(idx, pert)
