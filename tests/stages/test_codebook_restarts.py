"""Dead-code restarts in training: DeepSpeed ZeRO-2 over 2 ranks keeps the same codebook (and the same fp32 master
of it) on every rank, and --resume reproduces the restart state exactly.

Run under the DeepSpeed launcher this file is also the worker of the ZeRO-2 test:
    deepspeed --num_gpus 2 tests/stages/test_codebook_restarts.py --worker OUT_DIR
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.stages.conftest import REPO, free_port, launch_env, run_deepspeed, run_python, write_main_config
from tokpost_fast.training.checkpoint import STATE_FILE, latest_checkpoint

# Restarts within a few steps of the tiny main-stage config (64 tokens per rank per step, K = 64).
RESTARTS = {"restart_dead": True, "dead_threshold": 1.0, "dead_window": 2, "usage_decay": 0.5}


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("overrides, match", [
    (["codebook.init=kmeans", "codebook.kmeans_images=1"], r"codebook.kmeans_images=1: 64 latent tokens for K = 1024"),
    (["codebook.init=farthest"], r"codebook.init='farthest': must be one of \('uniform', 'kmeans'\)"),
    (["codebook.dead_window=0"], "codebook.dead_window=0: must be >= 1"),
    (["codebook.usage_decay=1.0"], r"codebook.usage_decay=1.0: must be in \[0, 1\)"),
    (["tokenizer.preset=demo_kl", "codebook.restart_dead=true"], "'kl_cnn' has no codebook"),
    (["codebook.restart_dead=2"], "expected true/false"),
])
def test_codebook_config_errors_name_the_field(overrides, match):
    from tokpost_fast.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


# --- ZeRO-2 on two ranks, at the level of the parameter ----------------------------------------------------------
def _worker(out_dir: Path) -> None:
    """Two ranks, ZeRO-2: a 64 x 8 codebook followed by a 1x1 conv (584 parameters), so the flat buffer's two
    partitions split the codebook inside row 36. Three training steps on different data per rank, then 48 dead
    codes are restarted from latents that differ per rank, then one step with zero gradients."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from tokpost_fast.models.tokenizer.quantizer import DeadCodeTracker, VectorQuantizer
    from tokpost_fast.training.engine import adamw, build_engine, deepspeed_config, init_distributed

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.quantizer = VectorQuantizer(64, 8)
            self.proj = torch.nn.Conv2d(8, 8, 1)

        def forward(self, x):
            q = self.quantizer(self.proj(x))
            return q.codebook_loss + q.commit_loss + q.z_q.square().mean()

    info = init_distributed()
    torch.manual_seed(0)
    model = Toy()
    ds_cfg = deepspeed_config("configs/deepspeed/zero2.json", 2, info.world_size, zero_stage=2, grad_clip=1.0)
    optimizer = adamw(model.parameters(), 1e-2, (0.9, 0.95), 0.0)
    engine = build_engine(model, optimizer, ds_cfg)
    gen = torch.Generator().manual_seed(100 + info.rank)
    for _ in range(3):
        loss = engine(torch.randn(2, 8, 4, 4, generator=gen))
        engine.backward(loss)
        engine.step()
    weight = model.quantizer.embedding.weight
    tracker = DeadCodeTracker(model.quantizer, threshold=1.5, window=1, decay=0.5, capture=False)
    tracker.observe(torch.arange(16))               # summed over 2 ranks: codes 0-15 used twice, 16-63 dead
    latents = torch.randn(48, 8, generator=gen)
    restart = tracker.restart(seed=11, optimizer=optimizer, latents=latents)
    record = {"rows": restart.rows, "values": restart.values, "latents": latents,
              "after_restart": weight.detach().clone(), "master": safe_get_full_fp32_param(weight),
              "exp_avg": safe_get_full_optimizer_state(weight, "exp_avg"),
              "exp_avg_sq": safe_get_full_optimizer_state(weight, "exp_avg_sq")}
    loss = engine(torch.randn(2, 8, 4, 4, generator=gen)) * 0.0
    engine.backward(loss)
    engine.step()
    record["after_step"] = weight.detach().clone()
    torch.save(record, out_dir / f"rank{info.rank}.pt")


@pytest.mark.slow
@pytest.mark.distributed
def test_zero2_restart_is_identical_on_every_rank_and_survives_the_next_step(tmp_path):
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), str(Path(__file__).resolve()),
           "--worker", str(tmp_path)]
    _ok(subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    a, b = ranks
    rows = a["rows"]
    assert rows.tolist() == list(range(16, 64))
    # every rank wrote the same rows, drawn from the latents of both ranks (48 per rank: 48 rows need both)
    assert torch.equal(a["after_restart"], b["after_restart"]) and torch.equal(a["values"], b["values"])
    pooled = F.normalize(torch.cat([a["latents"], b["latents"]]), dim=-1)
    source = (a["values"][:, None] - pooled[None]).abs().amax(-1).argmin(1)
    assert torch.allclose(a["values"], pooled[source]) and source.unique().numel() == 48
    assert (source < 48).any() and (source >= 48).any()
    for rank in ranks:
        assert torch.equal(rank["after_restart"][rows], rank["values"])
        # ZeRO's fp32 master (both partitions, row 36 split between them) holds the new rows; moments are zero
        assert torch.equal(rank["master"], rank["after_restart"])
        assert rank["exp_avg"][rows].eq(0).all() and rank["exp_avg_sq"][rows].eq(0).all()
        assert rank["exp_avg"][:16].abs().sum() > 0
    # The next step (zero gradients) copies the master back into the module: the restarted rows stay exactly where
    # they were written (zero moments), the others move on their momentum.
    assert torch.equal(a["after_step"], b["after_step"])
    assert torch.equal(a["after_step"][rows], a["values"])
    assert not torch.equal(a["after_step"][:16], a["after_restart"][:16])


# --- the main stage -----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_main_stage_restarts_keep_every_rank_identical(tiny_image_folder, tmp_path):
    """With k-means init too: 8 images (4 per rank) x 16 tokens pooled for K = 64 codes."""
    config = write_main_config(tmp_path / "tiny.yaml", tiny_image_folder, loss={"disc_start": 100},
                               codebook={**RESTARTS, "init": "kmeans", "kmeans_images": 8})
    run_dir = tmp_path / "run"
    _ok(run_deepspeed(["--stage", "main", "--config", config, "--run-dir", run_dir, "--max-steps", 6,
                       "--set", "train.ckpt_interval=6"]))
    init = next(r for r in _rows(run_dir) if r.get("event") == "codebook k-means init")
    assert (init["images"], init["latent_rows"]) == (8, 128) and init["inertia_per_row"] < 0.5
    rows = [r for r in _rows(run_dir) if "loss" in r]
    restarts = [r["codebook/restart_fingerprints"] for r in rows if "codebook/restart_fingerprints" in r]
    assert restarts, "no restart happened: the test settings no longer make dead codes"
    for prints in restarts:               # [rank 0 module, rank 0 master, rank 1 module, rank 1 master]
        assert len(prints) == 4 and len(set(prints)) == 1, prints
    assert rows[-1]["codebook/restarted"] > 0
    assert all(isinstance(r["codebook/dead"], int) and 0 <= r["codebook/used"] <= 1 for r in rows)
    state = torch.load(latest_checkpoint(run_dir) / STATE_FILE, map_location="cpu", weights_only=False)
    assert state["codebook"]["steps"] == 6 and state["codebook"]["restarted"] == rows[-1]["codebook/restarted"]


@pytest.mark.slow
def test_resume_reproduces_the_restart_state_exactly(tiny_image_folder, tmp_path):
    """N steps + --resume + N steps == 2N straight steps, with codes restarted in both halves: the same tracker
    state, the same restarts (count and codebook bytes per logged step), the same weights."""
    config = write_main_config(tmp_path / "tiny.yaml", tiny_image_folder, codebook=dict(RESTARTS),
                               train={"ckpt_interval": 100})
    n = 5
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--stage", "main", "--config", config]
    _ok(run_python(common + ["--run-dir", straight, "--max-steps", 2 * n]))
    _ok(run_python(common + ["--run-dir", split, "--max-steps", n]))
    _ok(run_python(common + ["--run-dir", split, "--max-steps", 2 * n, "--resume"]))

    def restart_columns(run_dir):
        return [(r["step"], r["codebook/restarted"], r.get("codebook/restart_fingerprints"), r["codebook/dead"])
                for r in _rows(run_dir) if "loss" in r]

    a, b = restart_columns(straight), restart_columns(split)
    assert a == b
    assert a[n - 1][1] > 0 and a[-1][1] > a[n - 1][1], f"restarts must happen in both halves: {a}"
    sa = torch.load(latest_checkpoint(straight) / STATE_FILE, map_location="cpu", weights_only=False)["codebook"]
    sb = torch.load(latest_checkpoint(split) / STATE_FILE, map_location="cpu", weights_only=False)["codebook"]
    assert torch.equal(sa["usage"], sb["usage"]) and torch.equal(sa["below"], sb["below"])
    assert (sa["steps"], sa["restarted"]) == (sb["steps"], sb["restarted"]) == (2 * n, a[-1][1])
    ea = torch.load(straight / "tokenizer.pt", weights_only=True)["model"]
    eb = torch.load(split / "tokenizer.pt", weights_only=True)["model"]
    for key in ea:
        torch.testing.assert_close(eb[key], ea[key], rtol=1e-5, atol=1e-6, msg=key)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(Path(sys.argv[sys.argv.index("--worker") + 1]))
