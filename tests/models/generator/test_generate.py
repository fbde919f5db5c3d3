"""models/generator/generate.py, the one sample-and-decode path, against the per-kind code each caller (sample CLI,
gen stage grids, gFID) used to write out: same draws from the same seed, same images, in chunks of any size; and
tokpost_fast.models.is_continuous, the one way to tell a continuous model (or tokenizer config) from a VQ one."""

import pytest
import torch

from tests.models.generator.helpers import random_generator
from tokpost_fast.models import is_continuous
from tokpost_fast.models.generator import (DiTConfig, DiTSampling, SamplingSettings, build_generator, sample,
                                           sample_dit, sample_images)
from tokpost_fast.models.tokenizer import TokenizerConfig, build_tokenizer


def tiny_vq():
    torch.manual_seed(0)     # 16x16 images -> 4x4 grids of K = 64 codes, the tiny generator's vocabulary
    return build_tokenizer(TokenizerConfig(arch="vq_cnn", image_size=16, codebook_size=64, codebook_embed_dim=4,
                                           ch=32, ch_mult=[1, 1, 1], z_channels=8)).eval()


def tiny_pair_continuous():
    torch.manual_seed(0)
    tokenizer = build_tokenizer(TokenizerConfig(arch="kl_cnn", image_size=16, block_out_channels=[16, 32],
                                                layers_per_block=1, latent_channels=4, norm_num_groups=8,
                                                scaling_factor=0.37)).eval()
    dit = build_generator(DiTConfig(latent_channels=4, grid_size=8, patch_size=2, width=32, depth=1, heads=2,
                                    num_classes=3, attn_backend="sdpa")).eval()
    return tokenizer, dit


@pytest.mark.parametrize("batch_size", [2, 3, 64])
def test_ar_samples_decode_as_written_out(batch_size):
    gpt, tokenizer = random_generator(seed=3), tiny_vq()
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    settings = SamplingSettings(cfg_scale=2.0, cfg_power=1.5, temperature=0.9, top_k=20, top_p=0.95)
    got = sample_images(gpt, tokenizer, labels, settings, torch.Generator().manual_seed(7), batch_size)
    rng, expected = torch.Generator().manual_seed(7), []
    for chunk in labels.split(batch_size):
        tokens = sample(gpt, chunk, cfg_scale=2.0, cfg_power=1.5, temperature=0.9, top_k=20, top_p=0.95,
                        generator=rng)
        expected.append(tokenizer.decode_codes(tokens.view(-1, 4, 4)).float().clamp(-1, 1))
    assert got.shape == (7, 3, 16, 16) and torch.equal(got, torch.cat(expected))


def test_dit_samples_decode_as_written_out():
    tokenizer, dit = tiny_pair_continuous()
    labels = torch.tensor([2, 0, 1, 1, 2])
    sampling = DiTSampling(cfg_scale=1.5, steps=3)
    got = sample_images(dit, tokenizer, labels, sampling, torch.Generator().manual_seed(4), 2)
    rng, expected = torch.Generator().manual_seed(4), []
    for chunk in labels.split(2):
        latents = sample_dit(dit, chunk, steps=3, cfg_scale=1.5, generator=rng) / tokenizer.scaling_factor
        expected.append(tokenizer.decode(latents).float().clamp(-1, 1))
    assert torch.equal(got, torch.cat(expected))


def test_settings_of_the_other_kind_are_refused():
    tokenizer, dit = tiny_pair_continuous()
    with pytest.raises(ValueError, match="samples with DiTSampling"):
        sample_images(dit, tokenizer, torch.tensor([0]), SamplingSettings())


def test_is_continuous_for_models_and_tokenizer_configs():
    tokenizer, dit = tiny_pair_continuous()
    assert is_continuous(tokenizer) and is_continuous(dit) and is_continuous(tokenizer.config)
    assert not is_continuous(tiny_vq()) and not is_continuous(random_generator())
    assert not is_continuous(TokenizerConfig(arch="vit")) and not is_continuous(TokenizerConfig(arch="vq_cnn"))
    wrapped = torch.nn.Module()
    wrapped.module = dit                              # a DDP / DeepSpeed wrapper is looked through
    assert is_continuous(wrapped) and not is_continuous(object())
