"""RAR (arch "rar"): the released key layout, logits equal to bytedance/1d-tokenizer's own RAR after training on
permuted orders and when sampled in raster order, the KV cache, causality in generation order, the target-aware
position, the randomness anneal and the order draws.

rar_reference.json comes from the official modeling/rar.py run unmodified (make_rar_reference.py says how), never
from our model."""

import json
from pathlib import Path

import pytest
import torch

from tokpost_fast.models.generator import (GENERATOR_PRESETS, GeneratorConfig, build_generator, cfg_schedule,
                                           draw_orders, generator_config, load_generator, load_rar_weights,
                                           next_token_loss, order_generator, permute_tokens, random_ratio, sample,
                                           save_generator, teacher_forced_sample)
from tokpost_fast.models.generator.rar import RAR, rar_config_from_state

from .helpers import random_generator

REFERENCE = json.loads(Path(__file__).with_name("rar_reference.json").read_text())


def rar_b_config(**overrides) -> GeneratorConfig:
    c = REFERENCE["rar_b"]["config"]
    return generator_config("B", vocab_size=c["codebook_size"], seq_len=c["image_seq_len"],
                            num_classes=c["condition_num_classes"], **overrides)


# --- layout -----------------------------------------------------------------------------------------------------
def test_rar_b_preset_has_the_released_layout():
    with torch.device("meta"):
        gpt = build_generator(rar_b_config())
    ours = {k: list(v.shape) for k, v in gpt.state_dict().items()}
    expected = REFERENCE["rar_b"]["keys"]
    assert sorted(set(expected) - set(ours)) == [] and sorted(set(ours) - set(expected)) == []
    assert {k: v for k, v in ours.items() if v != expected[k]} == {}


def test_released_file_loads_strictly_with_inferred_sizes_and_mismatches_are_named(tmp_path):
    # meta tensors: the file holds RAR-B's keys and shapes without its 1 GB of weights
    state = {k: torch.empty(shape, device="meta") for k, shape in REFERENCE["rar_b"]["keys"].items()}
    torch.save(state, tmp_path / "rar_b.bin")
    with torch.device("meta"):
        gpt = load_rar_weights(tmp_path / "rar_b.bin", map_location="meta")
    assert isinstance(gpt, RAR) and gpt.config == rar_b_config()

    bad = dict(state, **{"blocks.3.mlp.fc1.weight": torch.empty(3072, 700, device="meta"),
                         "blocks.3.extra": torch.empty(1, device="meta")})
    del bad["lm_head.bias"]
    with torch.device("meta"), pytest.raises(ValueError) as err:
        load_rar_weights(bad, map_location="meta")
    assert all(key in str(err.value) for key in ("blocks.3.mlp.fc1.weight", "blocks.3.extra", "lm_head.bias"))
    with pytest.raises(ValueError, match="not a RAR state dict"):
        rar_config_from_state({"pos_embed": torch.zeros(1)})


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match="pos"):
        GeneratorConfig(arch="rar", pos="rope2d")
    with pytest.raises(ValueError, match="mlp"):
        GeneratorConfig(arch="rar", mlp="swiglu")
    with pytest.raises(ValueError, match="arch"):
        GeneratorConfig(arch="llama")
    assert GeneratorConfig(arch="rar").positions == "learned" and GeneratorConfig().positions == "rope2d"
    assert {name: GENERATOR_PRESETS[name].arch for name in ("demo", "B", "L")} == {"demo": "gpt", "B": "rar",
                                                                                  "L": "rar"}


# --- against the official RAR -----------------------------------------------------------------------------------
def official_tiny() -> RAR:
    ref = REFERENCE["tiny"]
    c = ref["config"]
    cfg = GeneratorConfig(arch="rar", vocab_size=c["codebook_size"], seq_len=c["image_seq_len"],
                          num_classes=c["condition_num_classes"], width=c["hidden_size"],
                          depth=c["num_hidden_layers"], heads=c["num_attention_heads"],
                          mlp_ratio=c["intermediate_size"] / c["hidden_size"], dropout=0.0, attn_backend="math")
    gpt = build_generator(cfg)
    g = torch.Generator().manual_seed(ref["seed"])
    own = gpt.state_dict()
    gpt.load_state_dict({k: torch.randn(own[k].shape, generator=g) * 0.2 for k in sorted(own)})
    return gpt


def test_permutation_trained_then_raster_sampled_logits_equal_official_rar():
    ref = REFERENCE["tiny"]
    gpt = official_tiny().train()
    # the same SGD steps on the same permuted / raster batches: losses, and so gradients, must agree
    for batch in ref["train"]:
        tokens, labels, orders = (torch.tensor(batch[k]) for k in ("tokens", "labels", "orders"))
        loss = next_token_loss(gpt(tokens, labels, orders), permute_tokens(tokens, orders))
        gpt.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in gpt.parameters():
                p -= ref["lr"] * p.grad
        assert loss.item() == pytest.approx(batch["loss"], rel=1e-5)
    gpt.eval()
    # fp32 both sides, different op order (fused qkv split, SDPA vs explicit softmax): ~1e-6 on O(1) logits
    tol = dict(atol=2e-5, rtol=2e-5)
    permuted = ref["permuted"]
    tokens, labels, orders = (torch.tensor(permuted[k]) for k in ("tokens", "labels", "orders"))
    with torch.no_grad():
        torch.testing.assert_close(gpt(tokens, labels, orders), torch.tensor(permuted["logits"]), **tol)

    raster = ref["raster"]
    labels, forced = torch.tensor(raster["labels"]), torch.tensor(raster["tokens"])
    L, n = gpt.config.seq_len, labels.shape[0]
    both = torch.cat([labels, torch.full_like(labels, gpt.null_label)])
    gpt.setup_cache(2 * n)
    steps = []
    with torch.no_grad():
        for step in range(L):
            inputs = forced[:, step - 1:step] if step else forced[:, :0]
            cond, uncond = gpt.forward_cached(torch.cat([inputs, inputs]), both, step)[:, -1].chunk(2)
            steps.append(uncond + cfg_schedule(step, L, raster["guidance"], raster["guidance_pow"]) * (cond - uncond))
    torch.testing.assert_close(torch.stack(steps, dim=1), torch.tensor(raster["logits"]), **tol)

    greedy = ref["greedy"]
    assert greedy["min_top2_gap"] > 100 * tol["atol"]       # no near-tie the tolerance could flip
    tokens = sample(gpt, torch.tensor(greedy["labels"]), cfg_scale=greedy["guidance"],
                    cfg_power=greedy["guidance_pow"], temperature=0.0)
    assert tokens.tolist() == greedy["tokens"]


# --- the model's own contracts ------------------------------------------------------------------------------------
def test_kv_cache_prefill_and_steps_equal_full_recompute():
    gpt = random_generator(arch="rar")
    labels, tokens = torch.tensor([0, 3, 5]), torch.randint(0, 64, (3, 16))     # 5 = "no class"
    full = gpt(tokens, labels)
    gpt.setup_cache(3)
    assert gpt.blocks[0].attn.cache.max_len == 17                                  # + the cls slot
    first = gpt.forward_cached(tokens[:, :4], labels, 0)                          # positions 0..4
    middle = gpt.forward_cached(tokens[:, 4:9], labels, 5)                        # positions 5..9
    last = [gpt.forward_cached(tokens[:, i - 1:i], labels, i) for i in range(10, 16)]
    torch.testing.assert_close(torch.cat([first, middle, *last], dim=1), full, atol=1e-5, rtol=1e-5)


def test_raster_orders_are_the_raster_pass():
    gpt = random_generator(arch="rar")
    labels, tokens = torch.tensor([1, 2]), torch.randint(0, 64, (2, 16))
    raster = torch.arange(16).repeat(2, 1)
    torch.testing.assert_close(gpt(tokens, labels, raster), gpt(tokens, labels), atol=0, rtol=0)


def test_permuted_pass_is_causal_in_generation_order_and_target_aware():
    gpt = random_generator(arch="rar")
    labels, tokens = torch.tensor([0, 4]), torch.randint(0, 64, (2, 16))
    orders = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    base = gpt(tokens, labels, orders)
    for k in (0, 6, 14):
        changed = tokens.clone()
        rows = torch.arange(2)
        changed[rows, orders[:, k]] = (changed[rows, orders[:, k]] + 1) % 64
        out = gpt(changed, labels, orders)
        torch.testing.assert_close(out[:, :k + 1], base[:, :k + 1], atol=0, rtol=0)   # steps <= k never saw it
        assert (out[:, k + 1] - base[:, k + 1]).abs().max() > 1e-4
    # same history, another next cell: only the target-aware position differs, and the prediction follows it
    swapped = orders.clone()
    swapped[:, [5, 6]] = orders[:, [6, 5]]
    out = gpt(tokens, labels, swapped)
    torch.testing.assert_close(out[:, :5], base[:, :5], atol=0, rtol=0)
    assert (out[:, 5] - base[:, 5]).abs().max() > 1e-4


def test_sampling_and_teacher_forcing_run_through_the_cache():
    gpt = random_generator(arch="rar")
    labels = torch.tensor([0, 1, 4])
    settings = dict(cfg_scale=3.0, cfg_power=1.5, temperature=1.1, top_k=20)
    cached = sample(gpt, labels, generator=torch.Generator().manual_seed(5), **settings)
    recomputed = sample(gpt, labels, generator=torch.Generator().manual_seed(5), use_cache=False, **settings)
    assert torch.equal(cached, recomputed)
    free, _ = teacher_forced_sample(gpt, labels, cached, sigma=0.0, seed=9, **settings)
    assert torch.equal(free, sample(gpt, labels, generator=torch.Generator().manual_seed(9), **settings))
    kept, mask = teacher_forced_sample(gpt, labels, cached, sigma=1.0, seed=9, **settings)
    assert torch.equal(kept, cached) and mask.all()


def test_save_load_roundtrip(tmp_path):
    gpt = random_generator(arch="rar")
    save_generator(gpt, tmp_path / "generator.pt", extra={"tokenizer_hash": "abc"})
    loaded = load_generator(tmp_path / "generator.pt")
    assert isinstance(loaded, RAR) and loaded.config == gpt.config
    tokens, labels = torch.randint(0, 64, (2, 16)), torch.tensor([1, 2])
    torch.testing.assert_close(loaded(tokens, labels), gpt(tokens, labels), atol=0, rtol=0)


def test_bf16_autocast_forward_and_cache():
    # bf16 keeps 8 mantissa bits; the logits are O(1)-O(10): 5 % of the largest is ~10x the rounding
    gpt = random_generator(arch="rar")
    tokens, labels = torch.randint(0, 64, (2, 16)), torch.tensor([0, 3])
    reference = gpt(tokens, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gpt.setup_cache(2, dtype=torch.bfloat16)
        steps = [gpt.forward_cached(tokens[:, :0], labels, 0)]
        steps += [gpt.forward_cached(tokens[:, i - 1:i], labels, i) for i in range(1, 16)]
    assert (torch.cat(steps, dim=1) - reference).abs().max() < 0.05 * reference.abs().max()


# --- the randomized order -----------------------------------------------------------------------------------------
def test_anneal_is_exact_at_its_end_points():
    start, end = 125_000, 187_500                                   # rar.yaml
    assert random_ratio(0, start, end) == 1.0 and random_ratio(start, start, end) == 1.0
    assert random_ratio(end, start, end) == 0.0 and random_ratio(250_000, start, end) == 0.0
    assert random_ratio((start + end) // 2, start, end) == 0.5
    assert random_ratio(start + 1, start, end) == 1.0 - 1 / 62_500
    ratios = [random_ratio(s, 10, 20) for s in range(0, 31)]
    assert all(a >= b for a, b in zip(ratios, ratios[1:]))
    assert [random_ratio(s, 5, 5) for s in (4, 5, 6)] == [1.0, 0.0, 0.0]          # a switch, no division


def test_order_draws_are_seeded_bernoulli_and_uniform_permutations():
    L, n = 16, 4000
    assert torch.equal(draw_orders(8, L, 0.0, torch.Generator().manual_seed(0)), torch.arange(L).repeat(8, 1))
    assert torch.equal(draw_orders(50, L, 0.7, order_generator(3, 12)), draw_orders(50, L, 0.7, order_generator(3, 12)))
    assert not torch.equal(draw_orders(50, L, 0.7, order_generator(3, 12)), draw_orders(50, L, 0.7,
                                                                                      order_generator(3, 13)))
    orders = draw_orders(n, L, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(orders.sort(dim=1).values, torch.arange(L).repeat(n, 1))      # every row a permutation
    permuted = (orders != torch.arange(L)).any(dim=1)
    sigma = (n * 0.3 * 0.7) ** 0.5
    assert abs(permuted.sum().item() - 0.3 * n) < 5 * sigma
    everything = draw_orders(n, L, 1.0, torch.Generator().manual_seed(2))
    counts = torch.bincount(everything[:, 0], minlength=L).double()     # the first cell: uniform over the grid
    p = 1 / L
    assert ((counts - n * p).abs() < 5 * (n * p * (1 - p)) ** 0.5).all(), counts
    with pytest.raises(ValueError, match="ratio"):
        draw_orders(2, L, 1.5)
