"""A tiny run folder for the cache / post tests, built with the library: random 32x32 images (2 classes), a random
ViT tokenizer (4x4 tokens, K = 64) as RUN/tokenizer.pt and a random 2-block generator trained on it (by hash) as
RUN/generator.pt. Untrained weights are enough: the stages' contracts do not depend on quality."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

from tests.stages.conftest import TINY_TOKENIZER, write_image_folder, write_main_config
from tokpost_fast.models.generator import build_generator, generator_config, save_generator
from tokpost_fast.models.tokenizer import TokenizerConfig, build_tokenizer, save_tokenizer
from tokpost_fast.atomic import file_sha256

CACHE = {"sigma": 0.5, "shard_size": 8, "batch_size": 4, "cfg_scale": 2.0, "cfg_power": 1.0, "temperature": 1.0,
         "seed": 3}
POST = {"global_batch_size": 4, "epochs": 2, "lr": 1e-3, "disc_lr": 1e-3, "min_lr": 1e-4, "warmup_epochs": 0.0,
        "ema_decay": 0.5, "log_interval": 1, "ckpt_interval": 4, "sample_images": 2}


def build_tiny_run(root: Path, classes: int = 2, per_class: int = 10) -> tuple[Path, Path]:
    """(run folder with tokenizer.pt and generator.pt, config YAML). 20 images -> 3 shards of 8, 8, 4 rows."""
    root.mkdir(parents=True, exist_ok=True)
    data = write_image_folder(root / "images", classes=classes, per_class=per_class)
    run = root / "run"
    run.mkdir()
    torch.manual_seed(0)
    tokenizer = build_tokenizer(TokenizerConfig(**TINY_TOKENIZER))
    save_tokenizer(tokenizer, str(run / "tokenizer.pt"))
    gpt = build_generator(generator_config("demo", width=32, depth=2, heads=2, num_classes=classes,
                                           vocab_size=tokenizer.codebook_size, seq_len=tokenizer.grid_size ** 2))
    save_generator(gpt, run / "generator.pt", extra={"tokenizer_hash": file_sha256(run / "tokenizer.pt")})
    config = write_main_config(root / "tiny.yaml", data, cache=dict(CACHE), post=dict(POST))
    return run, config


def copy_run(run: Path, to: Path, with_cache: bool = False) -> Path:
    """A fresh run folder holding the same checkpoints (and, optionally, the same cache)."""
    to.mkdir(parents=True)
    for name in ("tokenizer.pt", "generator.pt"):
        shutil.copy2(run / name, to / name)
    if with_cache:
        shutil.copytree(run / "cache", to / "cache")
    return to


def config_with(config: Path, to: Path, **sections) -> Path:
    raw = yaml.safe_load(config.read_text())
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    to.write_text(yaml.safe_dump(raw, sort_keys=False))
    return to
