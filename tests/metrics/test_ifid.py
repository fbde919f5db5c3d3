"""iFID (metrics/ifid.py): the fused nearest-neighbour search + interpolation against a brute-force float64
PyTorch reference on random latents of awkward shapes, the image itself never its own neighbour, and the end to
end features / FID of a tiny KL tokenizer against the same computation written out by hand."""

import pytest
import torch

from tokpost_fast.metrics import build_extractor
from tokpost_fast.metrics.features import FeatureCollector, fid_between, fid_statistics
from tokpost_fast.metrics.ifid import (
    IFIDSettings, ifid_features, interpolate, interpolated_latents, interpolated_latents_reference, nearest_neighbours,
)

SETTINGS = [IFIDSettings(0.5, "slerp", "cosine"), IFIDSettings(0.5, "linear", "l2"),
            IFIDSettings(0.3, "slerp", "l2"), IFIDSettings(0.8, "linear", "cosine")]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s.interpolation}-{s.distance}-{s.t}")
@pytest.mark.parametrize("shape", [(37, 4, 5, 3), (53, 7), (2, 3, 3, 3)])
def test_matches_brute_force_reference(settings, shape):
    gen = torch.Generator().manual_seed(hash((shape, settings.t)) % 2**31)
    # an offset keeps cosine and l2 neighbours apart, so the two distances are told apart by the comparison
    z = torch.randn(shape, generator=gen) + 0.5 * torch.randn(shape[0], *([1] * (len(shape) - 1)), generator=gen)
    got, idx = interpolated_latents(z, settings)
    want, want_idx = interpolated_latents_reference(z, settings)
    assert torch.equal(idx.cpu(), want_idx)
    assert not torch.any(idx.cpu() == torch.arange(shape[0]))
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("settings", SETTINGS[:2], ids=lambda s: s.interpolation)
def test_explicit_reference_set(settings):
    gen = torch.Generator().manual_seed(1)
    z, ref = torch.randn(19, 4, 3, 3, generator=gen), torch.randn(41, 4, 3, 3, generator=gen)
    got, idx = interpolated_latents(z, settings, reference=ref)
    want, want_idx = interpolated_latents_reference(z, settings, reference=ref)
    assert torch.equal(idx.cpu(), want_idx)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_duplicates_find_the_other_copy_and_distances_differ():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(9, 6, generator=gen)
    z[7] = z[2]
    idx = nearest_neighbours(z)
    assert idx[2] == 7 and idx[7] == 2
    # cosine ignores scale, l2 does not: a scaled copy is the cosine neighbour, a small shift the l2 one
    base = torch.randn(1, 16, generator=gen)
    z = torch.cat([base, base * 5.0, base + 0.3 * torch.randn(1, 16, generator=gen), torch.randn(4, 16, generator=gen)])
    assert nearest_neighbours(z, distance="cosine")[0] == 1
    assert nearest_neighbours(z, distance="l2")[0] == 2


def test_interpolation_endpoints_and_bad_settings():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 2, 3, generator=gen), torch.randn(5, 2, 3, generator=gen)
    for how in ("slerp", "linear"):
        torch.testing.assert_close(interpolate(a, b, 0.0, how), a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(interpolate(a, b, 1.0, how), b, rtol=1e-5, atol=1e-5)
    # slerp keeps the norm of unit vectors; linear shrinks it
    ua, ub = a.flatten(1) / a.flatten(1).norm(dim=1, keepdim=True), b.flatten(1) / b.flatten(1).norm(dim=1, keepdim=True)
    torch.testing.assert_close(interpolate(ua, ub, 0.5, "slerp").norm(dim=1), torch.ones(5), rtol=1e-5, atol=1e-5)
    assert (interpolate(ua, ub, 0.5, "linear").norm(dim=1) < 0.999).all()
    for bad in (dict(t=1.5), dict(t=float("nan")), dict(interpolation="cubic"), dict(distance="l1")):
        with pytest.raises(ValueError, match="ifid"):
            IFIDSettings(**bad)
    with pytest.raises(ValueError, match="at least 2"):
        nearest_neighbours(torch.randn(1, 4))


def test_features_of_a_kl_tokenizer_match_a_hand_written_ifid():
    from tokpost_fast.models.tokenizer import TokenizerConfig, build_tokenizer

    torch.manual_seed(0)
    model = build_tokenizer(TokenizerConfig(arch="kl_cnn", image_size=16, block_out_channels=[16, 32],
                                            layers_per_block=1, latent_channels=4, norm_num_groups=8,
                                            scaling_factor=0.5)).eval()
    extractor, info = build_extractor(extractor="proxy")
    images = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    settings = IFIDSettings()
    out = ifid_features(model, images, extractor, info, settings, batch_size=5)
    with torch.no_grad():
        z = model.encode_latent(images)
        mixed, idx = interpolated_latents_reference(z, settings)
        hand = FeatureCollector(extractor, info)
        hand.add(model.decode(mixed).clamp(-1, 1))
        rec = FeatureCollector(extractor, info)
        rec.add(model.decode(z).clamp(-1, 1))
        real = FeatureCollector(extractor, info)
        real.add(images)
    layer = info.fid_layer
    assert torch.equal(out["neighbours"], idx) and out["num"] == 12
    torch.testing.assert_close(out["features"][layer], hand.result()[layer], rtol=1e-3, atol=1e-3)
    real_stats = fid_statistics(real.result()[layer], "real")
    ifid = fid_between(fid_statistics(out["features"][layer], "ifid"), real_stats)
    rfid = fid_between(fid_statistics(rec.result()[layer], "rec"), real_stats)
    assert ifid != pytest.approx(rfid, rel=1e-3)          # the interpolation changed what was decoded
    # t = 0 decodes the image's own latent: iFID is rFID
    zero = ifid_features(model, images, extractor, info, IFIDSettings(t=0.0), batch_size=5)
    torch.testing.assert_close(zero["features"][layer], rec.result()[layer], rtol=1e-3, atol=1e-3)


def test_refuses_a_vq_tokenizer(trained_tokenizer, photos):
    extractor, info = build_extractor(extractor="proxy")
    with pytest.raises(ValueError, match="VQ tokenizer"):
        ifid_features(trained_tokenizer, photos[:4], extractor, info)


def test_evaluate_reports_ifid_for_continuous_and_skips_vq(tmp_path):
    """The `evaluate` hook: metrics=ifid gives iFID and its KID under the extractor's label, with its settings;
    a VQ tokenizer's ifid is skipped with the reason."""
    from tests.metrics.helpers import tiny_tokenizer_config
    from tokpost_fast.metrics import evaluate_run
    from tokpost_fast.models.tokenizer import TokenizerConfig, build_tokenizer

    torch.manual_seed(0)
    kl = build_tokenizer(TokenizerConfig(arch="kl_cnn", image_size=16, block_out_channels=[16, 32],
                                         layers_per_block=1, latent_channels=4, norm_num_groups=8,
                                         scaling_factor=0.5)).eval()
    images = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    kwargs = dict(images=images, generator=False, progress=False, extractor="proxy")
    result = evaluate_run(tmp_path, metrics="rfid,ifid", tokenizer=kl, out=tmp_path / "kl.json", **kwargs)
    values = result["values"]
    assert {"ifid_proxy", "ifid_kid_proxy", "ifid_kid_std_proxy", "rfid_proxy"} <= set(values)
    assert values["ifid_proxy"] != pytest.approx(values["rfid_proxy"], rel=1e-3)
    assert result["ifid"]["t"] == 0.5 and result["ifid"]["interpolation"] == "slerp" and result["ifid"]["images"] == 10
    vq = evaluate_run(tmp_path, metrics="rfid,ifid", tokenizer=build_tokenizer(tiny_tokenizer_config()),
                      out=tmp_path / "vq.json", **kwargs)
    assert "ifid_proxy" not in vq["values"] and "continuous" in vq["skipped"]["ifid"]
