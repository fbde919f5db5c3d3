"""The transformer: preset sizes, KV cache == recompute, causality, attention backends, loss, checkpoints."""

import itertools
import os

import pytest
import torch

from tokpost_fast.models.generator import (
    GENERATOR_PRESETS,
    GeneratorConfig,
    attention_reference,
    available_attention_backends,
    build_generator,
    causal_attention,
    flash_attn_available,
    generator_config,
    load_generator,
    read_generator_checkpoint,
    save_generator,
)

from .helpers import random_generator, tiny_config

# every conditioning x position x MLP variant
VARIANTS = [dict(cond=c, pos=p, mlp=m) for c, p, m in itertools.product(("token", "adaln"), ("rope2d", "learned"),
                                                                       ("swiglu", "gelu"))]


@pytest.mark.parametrize("preset,expected", [("B", 261e6), ("L", 461e6)])
def test_preset_parameter_counts_match_rar(preset, expected):
    # RAR-B ~261M, RAR-L ~461M (METHOD.md A4) at RAR's K = 1024 codes and 1000 classes; built on the meta device, so
    # no memory is allocated. The presets are RAR's own layout (test_rar.py checks its keys).
    with torch.device("meta"):
        gpt = build_generator(generator_config(preset, vocab_size=1024, num_classes=1000))
    assert gpt.config.arch == "rar"
    assert abs(gpt.num_params() - expected) / expected < 0.005, gpt.num_params()


def test_demo_preset_is_tiny():
    with torch.device("meta"):
        gpt = build_generator(GENERATOR_PRESETS["demo"])
    assert gpt.num_params() < 3e6


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v.values()))
def test_kv_cache_logits_equal_full_recompute_at_every_step(variant):
    gpt = random_generator(**variant)
    labels = torch.tensor([0, 3, 5])          # 5 = the "no class" label
    tokens = torch.randint(0, 64, (3, 16))
    full = gpt(tokens, labels)                # [B, L, V]
    gpt.setup_cache(3, 16, torch.float32)
    step_logits = [gpt.forward_cached(tokens[:, :0], labels, 0)]
    step_logits += [gpt.forward_cached(tokens[:, i - 1:i], labels, i) for i in range(1, 16)]
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_prefill_then_steps_equals_full():
    # a multi-token write at start_pos > 0 needs the offset causal mask (SDPA's is_causal is top-left aligned)
    gpt = random_generator()
    labels, tokens = torch.tensor([1, 2]), torch.randint(0, 64, (2, 16))
    full = gpt(tokens, labels)
    gpt.setup_cache(2, 16)
    first = gpt.forward_cached(tokens[:, :5], labels, 0)          # positions 0..5
    middle = gpt.forward_cached(tokens[:, 5:11], labels, 6)       # positions 6..11
    last = [gpt.forward_cached(tokens[:, i - 1:i], labels, i) for i in range(12, 16)]
    torch.testing.assert_close(torch.cat([first, middle, *last], dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS[:2] + VARIANTS[-2:], ids=lambda v: "-".join(v.values()))
def test_causality_future_token_does_not_change_earlier_logits(variant):
    gpt = random_generator(**variant)
    labels, tokens = torch.tensor([0, 1]), torch.randint(0, 64, (2, 16))
    base = gpt(tokens, labels)
    for j in (0, 7, 14):
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 1) % 64
        out = gpt(changed, labels)
        # logits[:, i] see tokens[:, :i]: positions <= j are untouched, position j + 1 must move
        torch.testing.assert_close(out[:, :j + 1], base[:, :j + 1], atol=0, rtol=0)
        assert (out[:, j + 1] - base[:, j + 1]).abs().max() > 1e-4


def test_label_changes_every_logit():
    gpt = random_generator()
    tokens = torch.randint(0, 64, (1, 16))
    a, b = gpt(tokens, torch.tensor([0])), gpt(tokens, torch.tensor([1]))
    assert ((a - b).abs().amax(dim=-1) > 1e-4).all()


@pytest.mark.parametrize("seq", [1, 5, 64])
def test_sdpa_equals_math_reference(seq):
    torch.manual_seed(seq)
    q, k, v = torch.randn(3, 2, seq, 4, 16).unbind(0)
    torch.testing.assert_close(causal_attention(q, k, v, "sdpa"), attention_reference(q, k, v),
                               atol=1e-5, rtol=1e-5)


def test_model_backends_agree_on_cpu():
    logits = {}
    for backend in ("sdpa", "math", "auto"):
        gpt = random_generator(attn_backend=backend)
        tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        logits[backend] = gpt(tokens, torch.tensor([0, 4]))
    torch.testing.assert_close(logits["sdpa"], logits["math"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["auto"], logits["sdpa"], atol=0, rtol=0)


def test_available_backends_and_forced_flash_error():
    assert available_attention_backends("cpu") == {"flash": False, "sdpa": True, "math": True}
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match="flash_attn"):
        causal_attention(q, q, q, "flash")


@pytest.mark.skipif(not (torch.cuda.is_available() and flash_attn_available()),
                    reason="flash_attn path needs a CUDA GPU and the flash_attn package (not installable here)")
def test_flash_equals_sdpa_training_and_cached():
    # bf16 tolerance: both are fused bf16 kernels with fp32 accumulation; ~2x the bf16 eager error of 1e-2
    device = torch.device("cuda")
    logits = {}
    for backend in ("flash", "sdpa"):
        gpt = random_generator(attn_backend=backend).to(device, torch.bfloat16)
        tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
        labels = torch.tensor([0, 4], device=device)
        full = gpt(tokens, labels)
        gpt.setup_cache(2, 16, torch.bfloat16)
        steps = [gpt.forward_cached(tokens[:, :0], labels, 0)]
        steps += [gpt.forward_cached(tokens[:, i - 1:i], labels, i) for i in range(1, 16)]
        logits[backend] = (full, torch.cat(steps, dim=1))
    for flash, sdpa in zip(logits["flash"], logits["sdpa"]):
        torch.testing.assert_close(flash, sdpa, atol=3e-2, rtol=3e-2)


def test_loss_label_drop_uses_the_null_label():
    gpt = random_generator(class_dropout=0.1)
    tokens, labels = torch.randint(0, 64, (4, 16)), torch.tensor([0, 1, 2, 3])
    null = torch.full_like(labels, gpt.null_label)
    torch.testing.assert_close(gpt.loss(tokens, labels, label_drop=1.0 - 1e-9),
                               gpt.loss(tokens, null, label_drop=0.0))
    assert not torch.allclose(gpt.loss(tokens, labels, label_drop=0.0), gpt.loss(tokens, null, label_drop=0.0))


def test_training_overfits_one_batch():
    torch.manual_seed(0)
    gpt = build_generator(tiny_config(dropout=0.1)).train()
    tokens, labels = torch.randint(0, 64, (4, 16)), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW(gpt.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = gpt.loss(tokens, labels, label_drop=0.0)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (first, loss.item())


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="cond"):
        tiny_config(cond="cross")
    with pytest.raises(ValueError, match="seq_len"):
        tiny_config(seq_len=15)                      # rope2d needs a square grid
    tiny_config(seq_len=15, pos="learned")
    with pytest.raises(ValueError, match="GeneratorConfig: unknown key 'depht'; did you mean depth"):
        GeneratorConfig.from_dict({"depht": 3})
    with pytest.raises(ValueError, match="unknown generator preset"):
        generator_config("XXL")
    assert generator_config("B", vocab_size=16384).vocab_size == 16384


def test_save_load_roundtrip_keeps_logits_and_extras(tmp_path):
    gpt = random_generator(pos="learned")
    path = tmp_path / "sub" / "generator.pt"
    save_generator(gpt, path, extra={"tokenizer_hash": "abc123"})
    assert os.listdir(path.parent) == ["generator.pt"]     # the temp file was renamed, nothing left over
    loaded = load_generator(path).eval()
    tokens, labels = torch.randint(0, 64, (2, 16)), torch.tensor([1, 2])
    torch.testing.assert_close(loaded(tokens, labels), gpt(tokens, labels), atol=0, rtol=0)
    assert loaded.config == gpt.config
    assert loaded.checkpoint_extra == {"tokenizer_hash": "abc123"}
    assert read_generator_checkpoint(path)["tokenizer_hash"] == "abc123"


def test_load_is_strict_and_names_keys(tmp_path):
    gpt = random_generator()
    path = tmp_path / "generator.pt"
    save_generator(gpt, path)
    payload = torch.load(path, weights_only=True)
    del payload["model"]["head.bias"]
    payload["model"]["blocks.0.extra"] = torch.zeros(1)
    payload["model"]["tok_emb.weight"] = torch.zeros(65, 32)
    torch.save(payload, path)
    with pytest.raises(ValueError) as err:
        load_generator(path)
    message = str(err.value)
    assert "head.bias" in message and "blocks.0.extra" in message and "tok_emb.weight" in message
    payload = torch.load(path, weights_only=True)
    payload["config"]["flavour"] = 1
    torch.save(payload, path)
    with pytest.raises(ValueError, match="flavour"):
        load_generator(path)
    with pytest.raises(ValueError, match="override"):
        save_generator(gpt, tmp_path / "x.pt", extra={"model": 1})


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_bf16_autocast_forward_and_cache(backend):
    # the GPU path runs under bf16 autocast; CPU autocast exercises the same dtype plumbing (qk-norm returns fp32
    # under autocast, v stays bf16). Tolerance: bf16 has 8 bits of mantissa, the logits are O(1)-O(10).
    gpt = random_generator(attn_backend=backend)
    tokens, labels = torch.randint(0, 64, (2, 16)), torch.tensor([0, 3])
    reference = gpt(tokens, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = gpt(tokens, labels)
        gpt.setup_cache(2, 16, torch.bfloat16)
        steps = [gpt.forward_cached(tokens[:, :0], labels, 0)]
        steps += [gpt.forward_cached(tokens[:, i - 1:i], labels, i) for i in range(1, 16)]
    assert full.dtype == torch.float32
    scale = reference.abs().max()
    assert (full - reference).abs().max() < 0.05 * scale
    assert (torch.cat(steps, dim=1) - reference).abs().max() < 0.05 * scale
