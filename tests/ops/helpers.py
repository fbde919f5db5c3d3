"""Shared test utilities for the ops: backend selection and the tie-aware check."""

from __future__ import annotations

import pytest
import torch

from tokpost_fast import ops

# Every backend that can run on this machine must run: a missing CPU extension or Triton is a failure, not a skip.
ALL_BACKENDS = ["reference", "cpu", "triton", "cuda"]


def device_for(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def require_backend(backend: str) -> torch.device:
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("the cuda backend needs a CUDA GPU (its code is compiled in CI but cannot run here)")
    device = device_for(backend)
    assert ops.available_backends(device)[backend], f"backend {backend!r} should be available on {device}"
    return device


def interpreted(backend: str) -> bool:
    return backend == "triton" and not torch.cuda.is_available()


def true_distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Exact squared L2 distances in fp64 of the values the kernel saw; [N, K]."""
    return torch.cdist(z.double(), codebook.double()).pow(2)


def assert_knn_tie_aware(z, codebook, dist, idx, k, atol_scale=1e-4):
    """The returned codes' true distances equal the k smallest true distances within fp32 accumulation error.

    fp32 accumulation of ||z||^2 - 2 z.c + ||c||^2 errs by ~eps32 * (||z||^2 + ||c||^2) per term; 1e-4 of that scale
    leaves ~100x headroom yet is far below the gap between distinct random codes.
    """
    n = z.shape[0]
    assert dist.shape == (n, k) and idx.shape == (n, k)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64
    if n == 0:
        return
    true = true_distances(z, codebook)
    scale = (z.double().pow(2).sum(1, keepdim=True) + codebook.double().pow(2).sum(1).max()).clamp_min(1.0)
    tol = atol_scale * scale
    assert int(idx.min()) >= 0 and int(idx.max()) < codebook.shape[0]
    # Distinct codes per row.
    assert (idx.sort(1).values.diff(dim=1) != 0).all()
    chosen = true.gather(1, idx.cpu())
    best = true.topk(k, dim=1, largest=False).values
    assert (chosen - best).abs().le(tol).all(), f"max excess {(chosen - best).abs().max().item()}"
    assert (dist.double().cpu() - chosen).abs().le(tol).all(), "returned dist differs from the true distance"
    # Ascending order (ties within rounding allowed).
    assert (dist[:, 1:] >= dist[:, :-1] - tol.float()).all()


def near_tie_clusters(n: int, num_codes: int, dim: int, seed: int, clusters: int = 64, spread: float = 1e-3):
    """fp32 (z [n, dim], codebook [num_codes, dim]): codes in tight clusters around random centres, tokens inside
    the clusters. A token's distances to its cluster's codes are ~dim * spread^2 and differ by about as much as the
    expanded form ||z||^2 - 2 z.c + ||c||^2 errs in fp32 (~dim * 2**-24 * ||z||^2): the case it gets wrong."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=gen, dtype=torch.float64)
    code_cluster = torch.arange(num_codes) % clusters
    codebook = centres[code_cluster] + spread * torch.randn(num_codes, dim, generator=gen, dtype=torch.float64)
    token_cluster = torch.randint(0, clusters, (n,), generator=gen)
    z = centres[token_cluster] + spread * torch.randn(n, dim, generator=gen, dtype=torch.float64)
    return z.float(), codebook.float()


def true_nearest_violations(z: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor) -> int:
    """How many tokens did not get the float64 nearest code of the fp32 values (idx [n]).

    A token counts as right also when its code's float64 distance is within the fp32 rounding of the difference
    form itself ((D + 3) 2**-24 relative, doubled): there the exact contract's fp32 order may legitimately differ
    from float64's (no such token occurs on the seeds the tests use, but the check should not depend on luck)."""
    true = true_distances(z, codebook)
    best = true.min(1).values
    chosen = true.gather(1, idx.reshape(-1, 1).cpu()).squeeze(1)
    slack = 2 * (z.shape[1] + 3) * 2.0**-24 * best
    return int((chosen > best + slack).sum())
