"""GAN side of the tokenizer loss: hinge losses, adaptive weight, DiffAugment, LeCam, the functional
discriminator, and TokenizerLoss's two steps."""

import math

import pytest
import torch
from torch.func import functional_call

from tokpost_fast.checks import build_section
from tokpost_fast.losses import (DiffAugment, LeCamEMA, LossConfig, TokenizerLoss, adaptive_gan_weight, hinge_d_loss,
                                 hinge_g_loss)
from tokpost_fast.models.tokenizer import TokenizerConfig, build_discriminator, build_tokenizer


def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, 0.5, 2] -> mean 2.5/3; relu(1 + fake) = [0, 1, 2.5] -> mean 3.5/3
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3))
    assert hinge_g_loss(fake).item() == pytest.approx(-(-0.5) / 3)


def test_adaptive_weight_by_hand():
    # recon = W @ x with W the "last layer": d/dW of sum(a * recon) = outer(a, x)
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(3)
    recon = w @ x
    a, b = torch.randn(4), torch.randn(4)
    rec_loss, g_loss = (a * recon).sum(), (b * recon).sum()
    expected = torch.outer(a, x).norm() / (torch.outer(b, x).norm() + 1e-4)
    weight = adaptive_gan_weight(rec_loss, g_loss, w)
    assert not weight.requires_grad
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5)
    # the clamp: a vanishing GAN gradient gives 1e4, not inf
    recon = w @ x
    assert adaptive_gan_weight((a * recon).sum() * 1e6, (0 * recon).sum(), w).item() == 1e4


def test_diffaugment_shapes_ranges_and_gradient():
    x = (torch.rand(16, 3, 32, 32) * 2 - 1).requires_grad_()
    gen = torch.Generator().manual_seed(0)
    geometric = DiffAugment("translation,cutout")(x, generator=gen)
    assert geometric.shape == x.shape
    # translation and cutout only move pixels or zero them: values stay in the input's range
    assert geometric.min() >= -1 and geometric.max() <= 1
    full = DiffAugment()(x, generator=gen)
    assert full.shape == x.shape and torch.isfinite(full).all()
    full.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_diffaugment_cutout_area_and_translation_fill():
    ones = torch.ones(64, 3, 40, 40)
    gen = torch.Generator().manual_seed(1)
    cut = DiffAugment("cutout", cutout=0.2)(ones, generator=gen)
    zero_frac = (cut[:, 0] == 0).float().mean(dim=(1, 2))
    assert (zero_frac > 0).all() and (zero_frac <= 0.2 * 0.2 + 1e-6).all()   # an 8x8 square, clipped at edges
    shifted = DiffAugment("translation", translation=0.125)(ones, generator=gen)
    zeros = (shifted[:, 0] == 0)
    rows_zero, cols_zero = zeros.all(dim=2).sum(dim=1), zeros.all(dim=1).sum(dim=1)
    assert rows_zero.max() <= 5 and cols_zero.max() <= 5                       # shift <= round(40 / 8) = 5
    assert (rows_zero + cols_zero).sum() > 0
    assert torch.equal(shifted[:, 0], shifted[:, 1])                            # same shift for all channels


def test_lecam_by_hand():
    lecam = LeCamEMA(decay=0.9)
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.0])
    lecam.update(real, fake)
    assert lecam.logits_real_ema.item() == pytest.approx(0.1 * 2.0)
    assert lecam.logits_fake_ema.item() == pytest.approx(0.1 * -1.0)
    # relu(real - (-0.1))^2 = [1.21, 9.61]; relu(0.2 - fake)^2 = [4.84, 0.04]
    assert lecam.regularizer(real, fake).item() == pytest.approx((1.21 + 9.61) / 2 + (4.84 + 0.04) / 2, rel=1e-5)
    assert set(lecam.state_dict()) == {"logits_real_ema", "logits_fake_ema"}


def test_discriminator_is_functional():
    torch.manual_seed(0)
    disc = build_discriminator(16, 2)
    before = {k: v.clone() for k, v in disc.state_dict().items()}
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    params = {k: v.detach() for k, v in disc.named_parameters()}
    logits = functional_call(disc, {**params, **dict(disc.named_buffers())}, (x,))
    logits.mean().backward()
    assert x.grad is not None and all(p.grad is None for p in disc.parameters())
    disc.train()(x)
    disc.eval()(x)
    assert all(torch.equal(before[k], v) for k, v in disc.state_dict().items())  # no running-stat updates


TOK = TokenizerConfig(arch="vit", image_size=16, codebook_size=32, codebook_embed_dim=8, width=32, depth=1, heads=2,
                      patch_size=4, num_latent_tokens=16)


def test_tokenizer_loss_generator_and_discriminator_steps():
    torch.manual_seed(0)
    model, disc = build_tokenizer(TOK), build_discriminator(16, 2)
    loss = TokenizerLoss(LossConfig(disc_start=5))
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    rec, q = model(x)
    params = {k: v.detach() for k, v in disc.named_parameters()}

    def frozen_disc(img):
        return functional_call(disc, {**params, **dict(disc.named_buffers())}, (img,))

    # before disc_start: no GAN term, and the total is rec + codebook + 0.25 commit
    total, logs = loss.generator_loss(x, rec, step=4, q=q, discriminator=frozen_disc, last_layer=model.last_layer())
    assert "gan_loss" not in logs and not loss.gan_active(4)
    expected = logs["rec_loss"] + logs["codebook_loss"] + 0.25 * logs["commit_loss"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    d_total, d_logs = loss.discriminator_loss(x, rec, step=4, discriminator=disc)
    assert d_total.item() == 0 and not d_total.requires_grad

    # from disc_start on: GAN term with the adaptive weight
    total, logs = loss.generator_loss(x, rec, step=5, q=q, discriminator=frozen_disc, last_layer=model.last_layer())
    expected = expected + logs["gan_adaptive_weight"] * 0.5 * logs["gan_loss"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    total.backward()
    assert all(p.grad is None for p in disc.parameters())
    assert model.last_layer().grad is not None

    d_total, d_logs = loss.discriminator_loss(x, rec, step=5, discriminator=disc)
    assert d_total.item() == pytest.approx(0.5 * (d_logs["disc_hinge"] + 0.001 * d_logs["lecam_reg"]).item(), rel=1e-5)
    d_total.backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert loss.lecam.logits_real_ema.item() == pytest.approx(1e-3 * d_logs["logits_real"].item(), abs=1e-7)
    with pytest.raises(ValueError, match="discriminator"):
        loss.generator_loss(x, rec.detach(), step=5, q=None)


def test_loss_config_checks():
    with pytest.raises(ValueError, match="diffaug_policy"):
        LossConfig(diffaug_policy="translation,zoom")
    with pytest.raises(ValueError, match="loss: unknown key 'gan_weight'; did you mean adaptive_gan_weight"):
        build_section(LossConfig, {"gan": 0.5, "gan_weight": 1}, "loss")
    assert not math.isnan(LossConfig().lecam)
