"""Codebook health in the quantizer (models/tokenizer/quantizer.py): the dead-code tracker and its restarts, the
optimizer-state reset, state round trips, torch.compile, k-means init, and the collapse case they are for.

The collapse case: the random-init ViT tokenizer on smooth images collapses to one code within ~25 steps (the
README's note; tests/models/tokenizer/test_vit_learns.py). With dead-code restarts at the CodebookConfig defaults
it keeps most of the codebook in use on held-out images. `collapse_run` is also what
benchmarks/dead_code_restarts.py runs over several seeds for the README's numbers.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from tokpost_fast import ops
from tokpost_fast.metrics.codebook_usage import usage_stats
from tokpost_fast.models.tokenizer import build_tokenizer
from tokpost_fast.models.tokenizer.config import CodebookConfig, TokenizerConfig
from tokpost_fast.models.tokenizer.quantizer import DeadCodeTracker, VectorQuantizer, overwrite_rows

COLLAPSE_TOKENIZER = dict(arch="vit", image_size=32, codebook_size=256, codebook_embed_dim=8, width=64, depth=2,
                          heads=4, patch_size=8, num_latent_tokens=16)


def smooth_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """Low-frequency random images in [-1, 1] (4x4 noise upsampled bilinearly), as tests/stages' image folder."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) * 2 - 1


def collapse_run(seed: int, restart: bool, steps: int = 200, kmeans_init: bool = False, batch: int = 16,
                 threads: int = 1) -> dict:
    """Train the collapse case (MSE + codebook + 0.25 commitment, AdamW as the main stage) and measure held-out
    code usage and MSE. restart: dead-code restarts at the CodebookConfig defaults (the tracker counts either
    way); kmeans_init: the codebook starts as k-means centroids of the first 64 training images' latents.
    threads: torch threads for the run (restored after). One thread: these ops are too small to share, and on a
    loaded 2-core machine two spinning threads made the run 15x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _collapse_run(seed, restart, steps, kmeans_init, batch)
    finally:
        torch.set_num_threads(before)


def _collapse_run(seed: int, restart: bool, steps: int, kmeans_init: bool, batch: int) -> dict:
    cb = CodebookConfig()
    data, held_out = smooth_images(512, 100 + seed), smooth_images(256, 999)
    torch.manual_seed(seed)
    model = build_tokenizer(TokenizerConfig(**COLLAPSE_TOKENIZER))
    if kmeans_init:
        with torch.no_grad():
            z = model.encode_latent(data[:64])
        model.quantize.init_from_kmeans(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), cb.kmeans_iters, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0)
    tracker = DeadCodeTracker(model.quantize, cb.dead_threshold, cb.dead_window, cb.usage_decay)
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        x = data[torch.randint(0, len(data), (batch,), generator=g)]
        recon, q = model(x)
        loss = F.mse_loss(recon, x) + q.codebook_loss + 0.25 * q.commit_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        tracker.observe(q.indices)
        if restart:
            tracker.restart(seed=step, optimizer=opt)
    model.eval()
    with torch.no_grad():
        recon, q = model(held_out)
    usage = usage_stats(q.indices, model.codebook_size)
    return {"used": usage["used"], "perplexity": usage["perplexity"], "mse": F.mse_loss(recon, held_out).item(),
            "restarted": tracker.restarted, "dead_at_end": tracker.dead_count()}


def test_restarts_keep_the_collapsing_vit_codebook_alive():
    """Control arm first: the same run without restarts must collapse, else this test shows nothing."""
    control = collapse_run(seed=0, restart=False)
    restarted = collapse_run(seed=0, restart=True)
    print(f"control {control}\nrestarts {restarted}")
    assert control["used"] <= 2, f"the control did not collapse ({control}): the case no longer tests anything"
    assert restarted["used"] >= 128, f"restarts kept {restarted['used']} of 256 codes in use: {restarted}"
    assert restarted["perplexity"] >= 32
    assert restarted["mse"] < control["mse"], (restarted, control)


# --- the tracker --------------------------------------------------------------------------------------------------
def test_usage_ema_window_and_dead_codes_follow_the_definition():
    quantizer = VectorQuantizer(4, 3)
    tracker = DeadCodeTracker(quantizer, threshold=1.0, window=2, decay=0.5, capture=False)
    steps = [[0, 0, 1, 2], [0, 0, 0, 0], [0, 0, 3, 3]]
    usage = torch.zeros(4, dtype=torch.float64)
    below = torch.zeros(4, dtype=torch.int64)
    for i, idx in enumerate(steps):
        tracker.observe(torch.tensor(idx))
        counts = torch.bincount(torch.tensor(idx), minlength=4).double()
        usage = counts if i == 0 else 0.5 * usage + 0.5 * counts
        below = torch.where(usage < 1.0, below + 1, 0)
        assert torch.equal(tracker.usage, usage) and torch.equal(tracker.below, below)
    # usage after 3 steps: [2.5, 0.25, 0.25, 1.0]; codes 1 and 2 below 1 for steps 2 and 3
    assert tracker.dead().tolist() == [False, True, True, False] and tracker.dead_count() == 2


def test_restart_writes_normalised_latent_rows_into_dead_codes_only():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 4)
    tracker = DeadCodeTracker(quantizer, threshold=0.5, window=1, decay=0.9, capture=False)
    tracker.observe(torch.tensor([3, 3, 5, 9]))                       # 13 codes unused
    before = quantizer.embedding.weight.detach().clone()
    latents = torch.randn(40, 4) * 3
    restart = tracker.restart(seed=1, latents=latents)
    dead = [c for c in range(16) if c not in (3, 5, 9)]
    assert restart.rows.tolist() == dead
    after = quantizer.embedding.weight.detach()
    assert torch.equal(after[[3, 5, 9]], before[[3, 5, 9]])
    normalised = F.normalize(latents, dim=-1)
    match = (after[dead][:, None, :] - normalised[None]).abs().amax(-1) < 1e-6       # [13, 40]
    assert (match.sum(1) == 1).all(), "each new code is one latent row, l2-normalised"
    assert match.any(0).sum() == len(dead), "no latent row is used twice"
    assert tracker.usage[dead].eq(0.5).all() and tracker.below[dead].eq(0).all() and tracker.restarted == 13


def test_more_dead_codes_than_latents_restarts_a_random_subset():
    quantizer = VectorQuantizer(64, 4, l2_norm=False)
    tracker = DeadCodeTracker(quantizer, threshold=0.5, window=1, decay=0.9, capture=False)
    tracker.observe(torch.tensor([0]))                                  # 63 dead, 10 latent rows
    latents = torch.randn(10, 4)
    restart = tracker.restart(seed=5, latents=latents)
    assert restart.rows.numel() == 10 and restart.rows.unique().numel() == 10 and 0 not in restart.rows
    assert torch.equal(restart.values.sort(0).values, latents.sort(0).values)   # l2 metric: the rows themselves
    assert tracker.dead_count() == 53
    seen = []
    for seed in range(30):
        fresh = DeadCodeTracker(VectorQuantizer(64, 4, l2_norm=False), 0.5, 1, 0.9, capture=False)
        fresh.observe(torch.tensor([0]))
        seen += fresh.sample(seed, latents).rows.tolist()
    # 30 draws of 10 from 63 codes: each code expected 4.8 times; the subset must vary with the seed
    assert len(set(seen)) > 50


def test_restart_resets_the_adam_moments_of_the_rows():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(8, 4, l2_norm=False)
    opt = torch.optim.AdamW(quantizer.parameters(), lr=0.1, weight_decay=0.0)
    for _ in range(3):
        quantizer.embedding.weight.sum().mul(1.0).backward()          # every row gets a gradient
        opt.step()
        opt.zero_grad()
    rows, values = torch.tensor([1, 6]), torch.randn(2, 4)
    moments_before = {k: v.clone() for k, v in opt.state[quantizer.embedding.weight].items()}
    overwrite_rows(quantizer.embedding.weight, rows, values, opt)
    state = opt.state[quantizer.embedding.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key][rows].eq(0).all()
        keep = [0, 2, 3, 4, 5, 7]
        assert torch.equal(state[key][keep], moments_before[key][keep])
    # A step with zero gradients leaves fresh rows exactly where they were written (zero moments, no decay).
    quantizer.embedding.weight.grad = torch.zeros_like(quantizer.embedding.weight)
    opt.step()
    assert torch.equal(quantizer.embedding.weight.detach()[rows], values)


def test_state_round_trip_reproduces_restarts():
    """Resume: a tracker restored mid-run restarts the same codes with the same vectors as the straight run."""
    def run(split: bool):
        torch.manual_seed(0)
        quantizer = VectorQuantizer(32, 4)
        tracker = DeadCodeTracker(quantizer, threshold=2.0, window=2, decay=0.8, capture=False)
        gen = torch.Generator().manual_seed(1)
        history = []
        for step in range(8):
            if split and step == 4:
                state = tracker.state_dict()
                tracker = DeadCodeTracker(quantizer, 2.0, 2, 0.8, capture=False)
                tracker.load_state_dict(state)
            latents = torch.randn(24, 4, generator=gen)
            tracker.observe(quantizer(latents.T.reshape(1, 4, 4, 6)).indices)
            restart = tracker.restart(seed=step, latents=latents)
            history.append(None if restart is None else (restart.rows.tolist(), restart.values.clone()))
        return history, quantizer.embedding.weight.detach().clone(), tracker.state_dict()

    (h1, w1, s1), (h2, w2, s2) = run(False), run(True)
    assert sum(h is not None for h in h1) >= 2, "the scenario must restart codes on both sides of the split"
    for a, b in zip(h1, h2):
        assert (a is None) == (b is None) and (a is None or (a[0] == b[0] and torch.equal(a[1], b[1])))
    assert torch.equal(w1, w2) and torch.equal(s1["usage"], s2["usage"]) and torch.equal(s1["below"], s2["below"])


def test_compiled_quantizer_uses_restarted_codes_without_recompiling():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(64, 8)
    compiled = torch.compile(quantizer, fullgraph=True)
    tracker = DeadCodeTracker(quantizer, threshold=0.5, window=1, decay=0.5, capture=False)
    z = torch.randn(2, 8, 4, 4)
    first = compiled(z, seed=0)
    tracker.observe(first.indices)
    latents = z.permute(0, 2, 3, 1).reshape(-1, 8)
    restart = tracker.restart(seed=0, latents=latents)
    assert restart is not None and restart.rows.numel() >= 32
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = compiled(z, seed=0)
    eager = quantizer(z, seed=0)
    assert torch.equal(second.indices, eager.indices)
    torch.testing.assert_close(second.z_q, eager.z_q)
    # The latent rows that became codes now quantize to exactly those codes.
    chosen = (quantizer.codebook()[restart.rows][:, None] - F.normalize(latents, dim=-1)[None]).abs().amax(-1)
    source = chosen.argmin(1)
    assert torch.equal(second.indices.reshape(-1)[source], restart.rows)


def test_kmeans_init_puts_the_codebook_on_the_latents():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(64, 8), dim=-1)
    latents = centres[torch.randint(0, 64, (4096,))] + 0.02 * torch.randn(4096, 8)
    uniform = VectorQuantizer(64, 8)
    fitted = VectorQuantizer(64, 8)
    inertia = fitted.init_from_kmeans(latents, iters=10, seed=0)
    grid = latents.T.reshape(1, 8, 64, 64)
    used_uniform = uniform(grid).indices.unique().numel()
    used_fitted = fitted(grid).indices.unique().numel()
    assert torch.allclose(fitted.embedding.weight.norm(dim=1), torch.ones(64))   # cosine: unit centroids
    assert used_fitted >= 56 and used_fitted > used_uniform, (used_fitted, used_uniform)
    uniform_distance = ops.nearest_codes(latents, uniform.embedding.weight, metric="cosine")[0].mean()
    assert math.isfinite(float(inertia)) and float(inertia) < 0.25 * float(uniform_distance)
    with pytest.raises(ValueError, match="at least K = 64 latent rows"):
        VectorQuantizer(64, 8).init_from_kmeans(latents[:10])


@pytest.mark.parametrize("kwargs, match", [
    (dict(threshold=0.0, window=1, decay=0.5), "threshold must be > 0"),
    (dict(threshold=1.0, window=0, decay=0.5), "window must be an int >= 1"),
    (dict(threshold=1.0, window=1, decay=1.0), r"decay must be in \[0, 1\)"),
])
def test_bad_tracker_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeadCodeTracker(VectorQuantizer(4, 2), **kwargs)
