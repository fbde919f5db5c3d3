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
