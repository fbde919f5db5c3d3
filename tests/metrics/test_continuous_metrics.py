"""Metrics of a continuous (KL) tokenizer + DiT: rFID through encode_latent -> decode, the perturbed-
latent FID (our analogue of pFID) with its settings in metrics.json, gFID of class-balanced sample_dit draws
decoded as decode(x0 / scaling_factor), and the refusal of a DiT that does not belong to the tokenizer."""

import json

import pytest
import torch
import torch.nn.functional as F

from tokpost_fast.metrics import DiTSampling, LatentNoise, build_extractor, decode_features, evaluate_run
from tokpost_fast.report import format_table
from tokpost_fast.metrics.generation import generated_features
from tokpost_fast.metrics.pfid import CLEAN, Perturbation

SCALING_FACTOR = 0.5       # != 1, so a decode that forgets to divide by it differs


def tiny_kl(**overrides):
    """16x16 images -> 8 x 8 x 4 latents, ~40k parameters."""
    from tokpost_fast.models.tokenizer import TokenizerConfig, build_tokenizer

    values = dict(arch="kl_cnn", image_size=16, block_out_channels=[16, 32], layers_per_block=1, latent_channels=4,
                  norm_num_groups=8, scaling_factor=SCALING_FACTOR)
    values.update(overrides)
    return build_tokenizer(TokenizerConfig(**values))


def tiny_dit(**overrides):
    from tokpost_fast.models.generator import DiTConfig, build_generator

    values = dict(latent_channels=4, grid_size=8, patch_size=2, width=32, depth=1, heads=2, num_classes=3,
                  attn_backend="sdpa")
    values.update(overrides)
    return build_generator(DiTConfig(**values)).eval()


@pytest.fixture(scope="module")
def proxy():
    return build_extractor(extractor="proxy")


@pytest.fixture(scope="module")
def kl_tokenizer(photos):
    """The tiny KL autoencoder after 40 Adam steps of plain MSE through the posterior mean (so latent noise
    measurably hurts its decodes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = tiny_kl()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(40):
            x = photos[torch.randint(0, photos.shape[0], (16,), generator=gen)]
            rec, _ = model(x, sample_posterior=False)
            loss = F.mse_loss(rec, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def kl_run(tmp_path_factory, kl_tokenizer):
    """A run folder: tokenizer.pt, and generator.pt (a DiT) recording that tokenizer's sha256 as the gen stage
    does."""
    from tokpost_fast.models.generator import save_generator
    from tokpost_fast.models.tokenizer import save_tokenizer
    from tokpost_fast.atomic import file_sha256

    folder = tmp_path_factory.mktemp("kl_run")
    save_tokenizer(kl_tokenizer, str(folder / "tokenizer.pt"))
    torch.manual_seed(0)
    save_generator(tiny_dit(), folder / "generator.pt", extra={"tokenizer_hash": file_sha256(folder / "tokenizer.pt")})
    return folder


def test_noise_zero_is_rfid_and_the_noise_is_seeded_per_image(kl_tokenizer, photos, proxy):
    extractor, info = proxy
    noisy = LatentNoise(0.5)
    settings = [CLEAN, LatentNoise(0.0), noisy]
    whole, _ = decode_features(kl_tokenizer, photos[:12], extractor, info, settings, seed=3)
    assert torch.equal(whole[LatentNoise(0.0)]["pool"], whole[CLEAN]["pool"])
    split, _ = decode_features(kl_tokenizer, list(photos[:12].split(5)), extractor, info, [noisy], seed=3)
    other_seed, _ = decode_features(kl_tokenizer, photos[:12], extractor, info, [noisy], seed=4)
    torch.testing.assert_close(split[noisy]["pool"], whole[noisy]["pool"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(other_seed[noisy]["pool"], whole[noisy]["pool"])
    assert not torch.allclose(whole[noisy]["pool"], whole[CLEAN]["pool"])
    with pytest.raises(ValueError, match="continuous .*resample VQ codes"):
        decode_features(kl_tokenizer, photos[:4], extractor, info, [Perturbation(1.0, 8)])


def test_rfid_decodes_the_posterior_mean(kl_tokenizer, photos, proxy):
    """The clean decode's features equal those of decode(encode_latent(x)) computed by hand."""
    extractor, info = proxy
    decoded, _ = decode_features(kl_tokenizer, photos[:8], extractor, info, [CLEAN])
    with torch.no_grad():
        by_hand = kl_tokenizer.decode(kl_tokenizer.encode_latent(photos[:8]))
    _, expected = decode_features(kl_tokenizer, by_hand, extractor, info, [CLEAN], collect_real=True)
    torch.testing.assert_close(decoded[CLEAN]["pool"], expected["pool"])


def test_gfid_samples_are_class_balanced_seeded_and_unscaled(kl_tokenizer, proxy):
    """generated_features == features of decode(sample_dit(labels 0, 1, 2, 0, ...) / scaling_factor) drawn from
    one generator seeded with `seed`, batch by batch."""
    from tokpost_fast.models.generator import sample_dit

    extractor, info = proxy
    torch.manual_seed(1)
    dit = tiny_dit()
    sampling = DiTSampling(cfg_scale=1.5, steps=3)
    got = generated_features(kl_tokenizer, dit, 7, extractor, info, sampling, batch_size=4, seed=5)["pool"]
    rng = torch.Generator().manual_seed(5)
    scaled, unscaled = [], []
    with torch.no_grad():
        for labels in (torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0])):
            x0 = sample_dit(dit, labels, steps=3, cfg_scale=1.5, generator=rng)
            scaled.append(kl_tokenizer.decode(x0 / SCALING_FACTOR))
            unscaled.append(kl_tokenizer.decode(x0))
    _, expected = decode_features(kl_tokenizer, torch.cat(scaled), extractor, info, [CLEAN], collect_real=True)
    _, wrong = decode_features(kl_tokenizer, torch.cat(unscaled), extractor, info, [CLEAN], collect_real=True)
    torch.testing.assert_close(got, expected["pool"])
    assert not torch.allclose(got, wrong["pool"])
    with pytest.raises(ValueError, match="samples with DiTSampling"):
        generated_features(kl_tokenizer, dit, 2, extractor, info, sampling=object(), batch_size=2)


def test_metrics_json_of_a_continuous_run(kl_run, photos):
    result = evaluate_run(kl_run, metrics="rfid,pfid,gfid,is", images=photos[:32], num_generated=12, batch_size=8,
                          sample_steps=3, cfg_scale=1.5, pfid_curve=True, progress=False, extractor="proxy")
    table = format_table(result)
    assert json.loads((kl_run / "metrics.json").read_text()) == result
    values = result["values"]
    assert set(values) == {f"{m}{k}_proxy" for m in ("rfid", "pfid", "gfid") for k in ("", "_kid", "_kid_std")} | {
        "is_proxy", "is_std_proxy"}
    assert result["tokenizer_kind"] == "continuous"
    pfid = result["settings"]["pfid"]
    assert pfid["kind"] == "gaussian" and pfid["noise"] == 0.5 and pfid["seed"] == 0 and pfid["beta"] == 1.0
    assert "analogue" in pfid["note"] and "not the paper" in pfid["note"]
    generation = result["settings"]["generation"]
    assert (generation["cfg_scale"], generation["steps"], generation["class_balanced"]) == (1.5, 3, True)
    assert "sample_dit" in generation["sampler"]
    assert result["checkpoints"]["generator"]["kind"] == "dit"
    assert result["num"] == {"real": 32, "generated": 12}
    # the briefly trained decoder gets worse with more latent noise: the curve grows, noise 0 is rFID
    points = result["pfid_curve"]["points"]
    assert [p["noise"] for p in points] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert points[0]["pfid_proxy"] == values["rfid_proxy"] and points[2]["pfid_proxy"] == values["pfid_proxy"]
    assert points[-1]["pfid_proxy"] > points[0]["pfid_proxy"], points
    saved = json.loads((kl_run / "pfid_curve.json").read_text())
    assert saved["kind"] == "gaussian" and "analogue" in saved["note"]
    assert "perturbed-latent FID (proxy) [noise=0.5; our analogue, not the paper's pFID]" in table
    assert "perturbed-latent FID curve (proxy) [noise=1]" in table


def test_pfid_flags_of_the_other_kind_are_refused(kl_run, photos):
    kwargs = dict(metrics="pfid", images=photos[:8], progress=False, out=kl_run / "x.json",
                  extractor="proxy")
    with pytest.raises(ValueError, match="--pfid-delta: the tokenizer is continuous; its pFID takes --pfid-noise"):
        evaluate_run(kl_run, pfid_delta=10, **kwargs)
    with pytest.raises(ValueError, match=r"eval.pfid_noise=-1.0: must be >= 0"):
        evaluate_run(kl_run, pfid_noise=-1.0, **kwargs)
    with pytest.raises(ValueError, match="--pfid-noise: the tokenizer is VQ"):
        evaluate_run(kl_run, pfid_noise=0.3, tokenizer=_vq_tokenizer(), **kwargs)


def _vq_tokenizer():
    from tests.metrics.helpers import tiny_tokenizer_config
    from tokpost_fast.models.tokenizer import build_tokenizer

    return build_tokenizer(tiny_tokenizer_config())


def test_a_dit_of_another_tokenizer_is_refused(tmp_path, kl_tokenizer, photos):
    """The recorded tokenizer hash (gen stage), the DiT's latent size, and the generator kind are all checked;
    a post-trained export of the right tokenizer is accepted."""
    from tokpost_fast.models.generator import GeneratorConfig, build_generator, save_generator
    from tokpost_fast.models.tokenizer import save_tokenizer
    from tokpost_fast.atomic import file_sha256

    save_tokenizer(kl_tokenizer, str(tmp_path / "tokenizer.pt"))
    dit = tiny_dit()
    save_generator(dit, tmp_path / "generator.pt", extra={"tokenizer_hash": "0" * 64})
    kwargs = dict(metrics="gfid", images=photos[:8], num_generated=4, batch_size=4, sample_steps=2, progress=False,
                  extractor="proxy")
    with pytest.raises(ValueError, match="is not the tokenizer this generator was trained on"):
        evaluate_run(tmp_path, **kwargs)
    with pytest.raises(ValueError, match=r"DiT \(3-channel 8x8 latents\) does not match the tokenizer "
                                         r"\(4-channel 8x8 latents\)"):
        evaluate_run(tmp_path, generator=tiny_dit(latent_channels=3), **kwargs)
    with pytest.raises(ValueError, match=r"DiT \(4-channel 4x4 latents\)"):
        evaluate_run(tmp_path, generator=tiny_dit(grid_size=4), **kwargs)
    gpt = build_generator(GeneratorConfig(vocab_size=64, seq_len=64, num_classes=3, width=32, depth=1, heads=2,
                                          attn_backend="sdpa"))
    with pytest.raises(ValueError, match="'ar' generator, but the tokenizer is continuous"):
        evaluate_run(tmp_path, generator=gpt, **kwargs)

    original = file_sha256(tmp_path / "tokenizer.pt")
    save_generator(dit, tmp_path / "generator.pt", extra={"tokenizer_hash": original})
    save_tokenizer(kl_tokenizer, str(tmp_path / "tokenizer_post.pt"),
                   extra={"source_tokenizer": {"path": "tokenizer.pt", "sha256": original}})
    result = evaluate_run(tmp_path, tokenizer=tmp_path / "tokenizer_post.pt", **kwargs)
    assert result["values"]["gfid_proxy"] > 0


def test_cli_on_a_continuous_run_folder(kl_run, photos, tmp_path, capsys):
    """`python -m tokpost_fast.evaluate --run-dir RUN` on a continuous run folder: real images from RUN/config.yaml
    (an ImageFolder), DiT steps from its gen.sample_steps."""
    from PIL import Image

    from tokpost_fast.evaluate import main

    root = tmp_path / "images"
    for i, image in enumerate(((photos[:12] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()):
        (root / f"class{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / f"class{i % 3}" / f"{i:03d}.png")
    (kl_run / "config.yaml").write_text(
        f"data: {{root: '{root}', image_size: 16, batch_size: 8, num_workers: 0, backend: torch, val_fraction: 0.5}}\n"
        "tokenizer: {arch: kl_cnn, image_size: 16, block_out_channels: [16, 32], layers_per_block: 1,\n"
        f"            latent_channels: 4, norm_num_groups: 8, scaling_factor: {SCALING_FACTOR}}}\n"
        "gen: {generator: dit, sample_steps: 2}\n"
        "eval: {pfid_noise: 0.25, num_generated: 6, batch_size: 6}\n")
    try:
        result = main(["--run-dir", str(kl_run), "--metrics", "rfid,pfid,gfid", "--no-progress", "--extractor", "proxy",
                       "--out", str(tmp_path / "m.json"), "--stats-dir", str(tmp_path / "st")])
    finally:
        (kl_run / "config.yaml").unlink()
    assert result["num"] == {"real": 6, "generated": 6}        # the held-out half: 2 of each class's 4
    assert result["settings"]["pfid"]["noise"] == 0.25 and result["settings"]["generation"]["steps"] == 2
    assert {"rfid_proxy", "pfid_proxy", "gfid_proxy", "gfid_kid_proxy"} <= set(result["values"])
    assert "[noise=0.25; our analogue" in capsys.readouterr().out
