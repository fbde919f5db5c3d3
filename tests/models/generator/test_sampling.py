"""Sampling: CFG schedule, top-k / top-p support, inverse-CDF correctness, KV cache vs recompute, and the
teacher-forced post-training sampler (METHOD.md A5.1). Random behaviour is checked with fixed seeds and 5-sigma
bounds."""

import math

import pytest
import torch

from tokpost_fast.models.generator import (
    cfg_schedule,
    draw_keep_mask,
    filter_logits,
    sample,
    sample_from_logits,
    teacher_forced_sample,
)

from .helpers import random_generator

GUIDED = dict(cfg_scale=4.0, cfg_power=1.5, temperature=1.1, top_k=20, top_p=0.95)


def test_cfg_schedule_endpoints():
    L, g = 256, 6.75
    assert cfg_schedule(0, L, g, 1.01) == 1.0
    assert cfg_schedule(L, L, g, 1.01) == pytest.approx(g, abs=1e-12)
    assert cfg_schedule(L // 2, L, g, 1.0) == pytest.approx(1 + (g - 1) / 2)    # cos(pi/2) = 0
    steps = [cfg_schedule(k, L, g, 2.75) for k in range(L + 1)]
    assert all(a <= b for a, b in zip(steps, steps[1:]))                        # rises monotonically


def test_top_k_restricts_support():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    top5 = logits.topk(5, dim=-1).indices
    uniform = torch.rand(4, 2000, generator=torch.Generator().manual_seed(1))
    for row in range(4):
        drawn = sample_from_logits(logits[row:row + 1].expand(2000, -1), uniform[row], top_k=5)
        assert set(drawn.tolist()) == set(top5[row].tolist())    # inside the top 5, and each of them reachable


def test_top_p_restricts_support_to_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])
    logits = probs.log()
    kept = torch.isfinite(filter_logits(logits, top_p=0.85))
    assert kept.tolist() == [[True, True, True, False, False]]                 # 0.5 + 0.3 < 0.85 <= 0.9
    assert torch.isfinite(filter_logits(logits, top_p=0.79)).sum() == 2        # 0.5 < 0.79 <= 0.5 + 0.3
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).sum() == 1        # always the most likely
    uniform = torch.rand(5000, generator=torch.Generator().manual_seed(2))
    drawn = sample_from_logits(logits.expand(5000, -1), uniform, top_p=0.85)
    assert set(drawn.tolist()) == {0, 1, 2}


def test_inverse_cdf_sampling_matches_probabilities():
    probs = torch.tensor([0.05, 0.0, 0.45, 0.2, 0.3])
    n = 40000
    uniform = torch.rand(n, generator=torch.Generator().manual_seed(3))
    counts = torch.bincount(sample_from_logits(probs.log().expand(n, -1), uniform), minlength=5).double()
    sigma = (n * probs * (1 - probs)).double().sqrt()
    assert counts[1] == 0
    assert ((counts - n * probs).abs() <= 5 * sigma + 1e-9).all(), counts
    # edge of the stream: u = 0 and u just below 1 land on tokens with probability > 0
    edges = sample_from_logits(probs.log().expand(2, -1), torch.tensor([0.0, 1.0 - 2**-24]))
    assert edges.tolist() == [0, 4]


def test_temperature_zero_is_greedy():
    gpt = random_generator()
    labels = torch.tensor([0, 1])
    tokens = sample(gpt, labels, temperature=0.0)
    logits = gpt(tokens, labels)
    assert torch.equal(logits.argmax(-1), tokens)


def test_kv_cache_and_recompute_sample_the_same_tokens():
    gpt = random_generator()
    labels = torch.tensor([0, 1, 2, 4])
    cached = sample(gpt, labels, generator=torch.Generator().manual_seed(5), **GUIDED)
    recomputed = sample(gpt, labels, generator=torch.Generator().manual_seed(5), use_cache=False, **GUIDED)
    assert torch.equal(cached, recomputed)
    other_seed = sample(gpt, labels, generator=torch.Generator().manual_seed(6), **GUIDED)
    assert not torch.equal(cached, other_seed)


def test_guidance_changes_samples_and_keeps_training_mode():
    gpt = random_generator().train()
    labels = torch.tensor([0, 1, 2, 3])
    plain = sample(gpt, labels, generator=torch.Generator().manual_seed(7))
    guided = sample(gpt, labels, cfg_scale=8.0, cfg_power=0.5, generator=torch.Generator().manual_seed(7))
    assert gpt.training
    assert not torch.equal(plain, guided)


@pytest.mark.parametrize("settings", [{}, GUIDED], ids=["plain", "guided"])
def test_teacher_forced_sigma_one_is_ground_truth(settings):
    gpt = random_generator()
    labels = torch.tensor([0, 1, 2])
    gt = torch.randint(0, 64, (3, 4, 4))                     # a token grid, flattened in raster order
    tokens, keep_mask = teacher_forced_sample(gpt, labels, gt, sigma=1.0, seed=11, **settings)
    assert torch.equal(tokens, gt.flatten(1)) and keep_mask.all()


@pytest.mark.parametrize("settings", [{}, GUIDED], ids=["plain", "guided"])
def test_teacher_forced_sigma_zero_is_plain_sampling(settings):
    gpt = random_generator()
    labels = torch.tensor([0, 1, 2, 3])
    gt = torch.randint(0, 64, (4, 16))
    tokens, keep_mask = teacher_forced_sample(gpt, labels, gt, sigma=0.0, seed=12, **settings)
    expected = sample(gpt, labels, generator=torch.Generator().manual_seed(12), **settings)
    assert not keep_mask.any()
    assert torch.equal(tokens, expected)


def test_teacher_forced_mixes_truth_and_samples_with_a_causal_context():
    gpt = random_generator()
    n, sigma = 64, 0.7
    labels = torch.arange(n) % 5
    gt = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(0))
    tokens, keep_mask = teacher_forced_sample(gpt, labels, gt, sigma=sigma, seed=13, **GUIDED)
    assert torch.equal(tokens[keep_mask], gt[keep_mask])
    # the kept share over n * L Bernoulli(sigma) draws lies within 5 sigma of sigma
    draws = keep_mask.numel()
    assert abs(keep_mask.float().mean().item() - sigma) <= 5 * math.sqrt(sigma * (1 - sigma) / draws)
    # sampled positions are not copies of the truth (V = 64: a chance match is ~1/64 even if the model liked it)
    assert (tokens[~keep_mask] != gt[~keep_mask]).float().mean() > 0.8
    # same seed, same result; the mask follows the seed and does not depend on the model
    again, again_mask = teacher_forced_sample(gpt, labels, gt, sigma=sigma, seed=13, **GUIDED)
    assert torch.equal(again, tokens) and torch.equal(again_mask, keep_mask)
    assert torch.equal(draw_keep_mask(n, 16, sigma, 13), keep_mask)
    assert not torch.equal(draw_keep_mask(n, 16, sigma, 14), keep_mask)


def test_keep_mask_share_over_many_images_within_5_sigma():
    for sigma in (0.1, 0.7, 0.95):
        mask = draw_keep_mask(4096, 256, sigma, seed=3)
        per_image = mask.float().mean(dim=1)                     # each image's own share
        draws = mask.numel()
        assert abs(mask.float().mean().item() - sigma) <= 5 * math.sqrt(sigma * (1 - sigma) / draws)
        assert abs(per_image.std().item() - math.sqrt(sigma * (1 - sigma) / 256)) < 0.1 * math.sqrt(sigma / 256)


def test_teacher_forced_rejects_bad_input():
    gpt = random_generator()
    with pytest.raises(ValueError, match="sigma"):
        teacher_forced_sample(gpt, torch.tensor([0]), torch.zeros(1, 16, dtype=torch.long), 1.5, 0)
    with pytest.raises(ValueError, match="16 tokens"):
        teacher_forced_sample(gpt, torch.tensor([0]), torch.zeros(1, 15, dtype=torch.long), 0.5, 0)
    with pytest.raises(TypeError, match="tempreature"):
        teacher_forced_sample(gpt, torch.tensor([0]), torch.zeros(1, 16, dtype=torch.long), 0.5, 0, tempreature=1)
