"""The continuous demo pipeline end to end at test size (all stages in-process, proxy features): a KL
tokenizer and a DiT, picked from the config alone, through data -> main -> gen -> cache -> post | control ->
evaluate -> report, with the same three arms and held-out metrics as the VQ pipeline; the perturbed-latent FID
labelled as our analogue; a mismatched config refused early."""

import json

import pytest
import yaml

from tests.stages.conftest import write_image_folder, write_main_config
from tests.test_pipeline import SPLIT, check_arms_report, check_no_leak
from tokpost_fast.pipeline import pipeline_stages
from tokpost_fast.pipeline import main as pipeline_main

# 32x32 -> 8x8 x 4 latents (two 2x downsamples)
TINY_KL = dict(arch="kl_cnn", image_size=32, block_out_channels=[32, 32, 32], layers_per_block=1, latent_channels=4,
               norm_num_groups=32, scaling_factor=None)
POST_STRENGTH = 0.4
PFID_NOISE = 0.25


def tiny_continuous_config(root, **replace):
    data = write_image_folder(root / "images", classes=2, per_class=12)
    path = write_main_config(
        root / "tiny_continuous.yaml", data, batch_size=4, data=SPLIT,
        perturb={"noise": 0.5},
        train={"epochs": 1, "ckpt_interval": 100, "sample_interval": 0, "log_interval": 2},
        gen={"generator": "dit", "preset": "demo_dit", "model": {"width": 32, "depth": 1, "heads": 2, "patch_size": 2},
             "global_batch_size": 8, "epochs": 2, "warmup_epochs": 0.5, "betas": [0.9, 0.999], "weight_decay": 0.0,
             "log_interval": 2, "sample_classes": 2, "sample_images": 2, "sample_steps": 2,
             "extract_batch_size": 8, "flip": False},
        cache={"post_strength": POST_STRENGTH, "denoise_steps": 4, "denoise_cfg_scale": 1.5, "shard_size": 8,
               "batch_size": 8},
        post={"global_batch_size": 4, "epochs": 1, "lr": 1e-3, "disc_lr": 1e-3, "min_lr": 1e-4,
              "warmup_epochs": 0.0, "ema_decay": 0.5, "log_interval": 2, "sample_images": 2},
        eval={"num": 8, "num_generated": 8, "batch_size": 8, "cfg_scale": 1.5, "sample_steps": 3,
              "pfid_noise": PFID_NOISE, "seeds": 2})
    raw = yaml.safe_load(path.read_text())
    raw["tokenizer"] = dict(TINY_KL)
    for section, values in replace.items():
        raw[section].update(values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.slow
def test_tiny_continuous_pipeline_end_to_end(tmp_path):
    config = tiny_continuous_config(tmp_path)
    run = tmp_path / "run"
    args = ["--config", str(config), "--run-dir", str(run), "--launcher", "inprocess", "--extractor", "proxy"]
    report = pipeline_main(args)

    for name in ("report.md", "report.json", "pfid_curve.png", "loss_curves.png", "samples_compare.png",
                 "tokenizer.pt", "generator.pt", "cache/index.json", "tokenizer_post.pt", "tokenizer_control.pt",
                 "eval/arms.json", "latents/latents.pt"):
        assert (run / name).is_file(), name
    # the stages took their settings from the config: a DiT, and a latent cache at the configured post_strength
    assert json.loads((run / "cache" / "index.json").read_text())["post_strength"] == POST_STRENGTH
    saved = json.loads((run / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["kind"] == "continuous"
    check_arms_report(run, saved)
    check_no_leak(run, config)
    assert saved["pfid_curve_axis"] == "noise" and [p["x"] for p in saved["pfid_curves"]["main"]] == [0.0, 0.5, 1.0]
    assert saved["pfid_settings"]["kind"] == "gaussian" and saved["pfid_settings"]["noise"] == PFID_NOISE
    gap = saved["mse_gap"]
    assert gap["kind"] == "latents" and gap["post_strength"] == POST_STRENGTH and gap["relative_change"] > 0
    assert set(saved["seconds"]) == {name for name, _ in pipeline_stages(1)} - {"report"}
    result = json.loads((run / "eval" / "arms.json").read_text())
    assert result["settings"]["generation_kind"] == "dit" and result["settings"]["generation"]["steps"] == 3
    text = (run / "report.md").read_text()
    assert "continuous (KL tokenizer + DiT)" in text and "gFID" in text
    assert f"perturbed-latent FID (our pFID analogue) [noise={PFID_NOISE:g}]" in text
    assert "not the paper's VQ pFID" in text and "Wall time per stage" in text

    state = json.loads((run / "pipeline.json").read_text())
    pipeline_main(args)                                           # everything done: only the report is rewritten
    again = json.loads((run / "pipeline.json").read_text())
    for name, _ in pipeline_stages(1)[:-1]:
        assert again["stages"][name] == state["stages"][name], name


def test_a_tokenizer_with_the_other_generator_is_refused_before_any_stage(tmp_path):
    config = tiny_continuous_config(tmp_path, gen={"generator": "ar", "preset": "demo", "model": {}})
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"tokenizer.arch='kl_cnn' is a continuous tokenizer, which needs "
                                         r"gen.generator: dit \(the config has 'ar'\)"):
        pipeline_main(["--config", str(config), "--run-dir", str(run), "--launcher", "inprocess"])
    assert not run.exists()
