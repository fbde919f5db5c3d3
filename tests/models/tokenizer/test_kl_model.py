"""KLTokenizer (docs/INTERFACES.md, "Continuous tokenizer"): shapes, the diagonal-Gaussian posterior and its KL,
the Gaussian latent perturbation (our continuous analogue of METHOD.md A2), config checks and the checkpoint round
trip. Random behaviour is checked with fixed seeds and 5-sigma bounds."""

import math

import pytest
import torch

from tokpost_fast.models.tokenizer import (KLOutput, KLTokenizer, TokenizerConfig, VQTokenizer, build_tokenizer,
                                           estimate_scaling_factor, gaussian_kl, gaussian_perturb, load_tokenizer,
                                           save_tokenizer, tokenizer_config)
from tokpost_fast.perturb import perturbed_count, step_seed

# 32x32 -> 8x8 x 3 latents, 8 groups: builds and runs in milliseconds
TINY = dict(arch="kl_cnn", image_size=32, block_out_channels=[8, 16, 16], layers_per_block=1, latent_channels=3,
            norm_num_groups=8)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_tokenizer(TokenizerConfig(**TINY)).eval()


def test_shapes_and_sizes(tiny):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, logvar = tiny.encode_posterior(x)
    assert mean.shape == logvar.shape == (2, 3, 8, 8)
    assert torch.equal(tiny.encode_latent(x), mean)
    assert tiny.decode(mean).shape == (2, 3, 32, 32)
    recon, out = tiny(x)
    assert isinstance(out, KLOutput) and recon.shape == (2, 3, 32, 32) and out.z.shape == (2, 3, 8, 8)
    assert out.kl_loss.shape == ()
    assert (tiny.grid_size, tiny.latent_channels, tiny.scaling_factor) == (8, 3, 0.18215)
    assert tiny.last_layer() is tiny.decoder.conv_out.weight
    assert list(tiny.codebook_parameters()) == []
    n_enc = sum(p.numel() for p in tiny.encoder_parameters())
    n_dec = sum(p.numel() for p in tiny.decoder_parameters())
    assert n_enc + n_dec == sum(p.numel() for p in tiny.parameters())


def test_presets_and_continuity_flags():
    demo = tokenizer_config("demo_kl")
    assert (demo.grid_size, demo.latent_channels, demo.image_size, demo.scaling_factor) == (16, 4, 64, None)
    assert build_tokenizer(demo).scaling_factor == 1.0          # not measured yet (main training sets it)
    assert KLTokenizer.is_continuous is True and VQTokenizer.is_continuous is False
    assert build_tokenizer(tokenizer_config("demo_cnn")).is_continuous is False
    sd = tokenizer_config("sdvae")
    assert (sd.block_out_channels, sd.layers_per_block, sd.grid_size) == ([128, 256, 512, 512], 2, 32)
    sd.block_out_channels.append(1)                              # presets hand out copies
    assert tokenizer_config("sdvae").block_out_channels == [128, 256, 512, 512]


@pytest.mark.parametrize("overrides, field", [
    (dict(block_out_channels=[8, 12]), "block_out_channels"),       # 12 is no multiple of 8 groups
    (dict(block_out_channels=[]), "block_out_channels"),
    (dict(image_size=30), "image_size"),                             # not a multiple of 4
    (dict(layers_per_block=0), "layers_per_block"),
    (dict(latent_channels=0), "latent_channels"),
    (dict(norm_num_groups=0), "norm_num_groups"),
    (dict(scaling_factor=0.0), "scaling_factor"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"TokenizerConfig.{field}="):
        TokenizerConfig(**{**TINY, **overrides})


def test_dinov2_weights_are_refused_for_kl():
    with pytest.raises(ValueError, match="dinov2_weights"):
        build_tokenizer(TokenizerConfig(**TINY, dinov2_weights="/nonexistent.pth"))


# --- posterior and KL -------------------------------------------------------------------------------------------
def test_gaussian_kl_matches_a_hand_computation():
    # KL(N(m, s^2) || N(0, 1)) = 0.5 * (m^2 + s^2 - 1 - ln s^2) per element:
    #   m=0, s=1 -> 0;  m=1, s=1 -> 0.5;  m=0, s^2=e -> 0.5 * (e - 2);  m=-2, s^2=e^-2 -> 0.5 * (4 + e^-2 - 1 + 2)
    mean = torch.tensor([0.0, 1.0, 0.0, -2.0]).view(1, 4, 1, 1)
    logvar = torch.tensor([0.0, 0.0, 1.0, -2.0]).view(1, 4, 1, 1)
    per_element = [0.0, 0.5, 0.5 * (math.e - 2), 0.5 * (5 + math.exp(-2))]
    assert gaussian_kl(mean, logvar).item() == pytest.approx(sum(per_element) / 4, rel=1e-6)


def test_forward_kl_and_posterior_sample_follow_the_clamped_posterior(tiny):
    # push the logvar channels far out of range through quant_conv's bias: the clamp to [-30, 20] must apply
    model = build_tokenizer(TokenizerConfig(**TINY)).eval()
    with torch.no_grad():
        model.quant_conv.bias[3:] += torch.tensor([-100.0, 100.0, 0.0])
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    mean, logvar = model.encode_posterior(x)
    assert logvar[:, 0].eq(-30).all() and logvar[:, 1].eq(20).all() and logvar[:, 2].abs().lt(20).all()
    _, out = model(x, sample_posterior=False)
    assert torch.equal(out.z, mean)
    expected = 0.5 * (mean.double() ** 2 + logvar.double().exp() - 1 - logvar.double()).mean()
    assert out.kl_loss.item() == pytest.approx(expected.item(), rel=1e-5)

    # z = mean + exp(logvar / 2) * eps with the clamped logvar: standardised residuals ~ N(0, 1) on the in-range
    # channel and on the one clamped to 20 (unclamped, its residuals would be e^40 times too large)
    torch.manual_seed(5)
    draws = torch.stack([model(x)[1].z for _ in range(40)])                       # [40, 3, 3, 8, 8]
    for channel in (1, 2):
        eps = (draws[:, :, channel] - mean[:, channel]).double() / torch.exp(0.5 * logvar[:, channel]).double()
        n = eps.numel()                                                            # 7680
        assert abs(eps.mean().item()) < 5 / math.sqrt(n), channel
        assert abs(eps.var().item() - 1) < 5 * math.sqrt(2 / n), channel


# --- Gaussian latent perturbation -------------------------------------------------------------------------------
@pytest.mark.parametrize("samples", [0, 1, 3, 8])
def test_perturbation_touches_exactly_the_first_samples(samples):
    z = torch.randn(8, 4, 6, 6) * torch.linspace(0.5, 4, 8).view(8, 1, 1, 1)
    out = gaussian_perturb(z, 0.5, samples, seed=11)
    changed = (out != z).flatten(1).any(dim=1)
    assert changed.tolist() == [True] * samples + [False] * (8 - samples)
    assert torch.equal(out[samples:], z[samples:])                                 # bit for bit


def test_perturbation_is_seeded_and_scaled_by_each_samples_std():
    z = torch.randn(16, 4, 16, 16) * torch.linspace(0.1, 10, 16).view(16, 1, 1, 1) + 3.0
    a = gaussian_perturb(z, 0.3, 12, seed=123)
    assert torch.equal(a, gaussian_perturb(z, 0.3, 12, seed=123))
    assert not torch.equal(a[:12], gaussian_perturb(z, 0.3, 12, seed=124)[:12])
    # (z' - z) / (noise * std(z_b)) ~ N(0, 1) i.i.d. for every perturbed sample, whatever its scale
    std = z[:12].flatten(1).std(dim=1).view(12, 1, 1, 1)
    eps = (a[:12] - z[:12]) / (0.3 * std)                                          # [12, 4, 16, 16]
    per_sample = eps.flatten(1)
    n = per_sample.shape[1]                                                         # 1024 per sample
    assert (per_sample.mean(dim=1).abs() < 5 / math.sqrt(n)).all()
    assert ((per_sample.var(dim=1) - 1).abs() < 5 * math.sqrt(2 / n)).all()
    # the noise of one sample does not depend on the others (a row's draw is its own)
    assert torch.equal(gaussian_perturb(z[:4], 0.3, 4, seed=123), a[:4])


def test_perturbation_gradient_is_the_identity():
    """The scale is detached: the perturbed latent passes gradients straight to z (no way to learn to shrink the
    noise through its scale)."""
    z = torch.randn(4, 3, 5, 5, requires_grad=True)
    gaussian_perturb(z, 0.7, 2, seed=0).sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_perturbation_arguments():
    z = torch.randn(2, 3, 4, 4)
    assert gaussian_perturb(z, 0.0, 2, seed=0) is z
    with pytest.raises(ValueError, match="noise"):
        gaussian_perturb(z, -1.0, 2, seed=0)


@pytest.mark.parametrize("batch, beta", [(8, 0.25), (7, 0.5), (4, 1.0), (5, 0.1), (10, 0.3)])
def test_forward_perturbs_the_sampled_latent_of_the_first_floor_b_beta_rows(tiny, batch, beta):
    n = perturbed_count(batch, beta)
    x = torch.rand(batch, 3, 32, 32) * 2 - 1
    torch.manual_seed(1)
    _, clean = tiny(x)
    torch.manual_seed(1)                                           # the same posterior draw
    recon, noisy = tiny(x, perturb_noise=0.5, perturb_samples=n, seed=step_seed(0, 7, 0))
    changed = (noisy.z != clean.z).flatten(1).any(dim=1)
    assert changed.tolist() == [True] * n + [False] * (batch - n)
    assert torch.equal(noisy.z, gaussian_perturb(clean.z, 0.5, n, seed=step_seed(0, 7, 0)))
    assert torch.equal(noisy.kl_loss, clean.kl_loss)                               # KL of the clean posterior
    torch.testing.assert_close(recon, tiny.decode(noisy.z))                         # the decoder saw the perturbed z


# --- files ------------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path, tiny):
    path = tmp_path / "kl.pt"
    save_tokenizer(tiny, str(path), extra={"step": 3})
    again = load_tokenizer(str(path))
    assert isinstance(again, KLTokenizer) and again.config == tiny.config
    assert all(torch.equal(again.state_dict()[k], v) for k, v in tiny.state_dict().items())
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["config"]["arch"] == "kl_cnn" and ckpt["step"] == 3


def test_estimate_scaling_factor_is_one_over_the_latent_std(tiny):
    images = torch.rand(10, 3, 32, 32) * 2 - 1
    expected = 1 / tiny.encode_latent(images).double().std().item()
    assert estimate_scaling_factor(tiny, images, batch_size=3) == pytest.approx(expected, rel=1e-5)
