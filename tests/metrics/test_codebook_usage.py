"""metrics/codebook_usage.py: usage statistics of grids, of training logs, the plot, and of a token cache."""

import math

import pytest
import torch
from PIL import Image

from tokpost_fast.metrics.codebook_usage import cache_usage, plot_usage, read_log, usage_series, usage_stats
from tokpost_fast.atomic import file_sha256
from tokpost_fast.data.token_cache import (FORMAT, INDEX, LATENT_FORMAT, CacheRows, LatentRows, shard_name,
                                             write_json_atomic, write_latent_shard, write_shard)


def test_usage_stats_of_a_known_grid():
    s = usage_stats(torch.tensor([[0, 0], [1, 3]]), 4)
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert (s["tokens"], s["codes"], s["used"], s["dead"], s["used_fraction"]) == (4, 4, 3, 1, 0.75)
    assert s["perplexity"] == pytest.approx(math.exp(h)) and s["entropy_fraction"] == pytest.approx(h / math.log(4))
    assert s["top_code_share"] == 0.5


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint16])
def test_usage_stats_extremes_and_dtypes(dtype):
    one = usage_stats(torch.full((5, 8, 8), 7).to(dtype), 16)
    assert one["used"] == 1 and one["perplexity"] == pytest.approx(1.0) and one["top_code_share"] == 1.0
    uniform = usage_stats(torch.arange(16).repeat(3).to(dtype), 16)
    assert uniform["perplexity"] == pytest.approx(16.0) and uniform["entropy_fraction"] == pytest.approx(1.0)
    assert usage_stats(torch.zeros(0, dtype=dtype), 16)["used"] == 0


@pytest.mark.parametrize("args, match", [
    ((torch.tensor([0.5]), 4), "indices must be an integer tensor"),
    ((torch.tensor([0, 4]), 4), r"outside \[0, 3\]"),
    ((torch.tensor([-1]), 4), "outside"),
    ((torch.tensor([0]), 0), "codebook_size must be an int >= 1"),
])
def test_usage_stats_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        usage_stats(*args)


def test_usage_series_reads_the_codebook_columns_in_step_order(tmp_path):
    rows = [{"step": 0, "event": "start"},
            {"step": 20, "loss": 1.0, "codebook/used": 0.5, "codebook/perplexity": 30.0, "codebook/dead": 4,
             "codebook/restarted": 2},
            {"step": 10, "loss": 1.0, "codebook/used": 0.25, "codebook/perplexity": 10.0},     # an older row
            {"step": 30, "loss": 1.0}]
    series = usage_series(rows)
    assert series == {"step": [10, 20], "used_fraction": [0.25, 0.5], "perplexity": [10.0, 30.0],
                      "dead": [None, 4], "restarted": [None, 2]}
    log = tmp_path / "log.jsonl"
    log.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows) + '{"step": 40, "los')
    assert usage_series(read_log(log)) == series                    # a half-written last line is skipped
    plot_usage(series, tmp_path / "usage.png", codebook_size=64)
    with Image.open(tmp_path / "usage.png") as image:
        assert image.format == "PNG" and image.size[0] > 400


def _write_cache(folder, parts, codebook_size, latent=False):
    folder.mkdir()
    settings = {"sigma": 0.5}
    entries = []
    for number, rows in enumerate(parts):
        path = folder / shard_name(number)
        if latent:
            write_latent_shard(path, rows, number, settings)
        else:
            write_shard(path, rows, number, codebook_size, settings)
        entries.append({"file": path.name, "rows": len(rows), "sha256": file_sha256(path)})
    write_json_atomic(folder / INDEX, {"format": LATENT_FORMAT if latent else FORMAT, "settings": settings,
                                       "shards": entries})


def test_cache_usage_compares_generated_and_clean_grids(tmp_path):
    gen = torch.Generator().manual_seed(0)

    def rows(n):
        clean = torch.randint(0, 4, (n, 4, 4), generator=gen)              # clean grids use codes 0-3
        keep = torch.rand(n, 4, 4, generator=gen) < 0.7
        generated = torch.where(keep, clean, 10 + torch.randint(0, 2, (n, 4, 4), generator=gen))   # codes 10, 11
        return CacheRows(tokens=generated, gt_tokens=clean, keep_mask=keep, sample_index=torch.arange(n),
                         label=torch.zeros(n, dtype=torch.int64), sigma=torch.full((n,), 0.5),
                         seed=torch.zeros(n, dtype=torch.int64), relative_paths=[f"c/{i}.png" for i in range(n)])

    parts = [rows(8), rows(5)]
    _write_cache(tmp_path / "cache", parts, codebook_size=32)
    out = cache_usage(tmp_path / "cache", 32)
    resampled = torch.cat([~p.keep_mask for p in parts])
    assert out["rows"] == 13
    assert out["clean"]["used"] == 4 and out["generated"]["used"] == 6
    assert out["generated_at_resampled"]["used"] == 2 and out["clean_at_resampled"]["used"] == 4
    assert out["new_codes_in_generated"] == 2 and out["codes_used_by_both"] == 4
    assert out["resampled_fraction"] == pytest.approx(float(resampled.float().mean()))
    assert out["changed_fraction"] == pytest.approx(out["resampled_fraction"])    # every resampled token changed
    assert out["generated_at_resampled"]["tokens"] == int(resampled.sum())


def test_cache_usage_refuses_a_latent_cache(tmp_path):
    n = 3
    latents = LatentRows(latents=torch.zeros(n, 4, 2, 2, dtype=torch.float16),
                         gt_latents=torch.zeros(n, 4, 2, 2, dtype=torch.float16), sample_index=torch.arange(n),
                         label=torch.zeros(n, dtype=torch.int64), strength=torch.full((n,), 0.3),
                         seed=torch.zeros(n, dtype=torch.int64), relative_paths=["a"] * n)
    _write_cache(tmp_path / "cache", [latents], codebook_size=1, latent=True)
    with pytest.raises(ValueError, match="latent cache"):
        cache_usage(tmp_path / "cache", 16)


def test_tokenizer_usage_on_the_held_out_split(tmp_path):
    import shutil

    import torch.nn.functional as F

    from tests.stages.conftest import TINY_TOKENIZER, write_image_folder, write_main_config
    from tokpost_fast.config import load_config
    from tokpost_fast.data import ImageFolderDataset
    from tokpost_fast.metrics.codebook_usage import tokenizer_usage
    from tokpost_fast.models.tokenizer import TokenizerConfig, build_tokenizer, save_tokenizer

    data = write_image_folder(tmp_path / "images", classes=2, per_class=10)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(write_main_config(tmp_path / "tiny.yaml", data, data={"val_fraction": 0.3}), run / "config.yaml")
    torch.manual_seed(0)
    model = build_tokenizer(TokenizerConfig(**TINY_TOKENIZER)).eval()
    save_tokenizer(model, str(run / "tokenizer.pt"))
    out = tokenizer_usage(run, batch_size=4)                  # 6 held-out images in batches of 4 and 2
    val = ImageFolderDataset(load_config(run / "config.yaml").data, train=False, split="val")
    images = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        idx = model.encode(images)
        mse = F.mse_loss(model.decode_codes(idx), images).item()
    assert out["images"] == len(val) == 6 and out["tokens"] == 6 * 16
    assert {k: out[k] for k in ("used", "perplexity")} == {k: usage_stats(idx, 64)[k] for k in ("used", "perplexity")}
    assert out["mse"] == pytest.approx(mse, rel=1e-5)
