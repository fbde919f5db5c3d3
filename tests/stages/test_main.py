"""Stage `main` (METHOD.md A1 + A2): the perturbation schedule and batch split, exact resume, and a 2-rank DeepSpeed
ZeRO-2 run on the CPU (gloo) that ends with a checkpoint and an exported tokenizer."""

import json
import math
from fractions import Fraction

import pytest
import torch

from tests.stages.conftest import TINY_TOKENIZER, run_deepspeed, run_python, write_main_config
from tokpost_fast.models.tokenizer import TokenizerConfig, build_tokenizer, load_tokenizer
from tokpost_fast.perturb import PerturbConfig, anneal_ratio, perturb_params, perturbed_count, step_seed
from tokpost_fast.training.checkpoint import latest_checkpoint


# --- A2 schedule ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("epoch, ratio", [
    (0, 1.0),          # e < s
    (39.9, 1.0),
    (40, 1.0),         # e = s
    (80, 0.75),        # halfway: 1 - 0.5 * (1 - 0.5)
    (120, 0.5),        # e = t
    (500, 0.5),        # e > t
])
def test_anneal_ratio_corners(epoch, ratio):
    assert anneal_ratio(epoch, 40, 120, 0.5) == pytest.approx(ratio, abs=1e-12)


def test_anneal_ratio_other_end_ratio_is_continuous_at_t():
    assert anneal_ratio(120, 40, 120, 0.2, ramp="continuous") == pytest.approx(0.2)
    assert anneal_ratio(119.999, 40, 120, 0.2, ramp="continuous") == pytest.approx(0.2, abs=1e-4)
    assert anneal_ratio(121, 40, 120, 0.2, ramp="continuous") == pytest.approx(0.2)
    assert anneal_ratio(5, 5, 5, 0.3, ramp="continuous") == 0.3          # s == t: a step


@pytest.mark.parametrize("epoch, ratio", [(0, 1.0), (40, 1.0), (80, 0.9), (120, 0.8), (121, 0.2)])
def test_anneal_ratio_robustok_ramp_follows_the_original_code(epoch, ratio):
    # RobustTok's get_random_ratio: 1 - (e - s)/(t - s) * end_ratio on [s, t], end_ratio after t
    assert anneal_ratio(epoch, 40, 120, 0.2, ramp="robustok") == pytest.approx(ratio)
    assert anneal_ratio(epoch, 40, 120, 0.2) == pytest.approx(ratio)  # the default follows METHOD.md A2
    assert anneal_ratio(epoch, 40, 120, 0.5, ramp="robustok") == pytest.approx(anneal_ratio(epoch, 40, 120, 0.5, ramp="continuous"))


@pytest.mark.parametrize("epoch, rate, topk", [(0, 1.0, 100), (40, 1.0, 100), (80, 0.75, 75), (120, 0.5, 50),
                                               (200, 0.5, 50), (60, 0.875, 87)])
def test_perturb_params_scale_alpha_and_delta_keep_beta(epoch, rate, topk):
    pp = perturb_params(PerturbConfig(), epoch)           # alpha 1, beta 0.1, delta 100, s 40, t 120, end 0.5
    assert pp.rate == pytest.approx(rate)
    assert pp.topk == topk and isinstance(pp.topk, int)
    assert pp.beta == 0.1


def test_perturb_params_delta_never_below_one():
    cfg = PerturbConfig(delta=3, anneal_start=0, anneal_end=1, end_ratio=0.0)
    assert perturb_params(cfg, 5).topk == 1


@pytest.mark.parametrize("batch, beta", [(16, 0.1), (10, 0.3), (7, 0.5), (100, 0.29), (8, 1.0), (8, 0.0), (3, 0.2)])
def test_perturbed_count_is_floor_of_batch_times_beta(batch, beta):
    assert perturbed_count(batch, beta) == math.floor(batch * Fraction(str(beta)))


@pytest.mark.parametrize("batch, beta", [(8, 0.25), (7, 0.5), (4, 1.0), (5, 0.1)])
def test_exactly_the_first_floor_b_beta_samples_are_perturbed(batch, beta):
    torch.manual_seed(0)
    model = build_tokenizer(TokenizerConfig(**TINY_TOKENIZER)).eval()
    x = torch.rand(batch, 3, 32, 32) * 2 - 1
    n = perturbed_count(batch, beta)
    with torch.no_grad():
        _, q = model(x, perturb_rate=1.0, perturb_topk=32, perturb_samples=n, seed=step_seed(0, 7, 0))
    changed = (q.perturbed_indices != q.indices).flatten(1).any(dim=1)        # [B]
    # rate 1 over 32 codes: each of 16 tokens stays put with p 1/32, so a perturbed image changes for sure
    assert changed.tolist() == [True] * n + [False] * (batch - n)


def test_step_seed_is_deterministic_and_distinct():
    seeds = {step_seed(0, s, r) for s in range(50) for r in range(4)}
    assert len(seeds) == 200
    assert step_seed(3, 10, 1) == step_seed(3, 10, 1)
    assert all(0 <= s < 2**62 for s in seeds)


# --- the stage --------------------------------------------------------------------------------------------------
def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _module_state(run_dir, engine="autoencoder"):
    path = latest_checkpoint(run_dir) / engine / "ds" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_resume_continues_exactly(tiny_image_folder, tmp_path):
    """N steps, --resume (a new process), N more == 2N straight: same engine weights (autoencoder and
    discriminator), same EMA export. N = 5 with 6 batches per epoch: the resume lands mid-epoch (5 consumed batches
    skipped), the second half crosses into epoch 1 (annealed perturbation), and the GAN (disc_start 2) trains in
    both halves."""
    config = write_main_config(tmp_path / "tiny.yaml", tiny_image_folder, train={"ckpt_interval": 100})
    n = 5
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--stage", "main", "--config", config]
    _ok(run_python(common + ["--run-dir", straight, "--max-steps", 2 * n]))
    _ok(run_python(common + ["--run-dir", split, "--max-steps", n]))
    assert latest_checkpoint(split).name == f"step-{n:08d}"
    _ok(run_python(common + ["--run-dir", split, "--max-steps", 2 * n, "--resume"]))

    for engine in ("autoencoder", "discriminator"):
        a, b = _module_state(straight, engine), _module_state(split, engine)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"{engine}.{key}")
    ea = torch.load(straight / "tokenizer.pt", weights_only=True)
    eb = torch.load(split / "tokenizer.pt", weights_only=True)
    for key in ea["model"]:
        torch.testing.assert_close(eb["model"][key], ea["model"][key], rtol=1e-5, atol=1e-6, msg=key)
    assert ea["step"] == eb["step"] == 2 * n

    # The resumed log reads as one run: every step once, the losses of the straight run.
    steps = lambda rows: [r["step"] for r in rows if "loss" in r]
    rows_a, rows_b = _rows(straight), _rows(split)
    assert steps(rows_a) == steps(rows_b) == list(range(1, 2 * n + 1))
    for ra, rb in zip([r for r in rows_a if "loss" in r], [r for r in rows_b if "loss" in r]):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-7)
        assert rb["perturb_topk"] == ra["perturb_topk"]
    assert any(r.get("disc_loss") for r in rows_a)                    # the GAN did train


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_deepspeed_run_checkpoints_and_exports(tiny_image_folder, tmp_path):
    run_dir = tmp_path / "run"
    config = write_main_config(tmp_path / "tiny.yaml", tiny_image_folder, batch_size=4)
    result = run_deepspeed(["--stage", "main", "--config", config, "--run-dir", run_dir, "--max-steps", 3,
                            "--set", "train.ckpt_interval=2", "--set", "loss.disc_start=1"])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    assert latest_checkpoint(run_dir).name == "step-00000003"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-00000002",
                                                                         "step-00000003"]
    ckpt = latest_checkpoint(run_dir)
    # ZeRO-2 over two ranks: each rank holds its optimizer partition
    assert len(list((ckpt / "autoencoder" / "ds").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    assert (ckpt / "rng-rank1.pt").is_file()

    model = load_tokenizer(str(run_dir / "tokenizer.pt"))
    assert model.codebook_size == TINY_TOKENIZER["codebook_size"]
    export = torch.load(run_dir / "tokenizer.pt", weights_only=True)
    assert export["weights"] == "ema" and len(export["content_hash"]) == 64 and export["step"] == 3

    rows = _rows(run_dir)
    start = rows[0]
    assert start["event"] == "start" and start["world_size"] == 2 and start["local_batch"] == 4
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["perturbed_per_rank"] == 2 for r in steps)            # floor(4 * 0.5)
    assert all(r["share/quantizer"] > 0 for r in steps)
    assert all(0 < r["codebook/used"] <= 1 for r in steps)
    assert any("LPIPS weight 0" in r.get("event", "") for r in rows)
    assert (run_dir / "samples" / "final.png").is_file() and (run_dir / "config.yaml").is_file()


# --- shared machinery -------------------------------------------------------------------------------------------
def test_cosine_lr_warms_up_then_decays_to_min():
    from tokpost_fast.training.engine import cosine_lr

    lrs = [cosine_lr(s, 100, 10, 1e-3, 1e-5) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3) and lrs[100] == pytest.approx(1e-5)
    assert lrs[55] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_non_finite_guard_skips_then_stops():
    from tokpost_fast.training.engine import NonFiniteGuard, NonFiniteLossError

    guard = NonFiniteGuard(max_in_row=3, device=torch.device("cpu"))
    assert guard.ok(torch.tensor(1.0))
    assert not guard.ok(torch.tensor(float("nan")))
    assert not guard.ok(torch.tensor(1.0), torch.tensor(float("inf")))
    assert guard.ok(torch.tensor(2.0)) and guard.in_row == 0 and guard.skipped == 2
    guard.ok(torch.tensor(float("nan")))
    guard.ok(torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        guard.ok(torch.tensor(float("nan")))


@pytest.mark.slow
def test_diverged_run_stops_and_keeps_the_last_good_checkpoint(tiny_image_folder, tmp_path):
    """lr 1e30: the first update blows the weights up, every later loss is non-finite and skipped; after
    train.max_bad_steps in a row the run stops (exit code 3), and no checkpoint is written during the streak."""
    config = write_main_config(tmp_path / "tiny.yaml", tiny_image_folder)
    run_dir = tmp_path / "run"
    result = run_python(["--stage", "main", "--config", config, "--run-dir", run_dir, "--max-steps", 20,
                         "--set", "train.lr=1e30", "--set", "train.min_lr=1e30", "--set", "train.warmup_epochs=0",
                         "--set", "train.max_bad_steps=3", "--set", "train.ckpt_interval=1",
                         "--set", "loss.disc_start=100"])
    assert result.returncode == 3, result.stderr[-3000:]
    assert "3 non-finite losses in a row" in result.stderr
    assert latest_checkpoint(run_dir).name == "step-00000001"
    assert not (run_dir / "tokenizer.pt").exists()
    last = _rows(run_dir)[-1]
    assert last["nan_skipped"] == 3 and "non-finite" in last["event"]


def test_codebook_usage_over_a_window():
    from tokpost_fast.training.codebook import CodebookUsage

    usage = CodebookUsage(codebook_size=8, window=2)
    counts = lambda codes: torch.bincount(torch.tensor(codes), minlength=8)
    usage.add(counts([0, 0, 1, 1]))
    assert usage.summary() == {"codebook/used": 0.25, "codebook/perplexity": pytest.approx(2.0)}
    usage.add(counts([2, 3]))
    usage.add(counts([2, 3, 4, 5]))                    # the first step leaves the window
    s = usage.summary()
    assert s["codebook/used"] == 0.5                   # codes 2, 3, 4, 5
    p = [1 / 3, 1 / 3, 1 / 6, 1 / 6]
    assert s["codebook/perplexity"] == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)))
