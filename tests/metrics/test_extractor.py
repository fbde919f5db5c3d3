"""The offline proxy extractor (registered in torch-fidelity, used only when asked for by name) and the Inception
weights check."""

import os
import subprocess
import sys

import pytest
import torch
import torch_fidelity
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from tokpost_fast.metrics import PROXY_NAME, ProxyFeatureExtractor, build_extractor, extract_features
from tokpost_fast.metrics.extractor import INCEPTION_NAME

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PROBE = """
import torch
from tokpost_fast.metrics import build_extractor
extractor, info = build_extractor(extractor="proxy")
x = (torch.arange(2 * 3 * 24 * 24) % 251).to(torch.uint8).reshape(2, 3, 24, 24)
print(info.extractor_id)
print(extractor.weights_sha256())
print(repr(extractor(x)[0].double().sum().item()))
"""


def _probe_input():
    return (torch.arange(2 * 3 * 24 * 24) % 251).to(torch.uint8).reshape(2, 3, 24, 24)


def test_proxy_is_registered_in_torch_fidelity():
    assert FEATURE_EXTRACTORS_REGISTRY[PROXY_NAME] is ProxyFeatureExtractor
    _, info = build_extractor(extractor="proxy")
    assert info.proxy and info.label == "_proxy" and info.extractor_id.startswith(PROXY_NAME + ":")


def test_proxy_is_deterministic_across_instances_and_processes():
    a, info_a = build_extractor(extractor="proxy")
    torch.manual_seed(123)  # the global RNG must not matter
    b, info_b = build_extractor(extractor="proxy")
    assert info_a.extractor_id == info_b.extractor_id
    assert a.weights_sha256() == b.weights_sha256()
    x = _probe_input()
    assert torch.equal(a(x)[0], b(x)[0])
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, env=env,
                         cwd=ROOT).stdout.split("\n")
    assert out[0] == info_a.extractor_id
    assert out[1] == a.weights_sha256()
    assert float(out[2]) == pytest.approx(a(x)[0].double().sum().item(), rel=1e-6)


def test_torch_fidelity_runs_the_proxy_by_name():
    """calculate_metrics drives the registered proxy like any of its own extractors."""
    gen = torch.Generator().manual_seed(0)

    class Images(torch.utils.data.Dataset):
        def __init__(self, offset):
            self.data = (torch.rand(12, 3, 32, 32, generator=gen) * 200 + offset).to(torch.uint8)

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            return self.data[i]

    out = torch_fidelity.calculate_metrics(input1=Images(0), input2=Images(50), fid=True, cuda=False, cache=False,
                                           feature_extractor=PROXY_NAME, verbose=False, batch_size=6,
                                           save_cpu_ram=True)  # no DataLoader worker processes
    assert out["frechet_inception_distance"] > 0


def test_features_of_different_sizes_are_an_error():
    extractor, info = build_extractor(extractor="proxy")
    batches = [torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 32, 32)]
    with pytest.raises(ValueError, match="images of different sizes: 3x16x16 then 3x32x32"):
        extract_features(batches, extractor, info)


# --- the Inception weights file -------------------------------------------------------------------------------

def _one_line_error(path, match):
    with pytest.raises(ValueError, match=match) as err:
        build_extractor(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_missing_weights_file(tmp_path):
    _one_line_error(tmp_path / "nope.pth", "no such file")


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_text("these are not weights\n" * 5)
    _one_line_error(path, "not a PyTorch checkpoint")


def test_other_state_dict_is_not_inception(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, path)
    _one_line_error(path, "not the FID Inception-v3 checkpoint.*missing")
    torch.save([torch.zeros(3)], path)
    _one_line_error(path, "holds a list, not an Inception-v3 state dict")


def test_classifier_inception_is_not_the_fid_one(tmp_path):
    from tokpost_fast.metrics.extractor import _INCEPTION_SIGNATURE

    state = {k: torch.zeros(shape) for k, shape in _INCEPTION_SIGNATURE.items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)   # torchvision's ImageNet head
    path = tmp_path / "inception_imagenet.pth"
    torch.save(state, path)
    _one_line_error(path, r"fc.weight has shape \(1000, 2048\), expected \(1008, 2048\)")


@pytest.fixture(scope="module")
def fake_inception_weights(tmp_path_factory):
    """A state dict with exactly the FID Inception's keys and shapes (random values): real users pass the
    pt_inception-2015-12-05 file, which cannot be downloaded here."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    folder = tmp_path_factory.mktemp("inception")
    empty = folder / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    skeleton = Skeleton(INCEPTION_NAME, ["2048"], feature_extractor_weights_path=str(empty))
    path = folder / "pt_inception-fake.pth"
    torch.save(skeleton.state_dict(), path)
    return path


def test_inception_weights_are_handed_to_torch_fidelity(fake_inception_weights):
    extractor, info = build_extractor(fake_inception_weights, precision="fp32")
    assert not info.proxy and info.label == "" and info.name == INCEPTION_NAME and info.weights == "file"
    assert (info.fid_layer, info.isc_layer) == ("2048", "logits_unbiased")
    features = extract_features(torch.rand(2, 3, 32, 32) * 2 - 1, extractor, info)
    assert features["2048"].shape == (2, 2048) and features["logits_unbiased"].shape == (2, 1008)
    _, bf16 = build_extractor(fake_inception_weights, precision="bf16")
    assert bf16.extractor_id == info.extractor_id + ":bf16"      # cached statistics never mix precisions


def test_the_proxy_only_by_name_and_never_with_weights(fake_inception_weights):
    with pytest.raises(ValueError, match="--extractor 'tiny': must be one of inception, proxy"):
        build_extractor(extractor="tiny")
    with pytest.raises(ValueError, match="given together with --extractor proxy"):
        build_extractor(fake_inception_weights, extractor="proxy")
    with pytest.raises(ValueError, match="--feature-precision 'fp16'"):
        build_extractor(extractor="proxy", precision="fp16")


def test_cli_bad_weights_is_one_line(tmp_path):
    path = tmp_path / "bad.pth"
    path.write_bytes(b"\x00" * 100)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "tokpost_fast.evaluate", "--run-dir", str(tmp_path),
                           "--inception-weights", str(path), "--no-progress"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a PyTorch checkpoint" in lines[0] and str(path) in lines[0], proc.stderr
