"""Codebook usage for reports: statistics of token grids, the usage columns of a training log, a usage-over-training
plot, and the usage of the cached generated grids against the clean grids of the same images.

    usage_stats(indices, K)          -> {"tokens", "codes", "used", "used_fraction", "dead", "perplexity",
                                         "entropy_fraction", "top_code_share"}
    usage_series(log_rows)           -> {"step": [...], "used_fraction": [...], "perplexity": [...], "dead": [...],
                                         "restarted": [...]}   (the main stage's codebook/* columns)
    plot_usage(series, path, codebook_size)   PNG: used fraction and dead codes, perplexity, over steps
    cache_usage(cache_dir, K)        -> usage_stats of the generated grids, the clean grids, and of both at the
                                        positions the generator resampled (keep_mask False), plus code overlaps

    tokenizer_usage(run_dir)         -> usage_stats + MSE of RUN/tokenizer.pt on the run's held-out split

    python -m tokpost_fast.metrics.codebook_usage --run-dir RUN [--plot usage.png] [--out usage.json]

Definitions: `used` counts the codes that occur at least once; `dead` here is K - used for a set of grids (the
training log's codebook/dead is the restart criterion instead: unused by the EMA for codebook.dead_window steps);
`perplexity` = exp(H) of the code frequencies (K for uniform use, 1 for a single code); `entropy_fraction` =
H / log K.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F

from tokpost_fast.atomic import atomic_write_with
from tokpost_fast.config import load_config
from tokpost_fast.data import ImageFolderDataset
from tokpost_fast.data.token_cache import CacheRows, load_rows, read_index
from tokpost_fast.models import is_continuous
from tokpost_fast.models.tokenizer import load_tokenizer
from tokpost_fast.training.run_log import _parse_row

LOG_COLUMNS = {"used_fraction": "codebook/used", "perplexity": "codebook/perplexity", "dead": "codebook/dead",
               "restarted": "codebook/restarted"}


def usage_stats(indices: torch.Tensor, codebook_size: int) -> dict:
    """Usage of the codes in `indices` (any shape, integer dtype, values in [0, codebook_size))."""
    if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 1:
        raise ValueError(f"codebook_size must be an int >= 1, got {codebook_size!r}")
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex():
        raise ValueError(f"indices must be an integer tensor, got {getattr(indices, 'dtype', type(indices))}")
    flat = indices.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= codebook_size):
        raise ValueError(f"indices hold values in [{int(flat.min())}, {int(flat.max())}], outside "
                         f"[0, {codebook_size - 1}]")
    counts = torch.bincount(flat.cpu(), minlength=codebook_size).double()
    total = float(counts.sum())
    used = int((counts > 0).sum())
    if total == 0:
        entropy, top = 0.0, 0.0
    else:
        p = counts[counts > 0] / total
        entropy, top = float(-(p * p.log()).sum()), float(counts.max() / total)
    return {"tokens": int(total), "codes": codebook_size, "used": used, "used_fraction": used / codebook_size,
            "dead": codebook_size - used, "perplexity": math.exp(entropy) if total else 0.0,
            "entropy_fraction": entropy / math.log(codebook_size) if codebook_size > 1 else 0.0,
            "top_code_share": top}


def read_log(path: Union[str, Path]) -> list[dict]:
    """The rows of a log.jsonl (a half-written last line is skipped)."""
    return [row for line in Path(path).read_text().splitlines() if (row := _parse_row(line)) is not None]


def usage_series(rows: Iterable[dict]) -> dict[str, list]:
    """The codebook columns of the logged steps, in step order. A column a row lacks (an older log has no
    codebook/dead) is None there."""
    logged = sorted((r for r in rows if "codebook/used" in r and "event" not in r), key=lambda r: r["step"])
    series: dict[str, list] = {"step": [r["step"] for r in logged]}
    for name, key in LOG_COLUMNS.items():
        series[name] = [r.get(key) for r in logged]
    return series


def plot_usage(series: dict[str, list], path: Union[str, Path], codebook_size: Optional[int] = None,
               title: str = "codebook usage") -> None:
    """Two panels over steps: the fraction of codes used (and dead codes, right axis), and the perplexity
    (with K as a dashed line when codebook_size is given). Written atomically as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, no display needed

    steps = series["step"]
    fig = Figure(figsize=(8.0, 3.2), dpi=110)
    used_ax, ppl_ax = fig.subplots(1, 2)
    used_ax.plot(steps, series["used_fraction"], color="tab:blue", label="used fraction")
    used_ax.set_ylim(0, 1.05)
    used_ax.set_ylabel("codes used (fraction of K)")
    if any(v is not None for v in series.get("dead", [])):
        dead_ax = used_ax.twinx()
        points = [(s, v) for s, v in zip(steps, series["dead"]) if v is not None]
        dead_ax.plot(*zip(*points), color="tab:red", alpha=0.7, label="dead codes")
        dead_ax.set_ylim(0, 1.05 * max(1, max(v for _, v in points)))
        dead_ax.set_ylabel("dead codes", color="tab:red")
    ppl_ax.plot(steps, series["perplexity"], color="tab:green")
    if codebook_size is not None:
        ppl_ax.axhline(codebook_size, color="gray", linestyle="--", linewidth=0.8, label=f"K = {codebook_size}")
        ppl_ax.legend(fontsize=7)
    ppl_ax.set_ylabel("perplexity exp(H)")
    for ax in (used_ax, ppl_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"))


def cache_usage(cache_dir: Union[str, Path], codebook_size: int) -> dict:
    """Usage of the post-training cache (data/token_cache.py): the teacher-forced generated grids against the
    clean grids of the same real images, over all positions and over the resampled ones only (keep_mask False:
    where the generator's sample stands). `new_codes_in_generated`: codes the generated grids use that no clean
    grid does; `changed_fraction`: the fraction of tokens that differ from the clean grid."""
    folder = Path(cache_dir)
    rows = load_rows(folder, read_index(folder))
    if not isinstance(rows, CacheRows):
        raise ValueError(f"{folder} is a latent cache (continuous tokenizer): it has no codes")
    generated, clean, resampled = rows.tokens, rows.gt_tokens, ~rows.keep_mask
    used_generated = torch.bincount(generated.reshape(-1), minlength=codebook_size) > 0
    used_clean = torch.bincount(clean.reshape(-1), minlength=codebook_size) > 0
    return {"rows": len(rows), "generated": usage_stats(generated, codebook_size),
            "clean": usage_stats(clean, codebook_size),
            "generated_at_resampled": usage_stats(generated[resampled], codebook_size),
            "clean_at_resampled": usage_stats(clean[resampled], codebook_size),
            "resampled_fraction": float(resampled.float().mean()),
            "changed_fraction": float((generated != clean).float().mean()),
            "new_codes_in_generated": int((used_generated & ~used_clean).sum()),
            "codes_used_by_both": int((used_generated & used_clean).sum())}


@torch.no_grad()
def tokenizer_usage(run_dir: Union[str, Path], split: str = "val", batch_size: int = 64) -> dict:
    """usage_stats (and the reconstruction MSE) of RUN/tokenizer.pt's codes on a split of the run's data
    (RUN/config.yaml's data section; "val": the held-out images every metric uses)."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    model = load_tokenizer(str(run_dir / "tokenizer.pt")).eval()
    if is_continuous(model):
        raise ValueError(f"{run_dir / 'tokenizer.pt'} is a continuous tokenizer: it has no codes")
    data = ImageFolderDataset(cfg.data, train=False, split=split)
    codes, squared_error = [], 0.0
    for start in range(0, len(data), batch_size):
        images = torch.stack([data[i][0] for i in range(start, min(start + batch_size, len(data)))])
        idx = model.encode(images)
        codes.append(idx)
        squared_error += float(F.mse_loss(model.decode_codes(idx), images, reduction="sum"))
    grids = torch.cat(codes)
    pixels = len(data) * 3 * cfg.data.image_size ** 2
    return {"split": split, "split_how": data.split_how, "images": len(data),
            **usage_stats(grids, model.codebook_size), "mse": squared_error / pixels}


def _cli() -> None:
    parser = argparse.ArgumentParser(description="Codebook usage of a run folder: the exported tokenizer's codes "
                                     "on the held-out split, the usage columns of log.jsonl, the token cache.")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--split", default="val", choices=("train", "val", "all"))
    parser.add_argument("--plot", type=Path, default=None, help="write the usage-over-training PNG here")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)                 # small batches: one thread is faster on a shared CPU
    report: dict = {"run_dir": str(args.run_dir), "tokenizer": tokenizer_usage(args.run_dir, args.split)}
    codebook_size = report["tokenizer"]["codes"]
    log = args.run_dir / "log.jsonl"
    if log.is_file():
        series = usage_series(read_log(log))
        report["log_last"] = {k: v[-1] for k, v in series.items()} if series["step"] else None
        if args.plot is not None and series["step"]:
            plot_usage(series, args.plot, codebook_size, title=f"codebook usage: {args.run_dir.name}")
    if (args.run_dir / "cache" / "index.json").is_file():
        report["cache"] = cache_usage(args.run_dir / "cache", codebook_size)
    text = json.dumps(report, indent=1)
    if args.out is not None:
        atomic_write_with(args.out, lambda tmp: Path(tmp).write_text(text + "\n"))
    print(text)


if __name__ == "__main__":
    _cli()
