"""Stage `main` with a continuous (KL) tokenizer: the loss (reconstruction + GAN + kl * KL, no codebook terms), the
Gaussian perturbation schedule (our analogue of METHOD.md A2), and short `python train.py --stage main` runs that export
a loadable continuous tokenizer.pt with a measured scaling_factor and resume exactly."""

import json

import pytest
import torch

from tests.stages.conftest import run_python, write_main_config
from tokpost_fast.config import load_config
from tokpost_fast.losses import LossConfig, TokenizerLoss
from tokpost_fast.models.tokenizer import KLOutput, KLTokenizer, estimate_scaling_factor, load_tokenizer
from tokpost_fast.perturb import PerturbConfig, perturb_params, perturbed_samples
from tokpost_fast.stages.main import SCALE_IMAGES, fixed_images

# 32x32 -> 16x16 x 4 latents, 8 groups (~44k parameters): a step takes ~50 ms on the CPU
TINY_KL = dict(arch="kl_cnn", image_size=32, block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
               norm_num_groups=8, scaling_factor=None)


# --- schedule ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("epoch, noise", [(0, 0.4), (40, 0.4), (80, 0.3), (120, 0.2), (300, 0.2)])
def test_noise_is_annealed_like_alpha(epoch, noise):
    pp = perturb_params(PerturbConfig(noise=0.4), epoch)              # s 40, t 120, end_ratio 0.5
    assert pp.noise == pytest.approx(noise)
    assert pp.noise / 0.4 == pytest.approx(pp.rate / 1.0)            # the same ratio r(e) as alpha


@pytest.mark.parametrize("noise, rate, topk, continuous, expected", [
    (0.5, 0.0, 1, True, 3),       # continuous: only the noise matters
    (0.0, 1.0, 100, True, 0),
    (0.5, 0.0, 1, False, 0),      # VQ: only rate / delta matter
    (0.0, 1.0, 100, False, 3),
])
def test_perturbed_samples_per_tokenizer_kind(noise, rate, topk, continuous, expected):
    from tokpost_fast.perturb import PerturbParams

    params = PerturbParams(rate=rate, topk=topk, beta=0.3, noise=noise)
    assert perturbed_samples(params, 10, continuous) == expected        # floor(10 * 0.3) when active


def test_negative_noise_and_kl_weight_are_config_errors():
    with pytest.raises(ValueError, match="perturb.noise="):
        PerturbConfig(noise=-0.1)
    with pytest.raises(ValueError, match="LossConfig.kl="):
        LossConfig(kl=-1.0)


# --- loss -------------------------------------------------------------------------------------------------------
def test_generator_loss_adds_the_weighted_kl_and_no_codebook_terms():
    cfg = LossConfig(kl=0.25, gan=0.0, perceptual=0.0, semantic=0.0)
    loss_fn = TokenizerLoss(cfg)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    recon = images + 0.1
    kl = torch.tensor(0.8, requires_grad=True)
    out = KLOutput(z=torch.zeros(2, 4, 2, 2), mean=torch.zeros(2, 4, 2, 2), logvar=torch.zeros(2, 4, 2, 2),
                   kl_loss=kl)
    total, logs = loss_fn.generator_loss(images, recon, step=0, q=out)
    assert total.item() == pytest.approx(0.01 + 0.25 * 0.8, rel=1e-5)
    assert logs["kl_loss"].item() == pytest.approx(0.8)
    assert "codebook_loss" not in logs and "commit_loss" not in logs
    total.backward()
    assert kl.grad.item() == pytest.approx(0.25)


# --- the stage --------------------------------------------------------------------------------------------------
def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def kl_config(tiny_image_folder, tmp_path_factory):
    return write_main_config(tmp_path_factory.mktemp("kl") / "tiny_kl.yaml", tiny_image_folder,
                             tokenizer=TINY_KL, perturb={"noise": 0.5},
                             loss={"kl": 1e-3, "disc_start": 2}, train={"ckpt_interval": 100})


@pytest.fixture(scope="module")
def straight_run(kl_config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("kl_straight") / "run"
    _ok(run_python(["--stage", "main", "--config", kl_config, "--run-dir", run_dir, "--max-steps", 4]))
    return run_dir


def test_main_stage_exports_a_continuous_tokenizer(straight_run, kl_config):
    model = load_tokenizer(str(straight_run / "tokenizer.pt"))
    assert isinstance(model, KLTokenizer) and model.is_continuous and model.grid_size == 16
    export = torch.load(straight_run / "tokenizer.pt", weights_only=True)
    assert export["weights"] == "ema" and export["step"] == 4 and len(export["content_hash"]) == 64

    # scaling_factor: null in the config -> measured at export on the eval-transformed training images
    cfg = load_config(kl_config)
    expected = estimate_scaling_factor(model, fixed_images(cfg, SCALE_IMAGES))
    assert model.config.scaling_factor == pytest.approx(expected, rel=1e-5)
    rows = _rows(straight_run)
    measured = [r for r in rows if r.get("event") == "scaling_factor measured"]
    assert len(measured) == 1 and measured[0]["scaling_factor"] == pytest.approx(expected, rel=1e-5)

    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["perturbed_per_rank"] == 2 and r["perturb_noise"] == 0.5 for r in steps)   # floor(4 * 0.5)
    assert all(r["kl_loss"] > 0 for r in steps)
    assert not any(k.startswith(("codebook", "commit")) or k == "perturb_topk" for r in steps for k in r)
    assert any(r.get("disc_loss") for r in steps)                         # the GAN trained from step 2 on
    assert (straight_run / "samples" / "final.png").is_file()


@pytest.mark.slow
def test_kl_resume_continues_exactly(straight_run, kl_config, tmp_path):
    """2 steps, --resume (a new process), 2 more == 4 straight: the posterior draw (torch's global RNG, reseeded
    every step) and the perturbation draw (keyed by the step seed) repeat exactly."""
    split = tmp_path / "split"
    common = ["--stage", "main", "--config", kl_config, "--run-dir", split]
    _ok(run_python(common + ["--max-steps", 2]))
    _ok(run_python(common + ["--max-steps", 4, "--resume"]))
    a = torch.load(straight_run / "tokenizer.pt", weights_only=True)
    b = torch.load(split / "tokenizer.pt", weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-5, atol=1e-6, msg=key)
    assert b["config"]["scaling_factor"] == pytest.approx(a["config"]["scaling_factor"], rel=1e-5)
    losses = lambda run: [r["loss"] for r in _rows(run) if "loss" in r]
    assert losses(split) == pytest.approx(losses(straight_run), rel=1e-5, abs=1e-7)
