"""Stage `post` (METHOD.md A5.2): a 2-rank DeepSpeed ZeRO-2 run on the CPU from a tiny cache that ends with
tokenizer_post.pt (encoder and codebook bit-equal to tokenizer.pt, decoder changed); the re-encode variant; and an
off-the-shelf tokenizer in LlamaGen's layout (--tokenizer llamagen:PATH) through gen, cache, post and evaluate."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.stages.conftest import run_deepspeed
from tests.stages.tiny_run import build_tiny_run, copy_run
from tokpost_fast.config import ConfigError
from tokpost_fast.models.tokenizer import TokenizerConfig, build_tokenizer, load_tokenizer
from tokpost_fast.training.checkpoint import latest_checkpoint
from tokpost_fast.atomic import file_sha256
from tokpost_fast.data.token_cache import INDEX, shard_name
from tokpost_fast.train import main as train_main
from tokpost_fast.training.engine import NonFiniteLossError

REPO = Path(__file__).resolve().parents[2]
LLAMAGEN_KEYS = REPO / "tests" / "models" / "tokenizer" / "llamagen_state_keys.json"


def split_state(path: Path):
    """(encoder + quant_conv, codebook, decoder + post_quant_conv) tensors of a saved tokenizer."""
    state = torch.load(path, weights_only=True)["model"]
    encoder = {k: v for k, v in state.items() if k.startswith(("encoder.", "quant_conv."))}
    codebook = {k: v for k, v in state.items() if k.startswith("quantize.")}
    decoder = {k: v for k, v in state.items() if k.startswith(("decoder.", "post_quant_conv."))}
    assert len(encoder) + len(codebook) + len(decoder) == len(state)
    return encoder, codebook, decoder


def assert_post_export(run: Path, original_sha: str) -> None:
    assert file_sha256(run / "tokenizer.pt") == original_sha              # never written over
    enc0, cb0, dec0 = split_state(run / "tokenizer.pt")
    enc1, cb1, dec1 = split_state(run / "tokenizer_post.pt")
    assert all(torch.equal(enc0[k], enc1[k]) for k in enc0)
    assert all(torch.equal(cb0[k], cb1[k]) for k in cb0)
    assert any(not torch.equal(dec0[k], dec1[k]) for k in dec0)
    export = torch.load(run / "tokenizer_post.pt", weights_only=True)
    assert export["source_tokenizer"]["sha256"] == original_sha
    assert export["cache_index_sha256"] == file_sha256(run / "cache" / INDEX)
    load_tokenizer(str(run / "tokenizer_post.pt"))                          # loads as a tokenizer


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    run, config = build_tiny_run(tmp_path_factory.mktemp("post"))
    train_main(["--stage", "cache", "--config", str(config), "--run-dir", str(run)])
    return run, config


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not Path(sys.executable).with_name("deepspeed").exists(), reason="deepspeed launcher missing")
def test_two_rank_post_training_changes_only_the_decoder(cached, tmp_path):
    run, config = cached
    original_sha = file_sha256(run / "tokenizer.pt")
    done = run_deepspeed(["--stage", "post", "--config", config, "--run-dir", run, "--set", "post.ckpt_interval=3"],
                         timeout=240)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert_post_export(run, original_sha)

    ckpt = latest_checkpoint(run / "post")
    assert ckpt.name == "step-00000010"                                     # 2 epochs x 20 rows // 4
    assert len(list((ckpt / "decoder" / "ds").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    rows = [json.loads(line) for line in (run / "post" / "log.jsonl").read_text().splitlines()]
    start = rows[0]
    assert start["event"] == "start" and start["world_size"] == 2 and start["local_batch"] == 2
    assert not any(name.startswith(("encoder.", "quantize.", "quant_conv.")) for name in start["trainable"])
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert all("disc_loss" in r and "codebook_loss" not in r for r in steps)       # GAN from step 0
    assert (run / "post" / "samples" / "final.png").is_file()


def test_reencode_input_and_a_trainable_codebook(cached, tmp_path):
    run, config = cached
    other = tmp_path / "reencode"
    other.mkdir()
    for name in ("tokenizer.pt", "generator.pt"):
        (other / name).write_bytes((run / name).read_bytes())
    import shutil

    shutil.copytree(run / "cache", other / "cache")
    train_main(["--stage", "post", "--config", str(config), "--run-dir", str(other), "--max-steps", "2",
                "--set", "post.input=reencode", "--set", "post.train_codebook=true"])
    start = json.loads((other / "post" / "log.jsonl").read_text().splitlines()[0])
    assert start["input"] == "reencode" and "quantize.embedding.weight" in start["trainable"]
    enc0, cb0, _ = split_state(other / "tokenizer.pt")
    enc1, cb1, _ = split_state(other / "tokenizer_post.pt")
    assert all(torch.equal(enc0[k], enc1[k]) for k in enc0)
    assert not torch.equal(cb0["quantize.embedding.weight"], cb1["quantize.embedding.weight"])


@pytest.mark.slow
def test_resume_continues_exactly(cached, tmp_path):
    """4 steps, --resume to 10 == 10 straight (1 rank, in-process): same export, same logged losses."""
    import shutil

    run, config = cached
    runs = {}
    for name in ("straight", "split"):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        for item in ("tokenizer.pt", "generator.pt"):
            shutil.copy2(run / item, runs[name] / item)
        shutil.copytree(run / "cache", runs[name] / "cache")
    common = ["--stage", "post", "--config", str(config), "--set", "post.ckpt_interval=100"]
    train_main(common + ["--run-dir", str(runs["straight"])])
    train_main(common + ["--run-dir", str(runs["split"]), "--max-steps", "4"])
    assert latest_checkpoint(runs["split"] / "post").name == "step-00000004"
    train_main(common + ["--run-dir", str(runs["split"]), "--resume"])
    a, b = (torch.load(runs[n] / "tokenizer_post.pt", weights_only=True) for n in ("straight", "split"))
    assert a["step"] == b["step"] == 10
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-5, atol=1e-6, msg=key)
    losses = [[r["loss"] for r in map(json.loads, (runs[n] / "post" / "log.jsonl").read_text().splitlines())
               if "loss" in r] for n in ("straight", "split")]
    assert len(losses[0]) == len(losses[1]) == 10 and losses[1] == pytest.approx(losses[0], rel=1e-5)


# --- off-the-shelf: LlamaGen's VQ layout ------------------------------------------------------------------------
TINY_CNN = dict(arch="vq_cnn", image_size=32, codebook_size=64, codebook_embed_dim=8, ch=32, ch_mult=[1, 1, 2],
                num_res_blocks=1, z_channels=32)


def key_pattern(key: str) -> str:
    return re.sub(r"\.\d+\.", ".#.", re.sub(r"\.\d+\.", ".#.", key))


def write_llamagen_checkpoint(path: Path) -> Path:
    """A LlamaGen-style VQ file: {"model": state_dict} with LlamaGen's key names (as vq_ds16_c2i.pt)."""
    torch.manual_seed(1)
    state = build_tokenizer(TokenizerConfig(**TINY_CNN)).state_dict()
    reference = {key_pattern(k) for k in json.loads(LLAMAGEN_KEYS.read_text())["vq16"]["keys"]}
    assert {key_pattern(k) for k in state} <= reference        # the same layout as LlamaGen's VQ-16, smaller
    torch.save({"model": state, "args": {"note": "written by the test"}}, path)
    return path


@pytest.mark.slow
def test_llamagen_checkpoint_runs_gen_cache_post_and_evaluate(tmp_path):
    from tests.stages.conftest import write_image_folder, write_main_config
    from tokpost_fast.evaluate import main as evaluate_main

    checkpoint = write_llamagen_checkpoint(tmp_path / "vq_tiny_c2i.pt")
    data = write_image_folder(tmp_path / "images", classes=2, per_class=8)
    tokenizer = {k: v for k, v in TINY_CNN.items()}
    config = write_main_config(
        tmp_path / "cnn.yaml", data, tokenizer=tokenizer, data={"val_fraction": 0.25},   # 4 held-out images
        gen={"preset": "demo", "model": {"width": 32, "depth": 1, "heads": 2}, "global_batch_size": 8, "epochs": 1,
             "flip": False, "extract_batch_size": 8, "sample_classes": 2, "sample_images": 2},
        cache={"shard_size": 8, "batch_size": 8, "cfg_scale": 1.0},
        post={"global_batch_size": 4, "epochs": 1, "warmup_epochs": 0.0, "ema_decay": 0.5, "sample_images": 2})
    run = tmp_path / "run"
    spec = f"llamagen:{checkpoint}"
    common = ["--config", str(config), "--run-dir", str(run), "--tokenizer", spec]
    with pytest.raises(ConfigError, match="main trains its own"):
        train_main(["--stage", "main", *common])
    train_main(["--stage", "gen", *common, "--max-steps", "1"])
    imported = torch.load(run / "tokenizer.pt", weights_only=True)
    assert imported["imported_from"]["sha256"] == file_sha256(checkpoint)
    assert load_tokenizer(str(run / "tokenizer.pt")).grid_size == 8
    original_sha = file_sha256(run / "tokenizer.pt")
    train_main(["--stage", "cache", *common])                              # the import is kept, not redone
    assert file_sha256(run / "tokenizer.pt") == original_sha
    assert (run / "cache" / shard_name(1)).is_file()
    train_main(["--stage", "post", *common, "--max-steps", "2"])
    assert_post_export(run, original_sha)
    result = evaluate_main(["--run-dir", str(run), "--tokenizer", spec, "--config", str(config), "--metrics", "rfid",
                            "--num", "4", "--no-progress", "--out", str(tmp_path / "metrics.json"),
                            "--extractor", "proxy"])
    assert result["values"]["rfid_proxy"] >= 0

    other = tmp_path / "other.pt"
    torch.save({"model": build_tokenizer(TokenizerConfig(**TINY_CNN)).state_dict()}, other)
    with pytest.raises(ConfigError, match="not an import of"):
        train_main(["--stage", "cache", "--config", str(config), "--run-dir", str(run), "--tokenizer",
                    f"llamagen:{other}"])


@pytest.mark.slow
def test_diverged_run_stops_logs_the_stop_and_keeps_the_last_good_checkpoint(cached, tmp_path):
    """post.lr 1e30: the decoder blows up after its first update and the next three losses are non-finite. The run
    stops with a "stopped" event (nan_skipped 3) as the last log row, and no checkpoint is written inside the
    streak: step 1 stays the newest, the last good state, and nothing is exported."""
    source, config = cached
    run = copy_run(source, tmp_path / "run", with_cache=True)
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        train_main(["--stage", "post", "--config", str(config), "--run-dir", str(run), "--set", "post.lr=1e30",
                    "--set", "post.min_lr=1e30", "--set", "post.max_bad_steps=3", "--set", "post.ckpt_interval=1"])
    assert latest_checkpoint(run / "post").name == "step-00000001"
    assert not (run / "tokenizer_post.pt").exists()
    rows = [json.loads(line) for line in (run / "post" / "log.jsonl").read_text().splitlines()]
    assert [r["nan_skipped"] for r in rows if "lr" in r] == [0, 1, 2]     # one row per step
    assert rows[-1]["event"].startswith("stopped: 3 non-finite losses") and rows[-1]["nan_skipped"] == 3
