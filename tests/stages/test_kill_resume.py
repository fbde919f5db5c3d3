"""Every stage survives `kill -9` at a random point. A stage runs as its own process, is SIGKILLed once its
log (or cache) reaches a seeded random point, and is re-run with --resume: it must continue from the newest
complete checkpoint (never a half-written or damaged one) and, for the cache, end with the bytes of a clean run.

The kill point is an event the test observes (a log row, a shard file), not a timer, so it lands in the middle of
the work whatever the machine's speed; the child runs at a lower priority so the test's poll reacts within a step
or two. Every test asserts the child really died by the signal: a run that finished first would prove nothing."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.stages.conftest import REPO, launch_env, write_image_folder, write_main_config
from tests.stages.tiny_run import build_tiny_run, config_with, copy_run
from tokpost_fast.data.token_cache import INDEX, shard_name
from tokpost_fast.train import main as train_main

pytestmark = pytest.mark.slow


def start(args: list, log_file: Path) -> subprocess.Popen:
    out = open(log_file, "w")
    return subprocess.Popen([sys.executable, str(REPO / "tokpost_fast" / "train.py"), *map(str, args)], cwd=REPO,
                            env=launch_env(), stdout=out, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: os.nice(10))


def kill_when(proc: subprocess.Popen, reached, log_file: Path, timeout: float = 300,
              may_finish: bool = False) -> bool:
    """SIGKILL `proc` as soon as reached() is true and return True. If it ends first: False when `may_finish`,
    else the test fails."""
    deadline = time.monotonic() + timeout
    while not reached():
        if proc.poll() is not None:
            if may_finish and proc.returncode == 0:
                return False
            pytest.fail(f"the run ended (rc {proc.returncode}) before the kill point:\n"
                        + log_file.read_text()[-3000:])
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the kill point was never reached:\n" + log_file.read_text()[-3000:])
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    return True


def logged_steps(log: Path) -> list[int]:
    """Training steps in a log.jsonl; a half-written last line (the kill) is not a step."""
    steps = []
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in row:
                steps.append(row["step"])
    return steps


def complete_checkpoints(stage_dir: Path) -> list[str]:
    return sorted(p.name for p in (stage_dir / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))


def run_ok(args: list, log_file: Path) -> str:
    proc = start(args, log_file)
    rc = proc.wait(timeout=600)
    text = log_file.read_text()
    assert rc == 0, text[-4000:]
    return text


def check_resumed(stage_dir: Path, killed_at: list[str], output: str, final_step: int) -> None:
    """The resumed run started from the newest checkpoint that was complete at the kill, logged every step once,
    and left no temporary checkpoint behind."""
    assert killed_at, "the kill came before the first checkpoint: the kill point is too early to test resume"
    assert re.search(rf"latest verified checkpoint: \S*{killed_at[-1]}\b", output), output[-3000:]
    assert logged_steps(stage_dir / "log.jsonl") == list(range(1, final_step + 1))
    assert not list((stage_dir / "checkpoints").glob("*.tmp"))


def test_main_survives_kill_9(tmp_path):
    rng = random.Random(7)
    data = write_image_folder(tmp_path / "images")
    config = write_main_config(tmp_path / "tiny.yaml", data, train={"ckpt_interval": 3, "epochs": 100})
    run = tmp_path / "run"
    common = ["--stage", "main", "--config", config, "--run-dir", run]
    kill_at = rng.randint(5, 20)
    proc = start(common + ["--max-steps", 400], tmp_path / "killed.txt")
    kill_when(proc, lambda: len(logged_steps(run / "log.jsonl")) >= kill_at, tmp_path / "killed.txt")
    at_kill = complete_checkpoints(run)
    output = run_ok(common + ["--max-steps", 30, "--resume"], tmp_path / "resumed.txt")
    check_resumed(run, at_kill, output, 30)
    assert torch.load(run / "tokenizer.pt", weights_only=True)["step"] == 30


def test_gen_survives_kill_9(tmp_path):
    rng = random.Random(8)
    built, config = build_tiny_run(tmp_path / "tiny")
    config = config_with(config, tmp_path / "gen.yaml", gen={
        "preset": "demo", "model": {"width": 32, "depth": 2, "heads": 2}, "global_batch_size": 4, "epochs": 100,
        "warmup_epochs": 0.5, "log_interval": 1, "ckpt_interval": 3, "sample_interval": 0, "extract_batch_size": 8})
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.pt").write_bytes((built / "tokenizer.pt").read_bytes())
    common = ["--stage", "gen", "--config", config, "--run-dir", run]
    kill_at = rng.randint(5, 20)
    proc = start(common + ["--max-steps", 400], tmp_path / "killed.txt")
    kill_when(proc, lambda: len(logged_steps(run / "gen" / "log.jsonl")) >= kill_at, tmp_path / "killed.txt")
    at_kill = complete_checkpoints(run / "gen")
    output = run_ok(common + ["--max-steps", 30, "--resume"], tmp_path / "resumed.txt")
    check_resumed(run / "gen", at_kill, output, 30)
    assert torch.load(run / "generator.pt", weights_only=True)["step"] == 30


def test_post_survives_kill_9_and_skips_a_damaged_checkpoint(tmp_path):
    """Killed, then the newest checkpoint is damaged on disk (one byte of a DeepSpeed file flipped): the resume
    names the damaged file and continues from the checkpoint before it."""
    rng = random.Random(9)
    built, config = build_tiny_run(tmp_path / "tiny")
    train_main(["--stage", "cache", "--config", str(config), "--run-dir", str(built)])
    run = copy_run(built, tmp_path / "run", with_cache=True)
    common = ["--stage", "post", "--config", config, "--run-dir", run, "--set", "post.epochs=200",
              "--set", "post.ckpt_interval=3"]
    kill_at = rng.randint(8, 20)
    proc = start(common + ["--max-steps", 400], tmp_path / "killed.txt")
    kill_when(proc, lambda: len(logged_steps(run / "post" / "log.jsonl")) >= kill_at, tmp_path / "killed.txt")
    at_kill = complete_checkpoints(run / "post")
    assert len(at_kill) == 2                                   # keep=2: the newest and the one before it
    damaged = max((p for p in (run / "post" / "checkpoints" / at_kill[-1]).rglob("*model_states.pt")),
                  key=lambda p: p.stat().st_size)
    blob = bytearray(damaged.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    damaged.write_bytes(bytes(blob))
    output = run_ok(common + ["--max-steps", 30, "--resume"], tmp_path / "resumed.txt")
    assert f"{damaged} does not match the sha256 in its manifest" in output
    check_resumed(run / "post", at_kill[:-1], output, 30)
    assert torch.load(run / "tokenizer_post.pt", weights_only=True)["step"] == 30


def test_cache_survives_kill_9_with_the_bytes_of_a_clean_run(tmp_path):
    rng = random.Random(10)
    built, config = build_tiny_run(tmp_path / "tiny", per_class=20)
    config = config_with(config, tmp_path / "cache.yaml", cache={"shard_size": 2, "batch_size": 2})
    shards = 20                                                       # 40 images, 2 per shard
    clean = copy_run(built, tmp_path / "clean")
    assert train_main(["--stage", "cache", "--config", str(config), "--run-dir", str(clean)])["complete"]
    run = copy_run(built, tmp_path / "run")
    common = ["--stage", "cache", "--config", config, "--run-dir", run]
    for attempt in range(3):         # a loaded machine may let the run finish past a late kill point: go earlier
        kill_at = rng.randint(2, 8) if attempt == 0 else 1
        proc = start(common, tmp_path / "killed.txt")
        if kill_when(proc, lambda: (run / "cache" / shard_name(kill_at)).exists(), tmp_path / "killed.txt",
                     may_finish=True):
            break
        shutil.rmtree(run / "cache")
    else:
        pytest.fail("every run finished before the kill landed")
    assert not (run / "cache" / INDEX).exists()
    assert len(list((run / "cache").glob("shard-*"))) < shards
    run_ok(common + ["--resume"], tmp_path / "resumed.txt")
    for s in range(shards):
        assert (run / "cache" / shard_name(s)).read_bytes() == (clean / "cache" / shard_name(s)).read_bytes(), s
    resumed, reference = (json.loads((r / "cache" / INDEX).read_text()) for r in (run, clean))
    assert resumed["shards"] == reference["shards"] and resumed["settings"] == reference["settings"]
    assert not [p.name for p in (run / "cache").iterdir() if p.name.endswith(".tmp")]
