"""Stage `gen`: token extraction (tokenizer.encode on images and flips, cached with the tokenizer hash) and 2-rank
DeepSpeed ZeRO runs on the CPU (gloo) that resume to exactly the weights of a straight run: raster order, and
RAR's randomized order cut mid-anneal (whose generator then feeds the cache stage)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from tokpost_fast.config import load_config
from tokpost_fast.data import build_loader
from tokpost_fast.models.generator import load_generator
from tokpost_fast.models.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer, tokenizer_config
from tokpost_fast.atomic import file_sha256
from tokpost_fast.sample import main as sample_main
from tokpost_fast.training.checkpoint import latest_checkpoint
from tokpost_fast.training.engine import DistInfo, NonFiniteLossError, free_port
from tokpost_fast.stages.gen import extract_tokens
from tokpost_fast.config.gen import GenStageConfig

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = dict(image_size=32, codebook_size=64, codebook_embed_dim=8, width=32, depth=1, heads=2, patch_size=8,
                 num_latent_tokens=16)        # 32x32 images -> 4x4 tokens, K = 64


def write_config(path: Path, data_root: Path, **gen) -> Path:
    gen_yaml = "\n".join(f"  {k}: {v}" for k, v in gen.items())
    path.write_text(textwrap.dedent(f"""\
        data: {{root: {data_root}, image_size: 32, batch_size: 4, num_workers: 0, backend: torch}}
        tokenizer: {{{", ".join(f"{k}: {v}" for k, v in TOKENIZER.items())}}}
        perturb: {{delta: 8, beta: 0.0}}
        gen:
          preset: demo
          model: {{width: 32, depth: 2, heads: 2}}
          global_batch_size: 8
          epochs: 3
          warmup_epochs: 0.5
          log_interval: 1
          ckpt_interval: 2
          sample_classes: 2
          sample_images: 2
          extract_batch_size: 8
        """) + gen_yaml + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """3 classes x 6 random 32x32 images, and a tiny random tokenizer."""
    root = tmp_path_factory.mktemp("gen")
    g = torch.Generator().manual_seed(0)
    for c in range(3):
        (root / "data" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "data" / f"class{c}" / f"img{i}.png")
    torch.manual_seed(0)
    save_tokenizer(build_tokenizer(tokenizer_config("demo", **TOKENIZER)), str(root / "tokenizer.pt"))
    return root


def new_run(setup: Path, name: str) -> Path:
    run = setup / name
    run.mkdir()
    (run / "tokenizer.pt").write_bytes((setup / "tokenizer.pt").read_bytes())
    return run


def test_gen_config_checks():
    with pytest.raises(ValueError, match="vocab_size"):
        GenStageConfig(model={"vocab_size": 10})          # comes from the tokenizer
    with pytest.raises(ValueError, match="cond"):
        GenStageConfig(model={"cond": "cross"})          # the model's own checks run at config time
    with pytest.raises(ValueError, match="preset"):
        GenStageConfig(preset="XXL")
    with pytest.raises(ValueError, match="zero_stage"):
        GenStageConfig(zero_stage=3)


def test_gen_order_checks_and_defaults():
    assert GenStageConfig(order="rar").model_overrides() == {"arch": "rar"}      # the demo preset in RAR's layout
    assert GenStageConfig().training_order("gpt") == "raster"
    assert GenStageConfig(preset="B").training_order("rar") == "rar"             # the RAR presets default to rar
    assert GenStageConfig(preset="B", order="raster").training_order("rar") == "raster"
    assert GenStageConfig().rar_anneal(250_000) == (125_000, 187_500)             # rar.yaml's steps
    assert GenStageConfig().rar_anneal(192) == (96, 144)                         # the demo's 192 steps
    assert GenStageConfig(rar_anneal_start=3, rar_anneal_end=9).rar_anneal(100) == (3, 9)
    assert GenStageConfig(rar_anneal_start=90).rar_anneal(100) == (90, 90)       # the default end never precedes
    with pytest.raises(ValueError, match="gen.order"):
        GenStageConfig(order="rar", model={"arch": "gpt"})                       # GPT has no target-aware position
    with pytest.raises(ValueError, match="gen.order"):
        GenStageConfig(order="zigzag")
    with pytest.raises(ValueError, match="gen.order"):
        GenStageConfig(generator="dit", order="raster")
    with pytest.raises(ValueError, match="gen.rar_anneal_end"):
        GenStageConfig(rar_anneal_start=10, rar_anneal_end=5)
    with pytest.raises(ValueError, match="gen.rar_anneal_start"):
        GenStageConfig(rar_anneal_start=-1)


def test_extract_tokens_encodes_images_and_flips_and_caches(setup):
    run = new_run(setup, "extract")
    cfg = load_config(write_config(run / "cfg.yaml", setup / "data"))
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    tokenizer = load_tokenizer(str(run / "tokenizer.pt")).eval()
    digest = file_sha256(run / "tokenizer.pt")
    cache = extract_tokens(cfg, run, tokenizer, digest, info, "fp32")
    assert cache["tokens"].shape == (18, 2, 4, 4) and cache["num_classes"] == 3 and cache["tokenizer_hash"] == digest
    assert cache["tokens"].dtype == torch.uint16         # the token cache's rule: data/token_cache.token_dtype
    images, labels, indices = next(iter(build_loader(cfg.data, train=False)))[:3]
    with torch.no_grad():
        assert torch.equal(cache["tokens"][indices, 0].long(), tokenizer.encode(images))
        assert torch.equal(cache["tokens"][indices, 1].long(), tokenizer.encode(images.flip(-1)))
    assert torch.equal(cache["labels"][indices], labels)
    path = run / "tokens" / "tokens.pt"
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokens.pt"]      # part files merged and removed
    stamp = path.stat().st_mtime_ns
    extract_tokens(cfg, run, tokenizer, digest, info, "fp32")
    assert path.stat().st_mtime_ns == stamp                                    # same tokenizer: reused
    # tokens.pt of an earlier version stored int16 ids: still reused, holding the same numbers
    torch.save({**cache, "tokens": cache["tokens"].to(torch.int32).to(torch.int16)}, path)
    legacy = extract_tokens(cfg, run, tokenizer, digest, info, "fp32")
    assert legacy["tokens"].dtype == torch.int16 and torch.equal(legacy["tokens"].long(), cache["tokens"].long())
    other = extract_tokens(cfg, run, tokenizer, "another-tokenizer", info, "fp32")
    assert other["tokenizer_hash"] == "another-tokenizer" and path.stat().st_mtime_ns != stamp


def launch(run: Path, config: Path, *extra: str) -> None:
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "tokpost_fast/train.py",
           "--stage", "gen", "--config", str(config), "--run-dir", str(run), *extra]
    # one intra-op thread per rank: two ranks share the two cores of the CI machine
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not Path(sys.executable).with_name("deepspeed").exists(), reason="deepspeed launcher missing")
def test_two_rank_run_resumes_to_the_straight_run(setup, tmp_path):
    config = write_config(tmp_path / "cfg.yaml", setup / "data")
    cut, straight = new_run(setup, "cut"), new_run(setup, "straight")
    launch(cut, config, "--max-steps", "2")
    assert (cut / "gen" / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    launch(cut, config, "--resume")
    launch(straight, config)

    resumed, reference = (torch.load(r / "generator.pt", weights_only=True) for r in (cut, straight))
    assert resumed["step"] == reference["step"] == 6                          # 3 epochs x 18 // 8 steps
    assert resumed["tokenizer_hash"] == file_sha256(cut / "tokenizer.pt")
    for key, value in reference["model"].items():                             # fp32 on the CPU: bit-exact
        assert torch.equal(resumed["model"][key], value), key
    gpt = load_generator(cut / "generator.pt")
    assert (gpt.config.vocab_size, gpt.config.seq_len, gpt.config.num_classes) == (64, 16, 3)

    rows = [json.loads(line) for line in (cut / "gen" / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]                                       # resumed log reads as one run
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    assert (cut / "gen" / "samples" / "step-00000006.png").is_file()
    sample_main(["--run-dir", str(cut), "--classes", "0,1", "--num", "2", "--out", str(tmp_path / "grid.png")])
    assert Image.open(tmp_path / "grid.png").size == (2 * 34 + 2, 2 * 34 + 2)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not Path(sys.executable).with_name("deepspeed").exists(), reason="deepspeed launcher missing")
def test_rar_order_resumes_mid_anneal_to_the_straight_run_and_feeds_the_cache(setup, tmp_path):
    # 6 steps, r annealed between steps 2 and 5; the cut at step 3 falls mid-anneal (r = 2/3 there)
    config = write_config(tmp_path / "cfg.yaml", setup / "data", order="rar", rar_anneal_start=2, rar_anneal_end=5)
    cut, straight = new_run(setup, "rar-cut"), new_run(setup, "rar-straight")
    launch(cut, config, "--max-steps", "3")
    launch(cut, config, "--resume")
    launch(straight, config)

    resumed, reference = (torch.load(r / "generator.pt", weights_only=True) for r in (cut, straight))
    assert resumed["step"] == reference["step"] == 6 and resumed["order"] == "rar"
    for key, value in reference["model"].items():                             # fp32 on the CPU: bit-exact
        assert torch.equal(resumed["model"][key], value), key
    gpt = load_generator(cut / "generator.pt")
    assert gpt.config.arch == "rar" and "target_aware_pos_embed" in reference["model"]

    rows = [json.loads(line) for line in (cut / "gen" / "log.jsonl").read_text().splitlines()]
    start = next(r for r in rows if r.get("event") == "start")
    assert start["order"] == "rar" and start["rar_anneal"] == [2, 5] and start["model"]["arch"] == "rar"
    ratios = [r["random_ratio"] for r in rows if "loss" in r]                 # r of steps 0 .. 5
    assert ratios == pytest.approx([1.0, 1.0, 1.0, 2 / 3, 1 / 3, 0.0])
    assert (cut / "gen" / "samples" / "step-00000006.png").is_file()          # sampled in raster order

    from tokpost_fast.data.token_cache import load_rows, read_index
    from tokpost_fast.train import main as train_main

    result = train_main(["--stage", "cache", "--config", str(config), "--run-dir", str(cut)])
    assert result["complete"]
    index = read_index(cut / "cache")
    rows = load_rows(cut / "cache", index)
    assert rows.tokens.shape == (index["num_rows"], 4, 4) and index["num_rows"] > 0
    assert 0 < rows.keep_mask.float().mean() < 1
    assert torch.equal(rows.tokens[rows.keep_mask], rows.gt_tokens[rows.keep_mask])


@pytest.mark.slow
def test_diverged_run_stops_logs_nan_skipped_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    """gen.lr 1e30: the first update blows the weights up and the next three losses are non-finite. The run stops
    (NonFiniteLossError), the rows carry `nan_skipped` (the README's key), the last row is a "stopped" event, and no
    checkpoint is written inside the streak: step 1 stays the newest, the last good state."""
    from tokpost_fast.train import main as train_main

    config = write_config(tmp_path / "cfg.yaml", setup / "data")
    run = new_run(setup, "diverged")
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        train_main(["--stage", "gen", "--config", str(config), "--run-dir", str(run), "--set", "gen.lr=1e30",
                    "--set", "gen.min_lr=1e30", "--set", "gen.warmup_epochs=0", "--set", "gen.max_bad_steps=3",
                    "--set", "gen.ckpt_interval=1"])
    assert latest_checkpoint(run / "gen").name == "step-00000001"
    assert not (run / "generator.pt").exists()
    rows = [json.loads(line) for line in (run / "gen" / "log.jsonl").read_text().splitlines()]
    assert [r["nan_skipped"] for r in rows if "lr" in r] == [0, 1, 2]     # one row per step
    assert all("skipped" not in r for r in rows)
    assert rows[-1]["event"].startswith("stopped: 3 non-finite losses") and rows[-1]["nan_skipped"] == 3
