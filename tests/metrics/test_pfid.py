"""rFID / pFID decodes (METHOD.md A3): alpha = 0 is rFID exactly, the perturbation is batch-split independent, and on a
briefly trained tokenizer pFID grows with alpha."""

import json
import os

import pytest
import torch

from tests.metrics.helpers import tiny_tokenizer_config
from tokpost_fast.metrics import Perturbation, build_extractor, decode_features, evaluate_run, pfid_curve
from tokpost_fast.metrics.pfid import CLEAN, tokenizer_codebook


@pytest.fixture(scope="module")
def proxy():
    return build_extractor(extractor="proxy")


@pytest.fixture(scope="module")
def random_tokenizer():
    from tokpost_fast.models.tokenizer import build_tokenizer

    torch.manual_seed(1)
    return build_tokenizer(tiny_tokenizer_config()).eval()


def test_clean_codes_are_the_tokenizers_own(random_tokenizer, photos):
    """rFID decodes model.encode's tokens: the same normalisation and nearest-code kernel as the quantizer."""
    from tokpost_fast import ops

    x = photos[:8]
    z = random_tokenizer.encode_latent(x).permute(0, 2, 3, 1)
    idx, _ = ops.perturb_codes(z, tokenizer_codebook(random_tokenizer), 0.0, 1, 0, metric="cosine")
    assert torch.equal(idx, random_tokenizer.encode(x))


def test_pfid_at_alpha_zero_is_rfid(trained_tokenizer, photos, proxy, tmp_path):
    extractor, info = proxy
    pfid0, _ = decode_features(trained_tokenizer, photos[:24], extractor, info, [Perturbation(0.0, 64)], seed=7)
    rfid, _ = decode_features(trained_tokenizer, photos[:24], extractor, info, [CLEAN], seed=7)
    assert torch.equal(pfid0[Perturbation(0.0, 64)]["pool"], rfid[CLEAN]["pool"])
    result = evaluate_run(tmp_path, metrics="rfid,pfid", pfid_alpha=0.0, tokenizer=trained_tokenizer,
                          images=photos[:24], progress=False, extractor="proxy")
    assert result["values"]["pfid_proxy"] == result["values"]["rfid_proxy"]


def test_perturbation_ignores_batch_split(random_tokenizer, photos, proxy):
    """Philox positions are image-ordinal * tokens + t: batches of 5 give the same perturbed decodes as one."""
    extractor, info = proxy
    setting = Perturbation(0.6, 16)
    whole, _ = decode_features(random_tokenizer, photos[:12], extractor, info, [setting], seed=3)
    split, _ = decode_features(random_tokenizer, list(photos[:12].split(5)), extractor, info, [setting], seed=3)
    other_seed, _ = decode_features(random_tokenizer, photos[:12], extractor, info, [setting], seed=4)
    torch.testing.assert_close(split[setting]["pool"], whole[setting]["pool"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(other_seed[setting]["pool"], whole[setting]["pool"])


@pytest.mark.slow
def test_pfid_grows_with_alpha(trained_tokenizer, photos, tmp_path):
    curve = pfid_curve(tmp_path, tokenizer=trained_tokenizer, images=photos, progress=False, extractor="proxy")
    values = [p["pfid_proxy"] for p in curve["points"]]
    assert [p["alpha"] for p in curve["points"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve["delta"] == 64 and curve["proxy"]  # min(100, K = 64)
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert os.path.getsize(tmp_path / "pfid_curve.png") > 0
    saved = json.loads((tmp_path / "pfid_curve.json").read_text())
    assert saved["proxy"] and [p["pfid_proxy"] for p in saved["points"]] == values
