"""The DiT generator: facebookresearch/DiT's key layout and forward, the rectified-flow loss, the Euler
sampler with guidance, partial denoising, and checkpoints of both generator kinds.

dit_reference.json is derived from facebookresearch/DiT's models.py (its "source" says how), never from our
model: the DiT-XL/2 state-dict keys and shapes, and a tiny DiT's output for seeded weights."""

import json
from pathlib import Path

import pytest
import torch

from tokpost_fast.models.generator import (DIT_PRESETS, DiTConfig, GeneratorConfig, build_generator, denoise_from,
                                           flow_pair, full_attention, generator_config, load_generator,
                                           read_generator_checkpoint, sample_dit, save_generator)
from tokpost_fast.models.generator.attention import attention_reference
from tokpost_fast.models.generator.diffusion import guided_velocity, time_grid
from tokpost_fast.models.generator.dit import load_dit_weights

REFERENCE = json.loads((Path(__file__).with_name("dit_reference.json")).read_text())


def dit_xl2_config() -> DiTConfig:
    ref = REFERENCE["config"]
    return generator_config("dit_xl", latent_channels=ref["in_channels"], grid_size=ref["input_size"],
                            num_classes=ref["num_classes"], learn_sigma=ref["learn_sigma"])


def tiny_dit(seed: int = 0, randomize: bool = True, **overrides):
    """A tiny DiT; randomize: every parameter random (adaLN-Zero would make the model predict 0 everywhere,
    and the guidance / label tests pass vacuously)."""
    values = dict(latent_channels=4, grid_size=4, patch_size=2, width=32, depth=2, heads=4, num_classes=3,
                  attn_backend="sdpa")
    values.update(overrides)
    torch.manual_seed(seed)
    dit = build_generator(DiTConfig(**values))
    if randomize:
        with torch.no_grad():
            for param in dit.parameters():
                if param.requires_grad:
                    param.normal_(0.0, 0.2)
    return dit.eval()


# --- layout and forward against facebookresearch/DiT ----------------------------------------------------------
def test_dit_xl2_state_dict_has_the_released_layout():
    with torch.device("meta"):
        dit = build_generator(dit_xl2_config())
    ours = {k: list(v.shape) for k, v in dit.state_dict().items()}
    expected = REFERENCE["keys"]
    assert sorted(set(expected) - set(ours)) == [] and sorted(set(ours) - set(expected)) == []
    assert {k: v for k, v in ours.items() if v != expected[k]} == {}
    assert not dit.pos_embed.requires_grad                                  # DiT's fixed table


def test_a_file_in_the_dit_layout_loads_strictly_and_a_wrong_shape_is_named(tmp_path):
    # meta tensors: the file holds DiT-XL/2's keys and shapes without its 2.7 GB of weights
    state = {k: torch.empty(shape, device="meta") for k, shape in REFERENCE["keys"].items()}
    torch.save({"model": {}, "ema": state, "args": {"model": "DiT-XL/2"}}, tmp_path / "0400000.pt")
    with torch.device("meta"):
        dit = build_generator(dit_xl2_config())
    load_dit_weights(dit, tmp_path / "0400000.pt")

    bad = dict(state)
    bad["blocks.7.mlp.fc1.weight"] = torch.empty(4608, 1000, device="meta")
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"blocks\.7\.mlp\.fc1\.weight"):
        load_dit_weights(dit, tmp_path / "bad.pt")
    del bad["blocks.7.mlp.fc1.weight"]
    bad["blocks.7.mlp.fc1.weight"] = state["blocks.7.mlp.fc1.weight"]
    bad["final_layer.norm_final.weight"] = torch.empty(1152, device="meta")   # DiT's final norm has no affine
    torch.save(bad, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"final_layer\.norm_final\.weight"):
        load_dit_weights(dit, tmp_path / "extra.pt")


def test_forward_equals_facebookresearch_dit_on_seeded_weights():
    ref = REFERENCE["forward"]
    c = ref["config"]
    cfg = DiTConfig(latent_channels=c["in_channels"], grid_size=c["input_size"], patch_size=c["patch_size"],
                    width=c["hidden_size"], depth=c["depth"], heads=c["num_heads"], mlp_ratio=c["mlp_ratio"],
                    num_classes=c["num_classes"], class_dropout=c["class_dropout_prob"],
                    learn_sigma=c["learn_sigma"], attn_backend="math")
    dit = build_generator(cfg).eval()
    g = torch.Generator().manual_seed(1234)
    own = dit.state_dict()
    dit.load_state_dict({k: torch.randn(own[k].shape, generator=g) * 0.2 for k in sorted(own)})
    x = torch.randn(2, 4, 4, 4, generator=g)
    t = torch.rand(2, generator=g)
    expected = torch.tensor(ref["output"]).view(ref["output_shape"])[:, :cfg.latent_channels]
    with torch.no_grad():
        torch.testing.assert_close(dit(x, t, torch.tensor([1, 3])), expected, atol=2e-5, rtol=1e-5)


def test_initial_position_table_is_dits():
    ref = REFERENCE["pos_embed"]
    patches = ref["grid_size"]
    dit = build_generator(DiTConfig(latent_channels=4, grid_size=patches, patch_size=1, width=ref["embed_dim"],
                                    depth=1, heads=2, num_classes=2))
    torch.testing.assert_close(dit.pos_embed[0], torch.tensor(ref["table"]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset,expected", [("dit_b", 130e6), ("dit_xl", 675e6)])
def test_preset_parameter_counts_match_the_dit_paper(preset, expected):
    # DiT paper, table 1 (B/2 130M, XL/2 675M), at 256 px with 4-channel latents
    with torch.device("meta"):
        dit = build_generator(DIT_PRESETS[preset])
    assert abs(dit.num_params() - expected) / expected < 0.01, dit.num_params()


def test_demo_preset_is_tiny():
    with torch.device("meta"):
        assert build_generator(DIT_PRESETS["demo_dit"]).num_params() < 2e6


def test_config_errors_name_the_field():
    for field, value, match in [("patch_size", 3, "patch_size"), ("heads", 5, "heads"), ("width", 30, "width"),
                                ("class_dropout", 1.0, "class_dropout"), ("time_sampling", "cosine", "time_sampling")]:
        with pytest.raises(ValueError, match=f"DiTConfig.{match}"):
            DiTConfig(**{"grid_size": 8, "width": 64, "heads": 4, field: value})
    with pytest.raises(ValueError, match="kind"):
        DiTConfig.from_dict({"kind": "ar"})


# --- attention, loss, sampling ------------------------------------------------------------------------------------
def test_full_attention_backends_agree_and_are_not_causal():
    q, k, v = (torch.randn(2, 9, 3, 8) for _ in range(3))
    reference = attention_reference(q, k, v, causal=False)
    torch.testing.assert_close(full_attention(q, k, v, "sdpa"), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full_attention(q, k, v, "math"), reference)
    changed = v.clone()
    changed[:, -1] += 1.0                                                    # the last key moves the first query
    assert (full_attention(q, k, changed, "sdpa")[:, 0] - reference[:, 0]).abs().max() > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash / fused SDPA need a GPU")
def test_dit_forward_gpu_backends_agree():
    from tokpost_fast.models.generator import flash_attn_available

    dit = tiny_dit(attn_backend="math").cuda()
    x, t, y = torch.randn(3, 4, 4, 4, device="cuda"), torch.rand(3, device="cuda"), torch.tensor([0, 1, 3]).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        reference = dit(x, t, y)
        for backend in ["sdpa"] + (["flash"] if flash_attn_available() else []):
            for block in dit.blocks:
                block.attn.backend = backend
            torch.testing.assert_close(dit(x, t, y), reference, atol=5e-2, rtol=5e-2)


def test_adaln_zero_init_predicts_zero_velocity():
    dit = tiny_dit(randomize=False)
    assert torch.equal(dit(torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([0, 3])), torch.zeros(2, 4, 4, 4))


def test_flow_pair_is_the_straight_path():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 4, 4, generator=g)
    x_t, t, target = flow_pair(x0, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    t_again = torch.rand(5, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    assert torch.equal(t, t_again)
    torch.testing.assert_close(target, eps - x0)
    torch.testing.assert_close(x_t, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps)


def test_time_grid():
    assert time_grid(1.0, 4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert time_grid(0.5, 4) == [0.5, 0.25, 0.0]
    assert time_grid(0.3, 4) == [0.3, 0.25, 0.0]                       # ceil(0.3 * 4) = 2 steps
    assert time_grid(0.01, 50) == [0.01, 0.0]


def test_strength_zero_returns_the_real_latent_bit_for_bit():
    dit = tiny_dit()
    x0 = torch.randn(3, 4, 4, 4) * 1e3 + 1e-7                          # values where a round trip would show
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    out = denoise_from(dit, x0, torch.tensor([0, 1, 2]), 0.0, steps=10, cfg_scale=2.0, generator=g)
    assert torch.equal(out, x0) and out.data_ptr() != x0.data_ptr()
    assert torch.equal(g.get_state(), state)                           # no noise drawn


def test_strength_one_is_plain_sampling_and_seeded():
    dit = tiny_dit()
    labels = torch.tensor([0, 2])
    x0 = torch.randn(2, 4, 4, 4)
    full = denoise_from(dit, x0, labels, 1.0, steps=6, cfg_scale=1.5, generator=torch.Generator().manual_seed(5))
    sampled = sample_dit(dit, labels, steps=6, cfg_scale=1.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(full, sampled)
    again = sample_dit(dit, labels, steps=6, cfg_scale=1.5, generator=torch.Generator().manual_seed(5))
    other = sample_dit(dit, labels, steps=6, cfg_scale=1.5, generator=torch.Generator().manual_seed(6))
    assert torch.equal(sampled, again) and not torch.equal(sampled, other)


def test_guidance_mixes_conditional_and_unconditional_velocities():
    dit = tiny_dit()
    x, labels = torch.randn(3, 4, 4, 4), torch.tensor([0, 1, 2])
    times = torch.full((3,), 0.4)
    with torch.no_grad():
        cond, uncond = dit(x, times, labels), dit(x, times, torch.full_like(labels, dit.null_label))
        assert (cond - uncond).abs().max() > 1e-3                          # the label matters
        torch.testing.assert_close(guided_velocity(dit, x, 0.4, labels, 3.0), uncond + 3.0 * (cond - uncond),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(guided_velocity(dit, x, 0.4, labels, 1.0), cond)
    noise = torch.randn(3, 4, 4, 4)
    unconditional = sample_dit(dit, torch.full_like(labels, dit.null_label), steps=4, noise=noise)
    torch.testing.assert_close(sample_dit(dit, labels, steps=4, cfg_scale=0.0, noise=noise), unconditional,
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sample_dit(dit, labels, steps=4, cfg_scale=4.0, noise=noise), unconditional)


def test_bad_inputs_are_refused():
    dit = tiny_dit()
    with pytest.raises(ValueError, match="labels"):
        sample_dit(dit, torch.tensor([4]), steps=2)
    with pytest.raises(ValueError, match="strength"):
        denoise_from(dit, torch.zeros(1, 4, 4, 4), torch.tensor([0]), 1.5)
    with pytest.raises(ValueError, match="steps"):
        sample_dit(dit, torch.tensor([0]), steps=0)
    with pytest.raises(ValueError, match="x_t"):
        dit(torch.zeros(1, 3, 4, 4), torch.zeros(1), torch.tensor([0]))


def test_a_few_training_steps_lower_the_loss_and_denoise_to_a_finite_latent():
    torch.manual_seed(0)
    dit = tiny_dit(randomize=False).train()
    means = torch.randn(3, 4, 1, 1) * 2                                     # one latent colour per class

    def batch(g):
        labels = torch.randint(0, 3, (16,), generator=g)
        return means[labels] + 0.1 * torch.randn(16, 4, 4, 4, generator=g), labels

    def eval_loss():
        g = torch.Generator().manual_seed(99)
        x0, labels = batch(g)
        with torch.no_grad():
            return dit.loss(x0, labels, label_drop=0.0, generator=g).item()

    before = eval_loss()
    optimizer = torch.optim.AdamW(dit.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        x0, labels = batch(g)
        loss = dit.loss(x0, labels, generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)

    x0, labels = batch(torch.Generator().manual_seed(7))
    out = denoise_from(dit.eval(), x0, labels, 0.5, steps=8, cfg_scale=2.0, generator=torch.Generator().manual_seed(3))
    assert out.shape == x0.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.equal(out, x0)
    # the trained flow brings a half-noised latent closer to its class than the noised start is
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    start = 0.5 * x0 + 0.5 * noise
    assert (out - means[labels]).pow(2).mean() < (start - means[labels]).pow(2).mean()


# --- checkpoints of both kinds ------------------------------------------------------------------------------------
def test_save_and_load_dispatch_on_kind(tmp_path):
    dit = tiny_dit()
    save_generator(dit, tmp_path / "dit.pt", extra={"tokenizer_hash": "abc"})
    payload = read_generator_checkpoint(tmp_path / "dit.pt")
    assert payload["config"]["kind"] == "dit"
    loaded = load_generator(tmp_path / "dit.pt")
    assert loaded.kind == "dit" and loaded.config == dit.config and loaded.checkpoint_extra["tokenizer_hash"] == "abc"
    for key, value in dit.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    gpt = build_generator(GeneratorConfig(vocab_size=16, seq_len=4, num_classes=2, width=16, depth=1, heads=2))
    save_generator(gpt, tmp_path / "gpt.pt")
    assert read_generator_checkpoint(tmp_path / "gpt.pt")["config"]["kind"] == "ar"
    old = read_generator_checkpoint(tmp_path / "gpt.pt")
    del old["config"]["kind"]                                               # a file from before generator kinds
    torch.save(old, tmp_path / "old.pt")
    assert load_generator(tmp_path / "old.pt").kind == "ar"

    payload["model"]["blocks.0.attn.qkv.weight"] = torch.zeros(5, 5)
    torch.save(payload, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight"):
        load_generator(tmp_path / "broken.pt")
