"""The demo pipeline end to end at test size (all stages in-process): report.md / report.json / PNGs, the before /
after comparison on the same generator, and a re-run that skips every finished stage."""

import json

import pytest

from tests.stages.conftest import write_image_folder, write_main_config
from tokpost_fast.pipeline import STAGES
from tokpost_fast.pipeline import main as pipeline_main


def tiny_pipeline_config(root):
    data = write_image_folder(root / "images", classes=2, per_class=12)
    return write_main_config(
        root / "tiny.yaml", data, batch_size=4,
        train={"epochs": 1, "ckpt_interval": 100, "sample_interval": 0, "log_interval": 2},
        gen={"preset": "demo", "model": {"width": 32, "depth": 1, "heads": 2}, "global_batch_size": 8, "epochs": 2,
             "warmup_epochs": 0.5, "log_interval": 2, "sample_classes": 2, "sample_images": 2,
             "extract_batch_size": 8, "flip": False},
        cache={"sigma": 0.5, "shard_size": 8, "batch_size": 8, "cfg_scale": 1.5, "cfg_power": 1.0},
        post={"global_batch_size": 4, "epochs": 1, "lr": 1e-3, "disc_lr": 1e-3, "min_lr": 1e-4,
              "warmup_epochs": 0.0, "ema_decay": 0.5, "log_interval": 2, "sample_images": 2},
        eval={"num": 8, "num_generated": 8, "batch_size": 8, "cfg_scale": 1.5, "cfg_power": 1.0})


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_and_rerun_skips(tmp_path):
    config = tiny_pipeline_config(tmp_path)
    run = tmp_path / "run"
    args = ["--config", str(config), "--run-dir", str(run), "--launcher", "inprocess"]
    report = pipeline_main(args)

    for name in ("report.md", "report.json", "pfid_curve.png", "loss_curves.png", "samples_before.png",
                 "samples_after.png", "samples_compare.png", "tokenizer.pt", "generator.pt", "cache/index.json",
                 "tokenizer_post.pt", "eval/before/metrics.json", "eval/after/metrics.json"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "report.json").read_text())
    assert saved["proxy"] is True and set(saved["metrics"]) == {"rfid", "pfid", "gfid"}
    for values in saved["metrics"].values():
        assert values["before"] is not None and values["after"] is not None
    assert [p["alpha"] for p in saved["pfid_curves"]["before"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert set(saved["seconds"]) == {name for name, _ in STAGES} - {"report"}
    assert report["metrics"] == saved["metrics"]
    before, after = (json.loads((run / "eval" / w / "metrics.json").read_text()) for w in ("before", "after"))
    assert before["checkpoints"]["generator"]["sha256"] == after["checkpoints"]["generator"]["sha256"]
    assert before["settings"]["generation"] == after["settings"]["generation"]
    text = (run / "report.md").read_text()
    assert "PROXY" in text and "gFID" in text and "Wall time per stage" in text

    state = json.loads((run / "pipeline.json").read_text())
    pipeline_main(args)                                           # everything done: only the report is rewritten
    again = json.loads((run / "pipeline.json").read_text())
    for name, _ in STAGES[:-1]:
        assert again["stages"][name] == state["stages"][name], name

    with pytest.raises(SystemExit, match="another config"):
        pipeline_main(args + ["--set", "post.lr=2e-3"])
