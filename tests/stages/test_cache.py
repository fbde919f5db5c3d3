"""Stage `cache` (METHOD.md A5.1, B5): shard contents, byte-identical resume after an interruption, the generator /
tokenizer hash check, and the checks `post` runs on a cache (tampered shard, other settings)."""

import json
import shutil

import pytest
import torch

from tests.stages.tiny_run import CACHE, build_tiny_run, copy_run
from tokpost_fast.config import load_config
from tokpost_fast.models.tokenizer import load_tokenizer
from tokpost_fast.atomic import file_sha256
from tokpost_fast.data.token_cache import INDEX, CacheMismatch, read_shard, shard_name, verify_cache
from tokpost_fast.train import main as train_main

SHARDS = 3          # 20 images, 8 rows per shard


def run_cache(run, config, *extra):
    return train_main(["--stage", "cache", "--config", str(config), "--run-dir", str(run), *map(str, extra)])


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A tiny run with a complete cache, built in one clean run."""
    run, config = build_tiny_run(tmp_path_factory.mktemp("cache"))
    result = run_cache(run, config)
    assert result["complete"] and result["shards"] == SHARDS
    return run, config


def test_shards_hold_teacher_forced_grids_that_decode_to_images(cached):
    run, config = cached
    tokenizer = load_tokenizer(str(run / "tokenizer.pt")).eval()
    index = json.loads((run / "cache" / INDEX).read_text())
    assert [e["rows"] for e in index["shards"]] == [8, 8, 4] and index["dtype"] == "uint16"
    assert index["tokenizer"]["sha256"] == file_sha256(run / "tokenizer.pt")
    assert index["generator"]["sha256"] == file_sha256(run / "generator.pt")
    assert index["settings"]["sigma"] == CACHE["sigma"] and index["settings"]["cfg_scale"] == CACHE["cfg_scale"]

    from safetensors import safe_open

    with safe_open(str(run / "cache" / shard_name(0)), "pt") as f:
        assert f.get_slice("tokens").get_dtype() == "U16"
    rows, meta = read_shard(run / "cache" / shard_name(0))
    assert rows.tokens.shape == rows.gt_tokens.shape == rows.keep_mask.shape == (8, 4, 4)
    assert rows.sample_index.tolist() == list(range(8)) and len(set(rows.seed.tolist())) == 2   # 2 chunks of 4
    assert rows.relative_paths[0] == "class0/img000.png" and meta["settings"] == index["settings"]
    # kept positions are the ground truth; the real image's own codes are what the tokenizer encodes
    assert torch.equal(rows.tokens[rows.keep_mask], rows.gt_tokens[rows.keep_mask])
    with torch.no_grad():
        images = tokenizer.decode_codes(rows.tokens)
    assert images.shape == (8, 3, 32, 32) and torch.isfinite(images).all()


def test_keep_mask_rate_is_sigma(cached):
    run, _ = cached
    from tokpost_fast.data.token_cache import load_rows, read_index

    rows = load_rows(run / "cache", read_index(run / "cache"))
    n = rows.keep_mask.numel()                                     # 20 images x 16 tokens
    sigma = CACHE["sigma"]
    assert abs(rows.keep_mask.float().mean().item() - sigma) < 5 * (sigma * (1 - sigma) / n) ** 0.5


def test_interrupted_cache_resumes_to_the_bytes_of_a_clean_run(cached, tmp_path):
    run, config = cached
    cut = copy_run(run, tmp_path / "cut")
    first = run_cache(cut, config, "--max-steps", 1)              # stop after shard 0
    assert not first["complete"] and not (cut / "cache" / INDEX).exists()
    assert sorted(p.name for p in (cut / "cache").glob("shard-*")) == [shard_name(0)]
    (cut / "cache" / f".{shard_name(1)}.tmp").write_bytes(b"half a shard")   # a crash mid-write
    stamp = (cut / "cache" / shard_name(0)).stat().st_mtime_ns
    assert run_cache(cut, config)["complete"]
    assert (cut / "cache" / shard_name(0)).stat().st_mtime_ns == stamp      # present shards are not redone
    for s in range(SHARDS):
        assert (cut / "cache" / shard_name(s)).read_bytes() == (run / "cache" / shard_name(s)).read_bytes()
    clean, resumed = (json.loads((r / "cache" / INDEX).read_text()) for r in (run, cut))
    assert resumed["shards"] == clean["shards"] and resumed["settings"] == clean["settings"]
    assert not list((cut / "cache").glob(".*tmp"))                           # the stale temp was overwritten


def test_changed_settings_rebuild_the_cache(cached, tmp_path):
    run, config = cached
    other = copy_run(run, tmp_path / "other", with_cache=True)
    run_cache(other, config, "--set", "cache.sigma=0.9")
    index = json.loads((other / "cache" / INDEX).read_text())
    assert index["settings"]["sigma"] == 0.9
    assert (other / "cache" / shard_name(0)).read_bytes() != (run / "cache" / shard_name(0)).read_bytes()


def test_generator_of_another_tokenizer_is_refused_naming_both_hashes(cached, tmp_path):
    run, config = cached
    other = copy_run(run, tmp_path / "other")
    payload = torch.load(other / "generator.pt", weights_only=True)
    payload["tokenizer_hash"] = "f" * 64
    torch.save(payload, other / "generator.pt")
    with pytest.raises(ValueError) as err:
        run_cache(other, config)
    assert "f" * 64 in str(err.value) and file_sha256(other / "tokenizer.pt") in str(err.value)


def test_tampered_shard_is_refused_naming_it(cached, tmp_path):
    run, config = cached
    other = copy_run(run, tmp_path / "tampered", with_cache=True)
    shard = other / "cache" / shard_name(1)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF                                               # one token id of the last row
    shard.write_bytes(bytes(data))
    tokenizer_sha = file_sha256(other / "tokenizer.pt")
    with pytest.raises(CacheMismatch, match=shard_name(1)):
        verify_cache(other / "cache", tokenizer_sha)
    with pytest.raises(CacheMismatch, match=shard_name(1)):        # the post stage runs the same check first
        train_main(["--stage", "post", "--config", str(config), "--run-dir", str(other)])


def test_post_refuses_a_cache_of_other_settings_or_another_tokenizer(cached, tmp_path):
    run, config = cached
    other = copy_run(run, tmp_path / "settings", with_cache=True)
    with pytest.raises(CacheMismatch, match="sigma"):
        train_main(["--stage", "post", "--config", str(config), "--run-dir", str(other), "--set", "cache.sigma=0.9"])
    cfg = load_config(config)
    with pytest.raises(CacheMismatch, match="tokenizer sha256"):
        verify_cache(other / "cache", "0" * 64, None)
    shutil.rmtree(other / "cache")
    with pytest.raises(FileNotFoundError, match="--stage cache"):
        train_main(["--stage", "post", "--config", str(config), "--run-dir", str(other)])
    assert cfg.cache.sigma == CACHE["sigma"]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_write_the_bytes_of_one_rank(cached, tmp_path):
    """Shards are keyed by (seed, shard, chunk), not by rank: a 2-rank DeepSpeed run writes the same cache."""
    from tests.stages.conftest import run_deepspeed

    run, config = cached
    two = copy_run(run, tmp_path / "two")
    result = run_deepspeed(["--stage", "cache", "--config", config, "--run-dir", two], num_gpus=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for s in range(SHARDS):
        assert (two / "cache" / shard_name(s)).read_bytes() == (run / "cache" / shard_name(s)).read_bytes(), s
    one, both = (json.loads((r / "cache" / INDEX).read_text()) for r in (run, two))
    assert both["shards"] == one["shards"] and both["settings"] == one["settings"]
