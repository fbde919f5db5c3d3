"""The continuous pipeline through the stages: a continuous (KL) tokenizer, `--stage gen --generator dit` (latent extraction with
flips, rectified-flow training on DeepSpeed, exact resume, export, the sample CLI), the latent post-training cache
(fp16 shards, checksums, post_strength, byte-identical resume) and a 2-rank `post` that changes only the decoder.

One module-scoped tiny run (random 32x32 images, a random KL tokenizer with 8x8 x 4 latents, a 2-block DiT with
patch 2) feeds every test; untrained weights are enough for the contracts checked here."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from tests.stages.conftest import run_deepspeed, write_image_folder, write_main_config
from tokpost_fast.models.generator import load_generator
from tokpost_fast.models.tokenizer import TokenizerConfig, build_tokenizer, load_tokenizer, save_tokenizer
from tokpost_fast.sample import main as sample_main
from tokpost_fast.stages.cache import image_seed
from tokpost_fast.training.checkpoint import latest_checkpoint
from tokpost_fast.atomic import file_sha256
from tokpost_fast.data.token_cache import (INDEX, LATENT_FORMAT, CacheMismatch, LatentRows, read_shard, shard_name,
                                             verify_cache)
from tokpost_fast.train import main as train_main

# 32x32 -> 8x8 latents of 4 channels (two 2x downsamples); a scaling factor that is no power of 2, so a
# missing or doubled * / scaling_factor, or a needless round trip through it, shows
SF = 0.3
TINY_KL = dict(arch="kl_cnn", image_size=32, block_out_channels=[32, 32, 32], layers_per_block=1, latent_channels=4,
               norm_num_groups=32, scaling_factor=SF)
GEN = {"generator": "dit", "preset": "demo_dit", "model": {"width": 32, "depth": 2, "heads": 2, "patch_size": 2},
       "global_batch_size": 4, "epochs": 1, "lr": 1e-3, "warmup_epochs": 0.0, "log_interval": 1, "ckpt_interval": 2,
       "sample_classes": 2, "sample_images": 2, "sample_steps": 2, "extract_batch_size": 8}
CACHE = {"shard_size": 8, "batch_size": 4, "post_strength": 0.5, "denoise_steps": 4, "denoise_cfg_scale": 2.0,
         "seed": 3}
POST = {"global_batch_size": 4, "epochs": 2, "lr": 1e-3, "disc_lr": 1e-3, "min_lr": 1e-4, "warmup_epochs": 0.0,
        "ema_decay": 0.5, "log_interval": 1, "ckpt_interval": 100, "sample_images": 2}
SHARDS = 3          # 20 images, 8 rows per shard


def run_stage(stage, run, config, *extra):
    return train_main(["--stage", stage, "--config", str(config), "--run-dir", str(run), *map(str, extra)])


def copy_run(run: Path, to: Path, *names: str) -> Path:
    to.mkdir(parents=True)
    for name in names:
        (shutil.copytree if (run / name).is_dir() else shutil.copy2)(run / name, to / name)
    return to


@pytest.fixture(scope="module")
def continuous_run(tmp_path_factory):
    """(run folder after gen --generator dit and cache, config): 2 classes x 10 images, 5 gen steps, 3 shards."""
    root = tmp_path_factory.mktemp("continuous")
    data = write_image_folder(root / "images", classes=2, per_class=10)
    config = write_main_config(root / "kl.yaml", data, gen=dict(GEN), cache=dict(CACHE), post=dict(POST))
    raw = yaml.safe_load(config.read_text())
    raw["tokenizer"] = dict(TINY_KL)
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    run = root / "run"
    run.mkdir()
    torch.manual_seed(0)
    save_tokenizer(build_tokenizer(TokenizerConfig(**TINY_KL)), str(run / "tokenizer.pt"))
    run_stage("gen", run, config, "--generator", "dit")
    assert run_stage("cache", run, config)["complete"]
    return run, config


# --- gen -------------------------------------------------------------------------------------------------------
def test_gen_extracts_scaled_latents_with_flips_and_exports_a_dit(continuous_run):
    run, config = continuous_run
    tokenizer = load_tokenizer(str(run / "tokenizer.pt")).eval()
    data = torch.load(run / "latents" / "latents.pt", weights_only=True)
    assert data["latents"].shape == (20, 2, 4, 8, 8) and data["latents"].dtype == torch.float16
    assert data["tokenizer_hash"] == file_sha256(run / "tokenizer.pt") and data["num_classes"] == 2
    image = Image.open(run.parent / "images" / "class1" / "img003.png").convert("RGB")
    x = torch.from_numpy(__import__("numpy").array(image)).permute(2, 0, 1).float()[None] / 127.5 - 1
    with torch.no_grad():
        expected = torch.cat([tokenizer.encode_latent(x), tokenizer.encode_latent(x.flip(-1))]) * SF
    torch.testing.assert_close(data["latents"][13].float(), expected, atol=2e-3, rtol=2e-3)   # fp16 storage

    dit = load_generator(run / "generator.pt")
    assert dit.kind == "dit" and (dit.config.latent_channels, dit.config.grid_size) == (4, 8)
    assert dit.config.num_classes == 2 and dit.checkpoint_extra["tokenizer_hash"] == file_sha256(run / "tokenizer.pt")
    rows = [json.loads(line) for line in (run / "gen" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5] and all("images_per_s" in r for r in steps)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert rows[0]["model"]["kind"] == "dit"
    assert (run / "gen" / "samples" / "step-00000005.png").is_file()


def test_gen_resume_reaches_the_straight_run(continuous_run, tmp_path):
    run, config = continuous_run
    cut = copy_run(run, tmp_path / "cut", "tokenizer.pt", "latents")
    run_stage("gen", cut, config, "--generator", "dit", "--max-steps", 2)
    assert latest_checkpoint(cut / "gen").name == "step-00000002"
    run_stage("gen", cut, config, "--generator", "dit", "--resume")
    resumed, straight = (torch.load(r / "generator.pt", weights_only=True) for r in (cut, run))
    assert resumed["step"] == straight["step"] == 5
    for key, value in straight["model"].items():                        # fp32 on the CPU: bit-exact
        assert torch.equal(resumed["model"][key], value), key


def test_gen_refuses_the_wrong_generator_for_the_tokenizer(continuous_run, tmp_path):
    run, config = continuous_run
    other = copy_run(run, tmp_path / "ar", "tokenizer.pt")
    with pytest.raises(ValueError, match="continuous"):
        run_stage("gen", other, config, "--generator", "ar", "--set", "gen.preset=demo", "--set", "gen.model={}")


def test_sample_cli_decodes_dit_samples(continuous_run, tmp_path):
    run, _ = continuous_run
    out = tmp_path / "grid.png"
    sample_main(["--run-dir", str(run), "--classes", "0,1", "--num", "3", "--out", str(out), "--steps", "3",
                 "--cfg-scale", "2.0"])
    assert Image.open(out).size == (3 * 34 + 2, 2 * 34 + 2)
    with pytest.raises(SystemExit):
        sample_main(["--run-dir", str(run), "--classes", "0", "--out", str(tmp_path / "x.png"), "--temperature", "2"])


# --- cache -----------------------------------------------------------------------------------------------------
def test_cache_shards_hold_fp16_denoised_latents_with_checksums(continuous_run):
    run, _ = continuous_run
    index = json.loads((run / "cache" / INDEX).read_text())
    assert index["format"] == LATENT_FORMAT and index["dtype"] == "float16" and index["post_strength"] == 0.5
    assert index["settings"]["post_strength"] == 0.5 and index["settings"]["denoise_steps"] == 4
    assert [e["rows"] for e in index["shards"]] == [8, 8, 4]
    assert index["generator"]["sha256"] == file_sha256(run / "generator.pt")
    verify_cache(run / "cache", file_sha256(run / "tokenizer.pt"), index["settings"])   # every sha256 matches

    from safetensors import safe_open

    with safe_open(str(run / "cache" / shard_name(1)), "pt") as f:
        assert f.get_slice("latents").get_dtype() == "F16" and f.get_slice("latents").get_shape() == [8, 4, 8, 8]
    rows, meta = read_shard(run / "cache" / shard_name(1))
    assert isinstance(rows, LatentRows) and meta["settings"] == index["settings"]
    assert rows.sample_index.tolist() == list(range(8, 16)) and rows.relative_paths[0] == "class0/img008.png"
    assert rows.seed.tolist() == [image_seed(3, i) for i in range(8, 16)]            # one noise seed per image
    assert torch.isfinite(rows.latents.float()).all() and not torch.equal(rows.latents, rows.gt_latents)
    tokenizer = load_tokenizer(str(run / "tokenizer.pt")).eval()
    with torch.no_grad():
        assert torch.isfinite(tokenizer.decode(rows.latents.float())).all()


def test_cache_rows_are_the_dit_denoising_of_the_real_latent(continuous_run):
    """Row 5 recomputed by hand: encode, scale, denoise_from with the image's own seeded noise, unscale."""
    from tokpost_fast.models.generator import denoise_from

    run, _ = continuous_run
    rows, _ = read_shard(run / "cache" / shard_name(0))
    tokenizer, dit = load_tokenizer(str(run / "tokenizer.pt")).eval(), load_generator(run / "generator.pt").eval()
    image = Image.open(run.parent / "images" / rows.relative_paths[5]).convert("RGB")
    x = torch.from_numpy(__import__("numpy").array(image)).permute(2, 0, 1).float()[None] / 127.5 - 1
    noise = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(int(rows.seed[5])))[None]
    with torch.no_grad():
        z = tokenizer.encode_latent(x)
        x0 = denoise_from(dit, z * SF, rows.label[5:6], 0.5, steps=4, cfg_scale=2.0, noise=noise)
    torch.testing.assert_close(rows.gt_latents[5:6].float(), z, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(rows.latents[5:6].float(), x0 / SF, atol=2e-3, rtol=2e-3)


def test_interrupted_cache_resumes_to_the_bytes_of_a_clean_run(continuous_run, tmp_path):
    run, config = continuous_run
    cut = copy_run(run, tmp_path / "cut", "tokenizer.pt", "generator.pt")
    assert not run_stage("cache", cut, config, "--max-steps", 1)["complete"]
    assert run_stage("cache", cut, config)["complete"]
    for s in range(SHARDS):
        assert (cut / "cache" / shard_name(s)).read_bytes() == (run / "cache" / shard_name(s)).read_bytes()
    assert json.loads((cut / "cache" / INDEX).read_text())["shards"] == \
        json.loads((run / "cache" / INDEX).read_text())["shards"]


def test_strength_zero_stores_the_real_latent_and_post_refuses_other_settings(continuous_run, tmp_path):
    run, config = continuous_run
    zero = copy_run(run, tmp_path / "zero", "tokenizer.pt", "generator.pt")
    run_stage("cache", zero, config, "--post-strength", 0, "--max-steps", 1)
    rows, meta = read_shard(zero / "cache" / shard_name(0))
    assert meta["settings"]["post_strength"] == 0.0 and torch.equal(rows.latents, rows.gt_latents)

    other = copy_run(run, tmp_path / "other", "tokenizer.pt", "generator.pt", "cache")
    with pytest.raises(CacheMismatch, match="post_strength"):
        run_stage("post", other, config, "--post-strength", 0.9)


def test_cache_refuses_an_ar_generator_for_a_continuous_tokenizer(continuous_run, tmp_path):
    from tokpost_fast.models.generator import build_generator, generator_config, save_generator

    run, config = continuous_run
    other = copy_run(run, tmp_path / "ar", "tokenizer.pt")
    gpt = build_generator(generator_config("demo", width=32, depth=1, heads=2, vocab_size=64, seq_len=64))
    save_generator(gpt, other / "generator.pt", extra={"tokenizer_hash": file_sha256(other / "tokenizer.pt")})
    with pytest.raises(ValueError, match="'ar' generator, but the tokenizer is continuous"):
        run_stage("cache", other, config)


# --- post --------------------------------------------------------------------------------------------------------
def test_post_objective_decodes_the_cached_latents_or_reencodes(continuous_run):
    from types import SimpleNamespace

    from tokpost_fast.stages.post import PostObjective, decode_inputs

    run, _ = continuous_run
    tokenizer = load_tokenizer(str(run / "tokenizer.pt")).eval()
    rows, _ = read_shard(run / "cache" / shard_name(0))
    holder = SimpleNamespace(tokenizer=tokenizer)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        recon, q, z = PostObjective.reconstruct(holder, images, rows.latents[:2].to(torch.float16))
        assert q is None and torch.equal(z, rows.latents[:2].float())
        torch.testing.assert_close(recon, tokenizer.decode(rows.latents[:2].float()))
        torch.testing.assert_close(decode_inputs(tokenizer, rows.latents[:2]), recon)
        recon, q, z = PostObjective.reconstruct(holder, images, rows.latents[:2], images)          # "reencode"
        torch.testing.assert_close(z, tokenizer.encode_latent(images))
        torch.testing.assert_close(recon, tokenizer.decode(z))


# --- post (2 ranks) ----------------------------------------------------------------------------------------------
def split_state(path: Path):
    state = torch.load(path, weights_only=True)["model"]
    encoder = {k: v for k, v in state.items() if k.startswith(("encoder.", "quant_conv."))}
    decoder = {k: v for k, v in state.items() if k.startswith(("decoder.", "post_quant_conv."))}
    assert len(encoder) + len(decoder) == len(state)
    return encoder, decoder


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not Path(sys.executable).with_name("deepspeed").exists(), reason="deepspeed launcher missing")
def test_two_rank_post_training_on_latents_changes_only_the_decoder(continuous_run, tmp_path):
    run, config = continuous_run
    post_run = copy_run(run, tmp_path / "post", "tokenizer.pt", "generator.pt", "cache")
    original_sha = file_sha256(post_run / "tokenizer.pt")
    done = run_deepspeed(["--stage", "post", "--config", config, "--run-dir", post_run], timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    assert file_sha256(post_run / "tokenizer.pt") == original_sha
    enc0, dec0 = split_state(post_run / "tokenizer.pt")
    enc1, dec1 = split_state(post_run / "tokenizer_post.pt")
    assert all(torch.equal(enc0[k], enc1[k]) for k in enc0)
    assert any(not torch.equal(dec0[k], dec1[k]) for k in dec0)
    assert load_tokenizer(str(post_run / "tokenizer_post.pt")).is_continuous
    rows = [json.loads(line) for line in (post_run / "post" / "log.jsonl").read_text().splitlines()]
    start = rows[0]
    assert start["event"] == "start" and start["world_size"] == 2 and start["local_batch"] == 2
    assert start["trainable"] and not any(n.startswith(("encoder.", "quant_conv.")) for n in start["trainable"])
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))                 # 2 epochs x 20 rows // 4
    assert all("kl_loss" not in r and "codebook_loss" not in r for r in steps)    # nothing upstream trains
    assert steps[-1]["nan_skipped"] == 0 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert (post_run / "post" / "samples" / "final.png").is_file()


def test_gen_config_checks_the_dit_fields():
    from tokpost_fast.config.gen import GenStageConfig

    assert GenStageConfig(generator="dit").preset == "demo_dit" and GenStageConfig().preset == "demo"
    with pytest.raises(ValueError, match="gen.preset"):
        GenStageConfig(generator="dit", preset="demo")                # an AR preset
    with pytest.raises(ValueError, match="grid_size"):
        GenStageConfig(generator="dit", model={"grid_size": 8})       # comes from the tokenizer
    with pytest.raises(ValueError, match="gen.generator"):
        GenStageConfig(generator="maskgit")
    with pytest.raises(ValueError, match="DiTConfig.heads"):
        GenStageConfig(generator="dit", model={"heads": 5})          # the model's own checks, at config time
    GenStageConfig(generator="dit", model={"patch_size": 3})           # fits a 12x12 grid: checked at run time
