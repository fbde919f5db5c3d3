import pytest
import torch
import torch.nn.functional as F

from tokpost_fast import ops
from tokpost_fast.ops._validate import l2_normalize

from .helpers import ALL_BACKENDS, require_backend


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "triton"])
def test_clean_quantize_matches_nearest_and_losses(backend):
    device = require_backend(backend)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 6, 6, 8, generator=gen).to(device).requires_grad_()
    codebook = torch.randn(100, 8, generator=gen).to(device).requires_grad_()
    out = ops.quantize(z, codebook, backend=backend)
    zn, cn = F.normalize(z, dim=-1), F.normalize(codebook, dim=-1)
    _, idx = ops.nearest_codes(z, codebook, k=1, metric="cosine", backend="reference")
    assert torch.equal(out.indices.cpu(), idx[..., 0].cpu())
    assert torch.equal(out.indices, out.perturbed_indices)
    code = cn[out.indices]
    torch.testing.assert_close(out.z_q, code)
    torch.testing.assert_close(out.codebook_loss, ((code - zn.detach()) ** 2).mean())
    torch.testing.assert_close(out.commit_loss, 0.25 * ((code.detach() - zn) ** 2).mean())
    # Straight-through: d z_q / d z is the Jacobian of the normalisation alone.
    g = torch.randn_like(out.z_q)
    (gz,) = torch.autograd.grad(out.z_q, z, g, retain_graph=True)
    (gz_ref,) = torch.autograd.grad(zn, z, g)
    torch.testing.assert_close(gz, gz_ref)
    # The codebook learns through the codebook loss only.
    (gc,) = torch.autograd.grad(out.codebook_loss, codebook)
    assert gc.abs().sum() > 0


def test_perturbation_applies_to_first_samples_only():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(10, 16, 8, generator=gen)
    codebook = torch.randn(64, 8, generator=gen)
    out = ops.quantize(z, codebook, rate=1.0, topk=32, seed=4, perturb_samples=3)
    changed = out.perturbed_indices != out.indices
    assert changed[:3].any(1).all()
    assert not changed[3:].any()
    # z_q carries the perturbed codes, the losses the clean ones.
    cn = l2_normalize(codebook)
    torch.testing.assert_close(out.z_q, cn[out.perturbed_indices])
    clean = ops.quantize(z, codebook)
    torch.testing.assert_close(out.codebook_loss, clean.codebook_loss)
    # The perturbed head equals the whole-batch perturbation's head (same token positions).
    whole = ops.quantize(z, codebook, rate=1.0, topk=32, seed=4)
    assert torch.equal(whole.perturbed_indices[:3], out.perturbed_indices[:3])


def test_l2_metric_uses_raw_vectors():
    z = torch.randn(50, 4) * 3
    codebook = torch.randn(20, 4) * 3
    out = ops.quantize(z, codebook, metric="l2")
    torch.testing.assert_close(out.z_q, codebook[out.indices])


def test_bf16_latent_with_fp32_codebook():
    z = torch.randn(2, 9, 8).bfloat16().requires_grad_()
    codebook = torch.randn(33, 8, requires_grad=True)
    out = ops.quantize(z, codebook, rate=0.5, topk=4, seed=0)
    assert out.z_q.dtype == torch.bfloat16
    (out.z_q.float().sum() + out.codebook_loss.float()).backward()
    assert codebook.grad is not None and z.grad is not None
