"""diffusers AutoencoderKL layout: our KLTokenizer's state dict is the SD-VAE's key for key, computes what
diffusers computes, and SD-VAE files (safetensors / torch, current or legacy attention names) load strictly; wrong
files fail naming the keys.

diffusers_sdvae_keys.json was listed from diffusers 0.42.1 itself (make_diffusers_fixture.py), not from our model.
"""

import json
import os

import pytest
import torch

from tests.models.tokenizer.make_diffusers_fixture import fill_state, small_input
from tokpost_fast.models.tokenizer import (KLTokenizer, TokenizerConfig, build_tokenizer, load_sdvae_checkpoint,
                                           load_tokenizer, sdvae_config, tokenizer_config)
from tokpost_fast.models.tokenizer.kl_checkpoint import rename_legacy_attention
from tokpost_fast.models.tokenizer.external import load_tokenizer_spec, parse_spec

FIXTURE = os.path.join(os.path.dirname(__file__), "diffusers_sdvae_keys.json")


@pytest.fixture(scope="module")
def reference():
    with open(FIXTURE) as f:
        return json.load(f)


def shapes(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def small_config(reference, **overrides):
    small = reference["small"]
    return TokenizerConfig(arch="kl_cnn", image_size=small["image_size"], **{**small["config"], **overrides})


def test_sdvae_preset_state_dict_is_diffusers_sdvae(reference):
    with torch.device("meta"):
        model = build_tokenizer(tokenizer_config("sdvae"))
    assert isinstance(model, KLTokenizer) and model.is_continuous
    assert shapes(model) == reference["sdvae"]["keys"]
    assert list(model.state_dict()) == list(reference["sdvae"]["keys"])          # same order too
    assert sum(p.numel() for p in model.parameters()) == 83_653_863               # SD-VAE's parameter count
    assert (model.grid_size, model.latent_channels, model.scaling_factor) == (32, 4, 0.18215)


def test_small_model_computes_what_diffusers_computes(reference):
    small = reference["small"]
    model = build_tokenizer(small_config(reference)).eval()
    assert shapes(model) == small["keys"]
    model.load_state_dict(fill_state(small["keys"]), strict=True)
    with torch.no_grad():
        mean, logvar = model.encode_posterior(small_input())
        decoded = model.decode(mean)
    # fp32 vs fp32, different op order (sdpa vs baddbmm, F.pad placement): ~1e-6 relative seen
    for name, ours in (("mean", mean), ("logvar", logvar), ("decoded", decoded)):
        expected = torch.tensor(small[name]).view_as(ours)
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4, msg=name)


def write_vae_file(path, state, container=None, config=None):
    """An SD-VAE file as diffusers writes one (state dict, optionally under `container`; config.json beside)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({container: state} if container else state, path)
    if config is not None:
        (path.parent / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **config}))
    return path


@pytest.mark.parametrize("name, container", [("diffusion_pytorch_model.safetensors", None),
                                             ("vae.bin", None), ("vae.pt", "state_dict"), ("vae.ckpt", "model")])
def test_diffusers_file_loads_strictly_with_sizes_from_tensors_and_config_json(tmp_path, reference, name,
                                                                                container):
    small = reference["small"]
    state = fill_state(small["keys"])
    path = write_vae_file(tmp_path / name, state, container,
                          config={**small["config"], "scaling_factor": 0.5, "sample_size": 16})
    model = load_sdvae_checkpoint(str(path), image_size=small["image_size"])
    cfg = model.config
    assert (cfg.arch, cfg.block_out_channels, cfg.layers_per_block, cfg.latent_channels) == ("kl_cnn", [16, 32, 32],
                                                                                             2, 3)
    assert (cfg.norm_num_groups, model.scaling_factor, model.grid_size) == (8, 0.5, 4)   # from config.json
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    with torch.no_grad():
        torch.testing.assert_close(model.encode_latent(small_input()),
                                   torch.tensor(small["mean"]).view(2, 3, 4, 4), rtol=1e-4, atol=1e-4)


def test_sizes_are_read_from_the_tensors_without_config_json(tmp_path, reference):
    keys = reference["small"]["keys"]
    path = write_vae_file(tmp_path / "vae.safetensors", fill_state(keys))
    # GroupNorm's group count is not stored in the weights: SD's 32 is assumed, which 16 channels cannot take
    with pytest.raises(ValueError, match="block_out_channels"):
        load_sdvae_checkpoint(str(path), image_size=16)
    cfg = sdvae_config(fill_state(keys), image_size=16, norm_num_groups=8)
    assert (cfg.block_out_channels, cfg.layers_per_block, cfg.latent_channels, cfg.scaling_factor) == (
        [16, 32, 32], 2, 3, 0.18215)
    assert load_sdvae_checkpoint(str(path), config=cfg).config == cfg


def test_legacy_attention_names_are_renamed_on_load(tmp_path, reference):
    small = reference["small"]
    state = fill_state(small["keys"])
    legacy = {}
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for key, value in state.items():
        for new, old in renames.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy       # the renaming did happen
    assert "decoder.mid_block.attentions.0.query.bias" in legacy
    # 1x1-conv shaped attention weights, as LDM-converted files store them
    conv_key = "decoder.mid_block.attentions.0.key.weight"
    legacy[conv_key] = legacy[conv_key][:, :, None, None]
    assert rename_legacy_attention(legacy).keys() == state.keys()
    path = write_vae_file(tmp_path / "legacy.bin", legacy, config=small["config"])
    model = load_sdvae_checkpoint(str(path), image_size=16)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_both_legacy_and_current_name_is_an_error(reference):
    state = fill_state(reference["small"]["keys"])
    state["encoder.mid_block.attentions.0.query.weight"] = state["encoder.mid_block.attentions.0.to_q.weight"]
    with pytest.raises(ValueError, match="encoder.mid_block.attentions.0.to_q.weight"):
        rename_legacy_attention(state)


def test_wrong_file_names_the_missing_unexpected_and_wrong_shape_keys(tmp_path, reference):
    small = reference["small"]
    state = fill_state(small["keys"])
    del state["decoder.up_blocks.2.resnets.1.conv2.bias"]
    state["decoder.extra_head.weight"] = torch.zeros(3)
    state["decoder.up_blocks.0.upsamplers.0.conv.weight"] = torch.zeros(32, 32, 1, 1)
    path = write_vae_file(tmp_path / "wrong.safetensors", state, config=small["config"])
    with pytest.raises(ValueError) as err:
        load_sdvae_checkpoint(str(path), image_size=16)
    message = str(err.value)
    assert "decoder.up_blocks.2.resnets.1.conv2.bias" in message and "missing" in message
    assert "decoder.extra_head.weight" in message and "unexpected" in message
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight: (32, 32, 1, 1) vs expected (32, 32, 3, 3)" in message


def test_ldm_layout_is_refused_with_a_hint(tmp_path):
    path = write_vae_file(tmp_path / "ldm.pt", {"encoder.down.0.block.0.conv1.weight": torch.zeros(4, 3, 3, 3)},
                          container="state_dict")
    with pytest.raises(ValueError, match="CompVis/LDM layout"):
        load_sdvae_checkpoint(str(path))


def test_sdvae_spec_loads_and_round_trips_through_our_format(tmp_path, reference):
    small = reference["small"]
    state = fill_state(small["keys"])
    (tmp_path / "vae").mkdir()
    path = write_vae_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", state, config=small["config"])
    assert parse_spec(f"sdvae:{path}") == ("sdvae", path)
    model = load_tokenizer_spec(f"sdvae:{path}", image_size=16)
    assert isinstance(model, KLTokenizer)
    from tokpost_fast.models.tokenizer import save_tokenizer

    save_tokenizer(model, str(tmp_path / "tokenizer.pt"), extra={"weights": "imported"})
    again = load_tokenizer(str(tmp_path / "tokenizer.pt"))
    assert isinstance(again, KLTokenizer) and again.config == model.config
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(FileNotFoundError, match="no such file"):
        parse_spec(f"sdvae:{tmp_path / 'missing.safetensors'}")



INSTALL = """
import sys
from pathlib import Path
from tokpost_fast.config import ConfigError, load_config
from tokpost_fast.train import install_tokenizer
cfg = load_config(overrides=["data.image_size=16", "tokenizer.image_size=16"])
run_dir = Path(sys.argv[1])
for spec in sys.argv[2:]:
    try:
        print("installed", install_tokenizer(spec, run_dir, cfg, stage="gen"))
    except ConfigError as err:
        print("refused", err)
"""


def test_sdvae_spec_is_installed_into_the_run_dir(tmp_path, reference):
    """train.py --tokenizer sdvae:PATH (stages after main): RUN/tokenizer.pt in our format, recording its source;
    the same import again is a no-op, another file over it is refused. One process (a DeepSpeed import each)."""
    import subprocess
    import sys

    from tests.stages.conftest import REPO, launch_env

    small = reference["small"]
    state = fill_state(small["keys"])
    path = write_vae_file(tmp_path / "diffusion_pytorch_model.safetensors", state, config=small["config"])
    other_state = {**state, "quant_conv.bias": state["quant_conv.bias"] + 1}
    other = write_vae_file(tmp_path / "other.safetensors", other_state)
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", INSTALL, str(run_dir), f"sdvae:{path}", f"sdvae:{path}",
                             f"sdvae:{other}"], cwd=REPO, env=launch_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [line.split()[0] for line in result.stdout.splitlines() if line.startswith(("installed", "refused"))]
    assert outcomes == ["installed", "installed", "refused"], result.stdout
    assert "is not an import of" in result.stdout
    model = load_tokenizer(str(run_dir / "tokenizer.pt"))
    assert isinstance(model, KLTokenizer) and model.config.norm_num_groups == 8
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())      # the first file's weights
    record = torch.load(run_dir / "tokenizer.pt", weights_only=True)["imported_from"]
    assert record["kind"] == "sdvae" and record["path"] == str(path.resolve()) and len(record["sha256"]) == 64
