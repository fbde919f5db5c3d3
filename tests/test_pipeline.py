"""The demo pipeline end to end at test size (all stages in-process, proxy features for speed): three arms (main,
control, post) from one tokenizer and generator, every metric on the held-out split with two seeds, the report
with the post - control effect, and a re-run that skips every finished stage (or only re-evaluates)."""

import json

import pytest
import torch

from tests.stages.conftest import write_image_folder, write_main_config
from tokpost_fast.config import load_config
from tokpost_fast.metrics import arms
from tokpost_fast.models.tokenizer import load_tokenizer
from tokpost_fast.pipeline import pipeline_stages
from tokpost_fast.pipeline import main as pipeline_main

SPLIT = {"val_fraction": 0.34}      # 4 of each class's 12 images held out: 8 val, 16 train


def tiny_pipeline_config(root):
    data = write_image_folder(root / "images", classes=2, per_class=12)
    return write_main_config(
        root / "tiny.yaml", data, batch_size=4, data=SPLIT,
        train={"epochs": 1, "ckpt_interval": 100, "sample_interval": 0, "log_interval": 2},
        gen={"preset": "demo", "model": {"width": 32, "depth": 1, "heads": 2}, "global_batch_size": 8, "epochs": 2,
             "warmup_epochs": 0.5, "log_interval": 2, "sample_classes": 2, "sample_images": 2,
             "extract_batch_size": 8, "flip": False},
        cache={"sigma": 0.5, "shard_size": 8, "batch_size": 8, "cfg_scale": 1.5, "cfg_power": 1.0},
        post={"global_batch_size": 4, "epochs": 1, "lr": 1e-3, "disc_lr": 1e-3, "min_lr": 1e-4,
              "warmup_epochs": 0.0, "ema_decay": 0.5, "log_interval": 2, "sample_images": 2},
        eval={"num": 8, "num_generated": 8, "batch_size": 8, "cfg_scale": 1.5, "cfg_power": 1.0, "seeds": 2})


def check_arms_report(run, saved):
    """What both pipelines' reports must hold: three arms, effects with their draws, the held-out split."""
    assert saved["proxy"] is True and saved["seeds"] == [0, 1]
    assert set(saved["summary"]) == {"main", "control", "post"}
    for arm in saved["summary"].values():
        assert set(arm) == {"rfid", "pfid", "gfid"}
        assert arm["gfid"]["fid"]["n"] == 2 and arm["rfid"]["fid"]["n"] == 1 and arm["gfid"]["kid"]["n"] == 2
    assert {m: e["n"] for m, e in saved["effects"].items()} == {"rfid": 1, "pfid": 2, "gfid": 2}
    assert saved["split"]["val_images"] == 8 and saved["split"]["train_images"] == 16
    assert saved["num"] == {"real": 8, "generated": 8}
    result = json.loads((run / "eval" / "arms.json").read_text())
    main, control, post = (result["arms"][a][0] for a in ("main", "control", "post"))
    assert len({main["sha256"], control["sha256"], post["sha256"]}) == 3        # three different decoders
    assert result["mse_gap"]["split"] == "val" and set(result["mse_gap"]["arms"]) == {"main", "control", "post"}
    # the arms decoded the very same generated samples, one file per seed
    for seed in (0, 1):
        assert (run / "eval" / f"samples-seed{seed}.pt").is_file()
    grids = {json.loads(line).get("grids") for arm in ("post", "control")
             for line in (run / arm / "log.jsonl").read_text().splitlines() if '"start"' in line}
    assert grids == {"generated", "clean"}
    text = (run / "report.md").read_text()
    assert "| metric | main | control | post | post - control | noise |" in text
    assert "PROXY" in text and "Held-out images: **8**" in text and "post-training seed" in text


def check_no_leak(run, config):
    """The cache (and so post-training) holds train images only; the val images are what the metrics read."""
    from tokpost_fast.data import ImageFolderDataset
    from tokpost_fast.data.token_cache import load_rows, read_index

    cfg = load_config(run / "pipeline_config.yaml")
    val = {p for p, _ in ImageFolderDataset(cfg.data, train=False, split="val").samples}
    rows = load_rows(run / "cache", read_index(run / "cache"))
    assert len(rows.relative_paths) == 16 and not set(rows.relative_paths) & val


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_and_rerun_skips(tmp_path, monkeypatch):
    config = tiny_pipeline_config(tmp_path)
    run = tmp_path / "run"
    args = ["--config", str(config), "--run-dir", str(run), "--launcher", "inprocess", "--extractor", "proxy"]
    report = pipeline_main(args)

    for name in ("report.md", "report.json", "pfid_curve.png", "loss_curves.png", "samples_main.png",
                 "samples_control.png", "samples_post.png", "samples_compare.png", "tokenizer.pt", "generator.pt",
                 "cache/index.json", "tokenizer_post.pt", "tokenizer_control.pt", "eval/arms.json",
                 "codebook_usage.png"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    check_arms_report(run, saved)
    check_no_leak(run, config)
    assert [p["x"] for p in saved["pfid_curves"]["post"]] == [0.0, 0.5, 1.0]
    usage, grid = saved["codebook_usage"], load_config(run / "pipeline_config.yaml").tokenizer.grid_size
    assert usage["tokenizer_val"]["images"] == 8 and usage["tokenizer_val"]["split"] == "val"
    assert usage["cache"]["rows"] == 16
    assert usage["cache"]["generated"]["tokens"] == usage["cache"]["clean"]["tokens"] == 16 * grid ** 2
    assert 0.2 < usage["cache"]["resampled_fraction"] < 0.8           # keep-mask ~ Bernoulli(sigma = 0.5)
    assert "## Codebook usage" in (run / "report.md").read_text()
    assert set(saved["seconds"]) == {name for name, _ in pipeline_stages(1)} - {"report"}
    assert all(t["load_average"] is not None for t in saved["timing"].values())
    # the control arm's decoder read the clean grids: its exported weights differ from the method's
    post = torch.load(run / "tokenizer_post.pt", weights_only=False)
    assert post["post_config"]["grids"] == "generated" and post["post_config"]["name"] == "post"
    assert torch.load(run / "tokenizer_control.pt", weights_only=False)["post_config"]["grids"] == "clean"

    state = json.loads((run / "pipeline.json").read_text())
    pipeline_main(args)                                           # everything done: only the report is rewritten
    again = json.loads((run / "pipeline.json").read_text())
    for name, _ in pipeline_stages(1)[:-1]:
        assert again["stages"][name] == state["stages"][name], name
    first = json.loads((run / "eval" / "arms.json").read_text())
    assert len(list((run / "eval").glob("draws-*.json"))) == 3    # one per checkpoint: the stage resumes from them
    loaded = []                                                   # every checkpoint is read once per evaluation
    monkeypatch.setattr(arms, "load_tokenizer", lambda path, *a, **kw: loaded.append(path) or load_tokenizer(path))
    pipeline_main(args + ["--seeds", "1"])                        # other evaluation settings: only evaluate reruns
    assert sorted(loaded) == sorted(str(run / f"tokenizer{s}.pt") for s in ("", "_control", "_post"))
    third = json.loads((run / "pipeline.json").read_text())
    assert third["stages"]["evaluate"] != state["stages"]["evaluate"]
    assert third["stages"]["post"] == state["stages"]["post"]
    assert json.loads((run / "report.json").read_text())["seeds"] == [0]
    assert json.loads((run / "eval" / "arms.json").read_text())["arms"]["post"][0]["gfid"] == \
        first["arms"]["post"][0]["gfid"][:1]                      # seed 0's draw, reused

    with pytest.raises(SystemExit, match="another config"):
        pipeline_main(args + ["--set", "post.lr=2e-3"])
