import zlib

import pytest
import torch
import torch.nn.functional as F

from tokpost_fast import ops

from .helpers import ALL_BACKENDS, require_backend


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "triton"])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
@pytest.mark.parametrize("n,k_codes,d", [(0, 3, 4), (1, 1, 1), (1000, 37, 3), (4097, 1000, 257), (3000, 5, 64)])
def test_forward_backward_match_embedding(backend, dtype, atol, n, k_codes, d):
    device = require_backend(backend)
    gen = torch.Generator().manual_seed(n + k_codes + d)
    idx = torch.randint(0, k_codes, (n,), generator=gen).to(device)
    codebook = torch.randn(k_codes, d, generator=gen).to(dtype).to(device).requires_grad_()
    grad = torch.randn(n, d, generator=gen).to(dtype).to(device)
    out = ops.codebook_lookup(idx, codebook, backend=backend)
    expected = F.embedding(idx, codebook)
    assert torch.equal(out, expected)
    (got_grad,) = torch.autograd.grad(out, codebook, grad)
    # fp64 ground truth; the kernel accumulates in fp32 (sums of up to ~1000 unit-scale rows: error ~1e-5) and
    # rounds once to dtype.
    cb64 = codebook.detach().double().requires_grad_()
    (ref_grad,) = torch.autograd.grad(F.embedding(idx, cb64), cb64, grad.double())
    assert got_grad.dtype == dtype
    torch.testing.assert_close(got_grad.double(), ref_grad, atol=atol, rtol=atol)


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b not in ("triton", "reference")])
def test_backward_is_bit_deterministic(backend):
    device = require_backend(backend)
    idx = torch.randint(0, 16, (200_000,)).to(device)  # heavy collisions per code
    codebook = torch.randn(16, 8, device=device, requires_grad=True)
    grad = torch.randn(200_000, 8, device=device)
    grads = [torch.autograd.grad(ops.codebook_lookup(idx, codebook, backend=backend), codebook, grad)[0] for _ in range(3)]
    assert all(torch.equal(grads[0], g) for g in grads[1:])
    if device.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one_thread = torch.autograd.grad(ops.codebook_lookup(idx, codebook, backend=backend), codebook, grad)[0]
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(grads[0], one_thread)


def test_leading_dims_and_int32():
    codebook = torch.randn(10, 3)
    idx = torch.randint(0, 10, (2, 4, 5), dtype=torch.int32)
    out = ops.codebook_lookup(idx, codebook)
    assert out.shape == (2, 4, 5, 3)
    assert torch.equal(out, codebook[idx.long()])


CHUNK_ROWS = 256  # csrc/common.h kLookupChunkRows


def chunked_backward_order(grad: torch.Tensor, idx: torch.Tensor, num_codes: int) -> torch.Tensor:
    """The fused backward's summation order, emulated with fp32 torch ops: each code's rows (in row order) cut into
    256-row chunks, each chunk summed in row order, then the chunk sums in chunk order, one rounding to the dtype.
    Zero padding is exact here: the running sums start at +0 and are never -0."""
    n, d = grad.shape
    order = torch.sort(idx, stable=True).indices
    codes = idx[order]
    counts = torch.bincount(idx, minlength=num_codes)
    pos = torch.arange(n) - (torch.cumsum(counts, 0) - counts)[codes]
    chunks = (counts + CHUNK_ROWS - 1) // CHUNK_ROWS
    chunk_id = (torch.cumsum(chunks, 0) - chunks)[codes] + pos // CHUNK_ROWS
    rows = torch.zeros(int(chunks.sum()), CHUNK_ROWS, d)
    rows[chunk_id, pos % CHUNK_ROWS] = grad[order].float()
    partial = torch.zeros(rows.shape[0], d)
    for j in range(CHUNK_ROWS):
        partial = partial + rows[:, j]
    per_code = torch.zeros(num_codes, max(1, int(chunks.max())), d)
    chunk_code = torch.repeat_interleave(torch.arange(num_codes), chunks)
    per_code[chunk_code, torch.arange(rows.shape[0]) - (torch.cumsum(chunks, 0) - chunks)[chunk_code]] = partial
    out = torch.zeros(num_codes, d)
    for m in range(per_code.shape[1]):
        out = out + per_code[:, m]
    return out.to(grad.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["collapsed", "hot-code", "uniform"])
def test_cpu_backward_is_the_chunked_order_and_handles_collapse(dtype, case):
    # The kernel's order is pinned bit for bit (the CUDA kernel uses the same one); a collapsed codebook (every
    # token on one code, a real VQ failure mode) is summed in parallel chunks and still matches fp64 closely.
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    n, k_codes, d = 65536, 1000, 8
    idx = {"collapsed": torch.full((n,), 17),
           "hot-code": torch.where(torch.rand(n, generator=gen) < 0.7, 3, torch.randint(0, k_codes, (n,), generator=gen)),
           "uniform": torch.randint(0, k_codes, (n,), generator=gen)}[case]
    grad = torch.randn(n, d, generator=gen).to(dtype)
    got = torch.ops.tokpost_fast.codebook_lookup_backward(grad, idx, k_codes)
    assert torch.equal(got, chunked_backward_order(grad, idx, k_codes))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(torch.ops.tokpost_fast.codebook_lookup_backward(grad, idx, k_codes), got)
    finally:
        torch.set_num_threads(threads)
    exact = torch.zeros(k_codes, d, dtype=torch.float64).index_add_(0, idx, grad.double())
    # fp32 sums of up to 65536 unit-scale rows (|sum| ~ 256) err ~1e-4 in chunks of 256; then one dtype rounding.
    tol = {torch.float32: 1e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.double(), exact, atol=tol * max(1.0, exact.abs().max().item()), rtol=tol)


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "triton"])
def test_collapsed_codebook_gradient_through_the_op(backend):
    device = require_backend(backend)
    gen = torch.Generator().manual_seed(7)
    idx = torch.full((65536,), 5).to(device)
    codebook = torch.randn(64, 8, generator=gen).to(device).requires_grad_()
    grad = torch.randn(65536, 8, generator=gen).to(device)
    (got,) = torch.autograd.grad(ops.codebook_lookup(idx, codebook, backend=backend), codebook, grad)
    expected = torch.zeros(64, 8, dtype=torch.float64, device=device)
    expected[5] = grad.double().sum(0)
    torch.testing.assert_close(got.double(), expected, atol=1e-3, rtol=1e-3)
