"""Shared helpers of the stage tests: a tiny ImageFolder, a tiny main-stage config, and launching train.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tokpost_fast.training.engine import free_port

REPO = Path(__file__).resolve().parents[2]

# 32x32 images -> ViT patch 8 -> 4x4 tokens, K = 64: a main step takes milliseconds on the CPU.
TINY_TOKENIZER = dict(arch="vit", image_size=32, codebook_size=64, codebook_embed_dim=8, width=32, depth=1, heads=2,
                      patch_size=8, num_latent_tokens=16)
# Variables a launcher (or an in-process 1-rank group of an earlier test) leaves behind; a child launch must not
# inherit them.
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
            "CROSS_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def write_image_folder(root: Path, classes: int = 2, per_class: int = 12, size: int = 32, seed: int = 0) -> Path:
    """Smooth random images (low-frequency noise upsampled), so a tiny tokenizer has something to learn."""
    g = torch.Generator().manual_seed(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            coarse = torch.rand(1, 3, 4, 4, generator=g)
            image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
            pixels = (image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    return root


def write_main_config(path: Path, data_root: Path, batch_size: int = 4, **sections) -> Path:
    """A YAML config for the main stage at test size; `sections` adds or replaces keys, e.g.
    train={"epochs": 3}."""
    base = {
        # val_fraction 0: the stage tests train on every image (the held-out split has its own tests:
        # tests/data/test_split.py, tests/test_pipeline.py)
        "data": {"root": str(data_root), "image_size": 32, "batch_size": batch_size, "num_workers": 0,
                 "backend": "torch", "val_fraction": 0.0},
        "tokenizer": dict(TINY_TOKENIZER),
        "perturb": {"alpha": 1.0, "beta": 0.5, "delta": 8, "anneal_start": 0, "anneal_end": 2, "end_ratio": 0.5},
        "loss": {"disc_start": 2, "disc_ndf": 8, "disc_layers": 2},
        "train": {"lr": 1e-3, "disc_lr": 1e-3, "min_lr": 1e-4, "warmup_epochs": 0.5, "epochs": 4, "ema_decay": 0.9,
                  "log_interval": 1, "sample_interval": 4, "ckpt_interval": 4, "sample_images": 2,
                  "usage_window": 4},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    import yaml

    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("main_data") / "images")


def launch_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_deepspeed(args: list, num_gpus: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N tokpost_fast/train.py ARGS` with the venv's launcher (CPU: gloo ranks)."""
    launcher = Path(sys.executable).with_name("deepspeed")
    port = free_port()
    cmd = [str(launcher), "--num_gpus", str(num_gpus), "--master_port", str(port),
           str(REPO / "tokpost_fast" / "train.py"), *map(str, args)]
    done = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    # DeepSpeed's CPU all-reduce leaves one /dev/shm workspace per rank unless the engine releases it
    leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert done.returncode != 0 or not leaked, f"/dev/shm buffers left behind: {[p.name for p in leaked]}"
    return done



def run_python(args: list, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python tokpost_fast/train.py ARGS`: one process, no launcher (train.py makes its own 1-rank gloo group).
    A fresh process per run, so a resume really restarts, and no process group outlives the test."""
    cmd = [sys.executable, str(REPO / "tokpost_fast" / "train.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout)
