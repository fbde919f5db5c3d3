"""evaluate_run end to end: metrics.json contents and labels, the real-statistics cache, the generative metrics,
and bad input as one-line errors."""

import json
import re

import pytest
import torch

from tokpost_fast.metrics import evaluate_run
from tokpost_fast.report import format_table


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, trained_tokenizer):
    from tokpost_fast.models.generator import GeneratorConfig, build_generator, save_generator
    from tokpost_fast.models.tokenizer import save_tokenizer

    folder = tmp_path_factory.mktemp("run")
    save_tokenizer(trained_tokenizer, str(folder / "tokenizer.pt"))
    torch.manual_seed(0)
    gpt = build_generator(GeneratorConfig(vocab_size=64, seq_len=64, num_classes=3, width=32, depth=1, heads=2,
                                          mlp_ratio=2.0, attn_backend="sdpa"))
    save_generator(gpt, folder / "generator.pt")
    return folder


def test_metrics_json_and_cache(run_dir, photos):
    kwargs = dict(images=photos[:40], num=32, progress=False, pfid_delta=10, extractor="proxy")
    first = evaluate_run(run_dir, metrics="rfid,pfid", generator=False, **kwargs)
    table = format_table(first)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved == first
    assert set(first["values"]) == {f"{m}{k}_proxy" for m in ("rfid", "pfid") for k in ("", "_kid", "_kid_std")}
    assert first["proxy"] is True and first["extractor"]["weights"] == "proxy"
    assert first["values"]["pfid_kid_proxy"] > first["values"]["rfid_kid_proxy"] > 0
    assert first["values"]["pfid_proxy"] > first["values"]["rfid_proxy"] > 0
    assert first["num"]["real"] == 32
    assert first["settings"]["pfid"] == {"alpha": 1.0, "delta": 10, "seed": 0, "beta": 1.0, "metric": "cosine"}
    assert len(first["checkpoints"]["tokenizer"]["sha256"]) == 64
    assert "(PROXY)" in table and "rFID (proxy)" in table and "pFID (proxy) [alpha=1, delta=10]" in table
    assert not first["real_stats"]["cached"]

    again = evaluate_run(run_dir, metrics="rfid", generator=False, **kwargs)
    assert again["real_stats"]["cached"] and again["real_stats"]["path"] == first["real_stats"]["path"]
    assert again["values"]["rfid_proxy"] == first["values"]["rfid_proxy"]
    other = evaluate_run(run_dir, metrics="rfid", generator=False,
                         **{**kwargs, "images": photos[40:80]})
    assert not other["real_stats"]["cached"]  # another dataset, another fingerprint


def test_generative_metrics(run_dir, photos):
    result = evaluate_run(run_dir, metrics="gfid,is,prec,rec,kid", images=photos[:16], num_generated=12,
                          batch_size=8, out=run_dir / "gen.json", progress=False,
                          extractor="proxy")
    values = result["values"]
    assert set(values) == {"gfid_proxy", "gfid_kid_proxy", "gfid_kid_std_proxy", "is_proxy", "is_std_proxy",
                           "prec_proxy", "rec_proxy", "kid_proxy", "kid_std_proxy"}
    assert values["gfid_proxy"] > 0 and values["is_proxy"] >= 1.0 and 0 <= values["prec_proxy"] <= 1
    # one KID of the generated images (same features, same seed), reported beside gFID and as "kid"
    assert (values["kid_proxy"], values["kid_std_proxy"]) == (values["gfid_kid_proxy"], values["gfid_kid_std_proxy"])
    assert result["num"] == {"real": 16, "generated": 12}
    assert len(result["checkpoints"]["generator"]["sha256"]) == 64
    assert result["settings"]["generation"]["class_balanced"]


def test_missing_generator_is_skipped_with_a_message(tmp_path, trained_tokenizer, photos):
    result = evaluate_run(tmp_path, metrics="rfid,gfid,is", tokenizer=trained_tokenizer, images=photos[:8],
                          progress=False, extractor="proxy")
    assert set(result["values"]) == {"rfid_proxy", "rfid_kid_proxy", "rfid_kid_std_proxy"}
    assert result["skipped"]["gfid"].startswith("no generator checkpoint at") and "is" in result["skipped"]
    table = format_table(result)
    assert re.search(r"\ngFID, IS \(proxy\) +skipped: no generator checkpoint", table), table
    assert re.search(r"\nrFID KID \(proxy\) +\d", table)
    assert re.search(r"\nrFID KID std \(subsets\) \(proxy\) +\d", table)


@pytest.mark.parametrize("case, match", [
    ("one image", "at least 2 images, got 1"),
    ("num 1", r"eval.num=1: FID needs at least 2 images"),
    ("sizes", "images of different sizes: 3x16x16 then 3x8x8"),
    ("metric", r"--metrics: unknown \['xfid'\]"),
    ("alpha", r"pfid_alpha=1.5: must be in \[0, 1\]"),
    ("delta", r"--pfid-delta must be an integer in \[1, K=64\], got 65"),
])
def test_bad_input_is_a_one_line_error(tmp_path, trained_tokenizer, photos, case, match):
    kwargs = dict(tokenizer=trained_tokenizer, images=photos[:8], metrics="rfid", progress=False,
                  extractor="proxy")
    if case == "one image":
        kwargs["images"] = photos[:1]
    elif case == "num 1":
        kwargs["num"] = 1
    elif case == "sizes":
        kwargs["images"] = [photos[:4], torch.nn.functional.avg_pool2d(photos[4:8], 2)]
    elif case == "metric":
        kwargs["metrics"] = "rfid,xfid"
    elif case == "alpha":
        kwargs.update(metrics="pfid", pfid_alpha=1.5)
    elif case == "delta":
        kwargs.update(metrics="pfid", pfid_delta=65)
    with pytest.raises(ValueError, match=match) as err:
        evaluate_run(tmp_path, **kwargs)
    assert "\n" not in str(err.value)


def test_cli_on_an_image_folder(run_dir, photos, tmp_path, capsys):
    """`python -m tokpost_fast.evaluate` in-process: real images from the run config's ImageFolder, its held-out
    split only (data.val_fraction 0.8: 8 of each class's 10 images)."""
    from PIL import Image

    from tokpost_fast.evaluate import main

    root = tmp_path / "images"
    for i, image in enumerate(((photos[:20] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / f"class{i % 2}" / f"{i:03d}.png")
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"data: {{root: '{root}', image_size: 16, batch_size: 8, num_workers: 0, backend: torch, val_fraction: 0.8}}\n"
        "tokenizer: {arch: vq_cnn, image_size: 16, ch: 32, ch_mult: [1, 2], num_res_blocks: 1, z_channels: 32,\n"
        "            codebook_size: 64, codebook_embed_dim: 8}\n"
        "perturb: {delta: 64}\n")
    out = tmp_path / "metrics.json"
    result = main(["--run-dir", str(run_dir), "--config", str(config), "--metrics", "rfid,pfid", "--num", "16",
                   "--pfid-alpha", "0.5", "--extractor", "proxy", "--out", str(out), "--no-progress",
                   "--stats-dir", str(tmp_path / "st")])
    assert json.loads(out.read_text()) == result
    assert result["num"]["real"] == 16 and result["settings"]["pfid"]["alpha"] == 0.5
    assert result["settings"]["pfid"]["delta"] == 64
    assert result["checkpoints"]["tokenizer"]["path"] == str(run_dir / "tokenizer.pt")
    assert "pFID (proxy) [alpha=0.5, delta=64]" in capsys.readouterr().out
    again = main(["--run-dir", str(run_dir), "--config", str(config), "--metrics", "rfid", "--num", "16",
                  "--extractor", "proxy", "--out", str(out), "--no-progress", "--stats-dir", str(tmp_path / "st")])
    assert again["real_stats"]["cached"] and again["values"]["rfid_proxy"] == result["values"]["rfid_proxy"]


def test_generator_of_another_tokenizer_is_refused(tmp_path, trained_tokenizer, photos):
    """The gen stage records the tokenizer's sha256 in generator.pt: evaluate refuses another tokenizer, and
    accepts a post-trained export of the right one (its file records the tokenizer it came from)."""
    from tokpost_fast.models.generator import GeneratorConfig, build_generator, save_generator
    from tokpost_fast.models.tokenizer import save_tokenizer
    from tokpost_fast.atomic import file_sha256

    save_tokenizer(trained_tokenizer, str(tmp_path / "tokenizer.pt"))
    gpt = build_generator(GeneratorConfig(vocab_size=64, seq_len=64, num_classes=3, width=32, depth=1, heads=2,
                                          mlp_ratio=2.0, attn_backend="sdpa"))
    save_generator(gpt, tmp_path / "generator.pt", extra={"tokenizer_hash": "0" * 64})
    kwargs = dict(metrics="gfid", images=photos[:8], num_generated=4, batch_size=4, progress=False,
                  extractor="proxy")
    with pytest.raises(ValueError, match="is not the tokenizer this generator was trained on"):
        evaluate_run(tmp_path, **kwargs)

    original = file_sha256(tmp_path / "tokenizer.pt")
    save_generator(gpt, tmp_path / "generator.pt", extra={"tokenizer_hash": original})
    save_tokenizer(trained_tokenizer, str(tmp_path / "tokenizer_post.pt"),
                   extra={"source_tokenizer": {"path": "tokenizer.pt", "sha256": original}})
    result = evaluate_run(tmp_path, tokenizer=tmp_path / "tokenizer_post.pt", **kwargs)
    assert result["values"]["gfid_proxy"] > 0
