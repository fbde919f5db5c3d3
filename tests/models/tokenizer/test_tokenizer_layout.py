"""LlamaGen key layout: our VQ-16 CNN and PatchGAN state dicts match LlamaGen's exactly, its checkpoints load
strictly, wrong ones fail naming the keys; our own checkpoint format round-trips.

llamagen_state_keys.json was produced by building LlamaGen's own modules (FoundationVision/LlamaGen@ce98ec4,
tokenizer/tokenizer_image/vq_model.py and discriminator_patchgan.py) on the meta device and listing key -> shape.
"""

import json
import os

import pytest
import torch

from tokpost_fast.models.tokenizer import (TokenizerConfig, build_discriminator, build_tokenizer,
                                           load_llamagen_checkpoint, load_tokenizer, save_tokenizer, tokenizer_config)

FIXTURE = os.path.join(os.path.dirname(__file__), "llamagen_state_keys.json")


@pytest.fixture(scope="module")
def llamagen_keys():
    with open(FIXTURE) as f:
        return json.load(f)


def shapes(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def random_state(keys, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) if shape else torch.tensor(0) for k, shape in keys.items()}


def test_vq16_state_dict_is_llamagen_vq16(llamagen_keys):
    with torch.device("meta"):
        model = build_tokenizer(tokenizer_config("vq16"))
    assert shapes(model) == llamagen_keys["vq16"]["keys"]
    assert list(model.state_dict()) == list(llamagen_keys["vq16"]["keys"])  # same order too


def test_patchgan_state_dict_is_llamagen(llamagen_keys):
    assert shapes(build_discriminator(64, 3)) == llamagen_keys["patchgan"]["keys"]


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory, llamagen_keys):
    state = random_state(llamagen_keys["small"]["keys"])
    path = tmp_path_factory.mktemp("llamagen") / "vq_small.pt"
    torch.save({"model": state, "steps": 7}, path)
    return path, state


def test_llamagen_checkpoint_loads_strictly_with_inferred_sizes(small_checkpoint):
    path, state = small_checkpoint
    model = load_llamagen_checkpoint(str(path), image_size=32)
    cfg = model.config
    assert (cfg.arch, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels) == ("vq_cnn", 128, [1, 2], 2, 32)
    assert (cfg.codebook_size, cfg.codebook_embed_dim, model.grid_size) == (64, 8, 16)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in state.items())


def test_llamagen_checkpoint_given_config(small_checkpoint):
    path, _ = small_checkpoint
    cfg = TokenizerConfig(arch="vq_cnn", image_size=32, codebook_size=64, codebook_embed_dim=8, ch=128,
                          ch_mult=[1, 2], num_res_blocks=2, z_channels=32)
    assert load_llamagen_checkpoint(str(path), config=cfg).config == cfg


def test_wrong_checkpoint_names_keys_and_shapes(tmp_path, small_checkpoint):
    _, state = small_checkpoint
    state = dict(state)
    del state["decoder.conv_out.bias"]
    state["decoder.extra_head.weight"] = torch.zeros(3)
    state["post_quant_conv.weight"] = torch.zeros(32, 8, 3, 3)
    path = tmp_path / "wrong.pt"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError) as err:
        load_llamagen_checkpoint(str(path), image_size=32)
    msg = str(err.value)
    assert "missing keys" in msg and "decoder.conv_out.bias" in msg
    assert "unexpected keys" in msg and "decoder.extra_head.weight" in msg
    assert "post_quant_conv.weight: (32, 8, 3, 3) vs expected (32, 8, 1, 1)" in msg


def test_not_a_llamagen_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(ValueError, match="not a LlamaGen VQ state dict"):
        load_llamagen_checkpoint(str(path))


@pytest.mark.parametrize("preset", ["demo", "demo_cnn"])
def test_save_load_roundtrip(tmp_path, preset):
    torch.manual_seed(0)
    model = build_tokenizer(tokenizer_config(preset, image_size=32)).eval()
    path = tmp_path / "tok.pt"
    save_tokenizer(model, str(path), extra={"step": 3})
    assert os.listdir(tmp_path) == ["tok.pt"]  # the temp file was renamed away
    assert torch.load(path, weights_only=True)["step"] == 3
    loaded = load_tokenizer(str(path)).eval()
    assert loaded.config == model.config
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])


def test_load_tokenizer_mismatch_is_named(tmp_path):
    model = build_tokenizer(tokenizer_config("demo", image_size=32))
    path = tmp_path / "tok.pt"
    save_tokenizer(model, str(path))
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["codebook_size"] = 512
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight: \(1024, 16\) vs expected \(512, 16\)"):
        load_tokenizer(str(path))
    with pytest.raises(ValueError, match="reserved keys"):
        save_tokenizer(model, str(path), extra={"model": 1})
