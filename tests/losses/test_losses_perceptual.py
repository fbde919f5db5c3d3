"""LPIPS from local weights only: torchvision-layout VGG16 trunk + the lpips package's linear layers."""

import os

import lpips
import pytest
import torch
from torchvision.models.vgg import cfgs, make_layers

from tokpost_fast.losses import build_perceptual


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """Random VGG16 `features` saved in torchvision's key layout (features.{i}.weight); no classifier needed."""
    torch.manual_seed(0)
    features = make_layers(cfgs["D"])
    path = tmp_path_factory.mktemp("vgg") / "vgg16_features.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return str(path), features


def test_lpips_from_local_vgg(vgg_file):
    path, features = vgg_file
    loss = build_perceptual(path)
    net = loss.lpips.net
    assert torch.equal(net.slice1[0].weight, features[0].weight)
    assert torch.equal(getattr(net.slice5, "28").weight, features[28].weight)
    lin = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights/v0.1/vgg.pth"), map_location="cpu")
    assert torch.equal(loss.lpips.lin2.model[1].weight, lin["lin2.model.1.weight"])
    assert not any(p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.lpips.training                      # dropout in the linear layers stays off
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss(y, y).item() == pytest.approx(0.0, abs=1e-7)
    value = loss(x, y)
    assert value.item() > 0
    value.backward()
    assert x.grad.abs().sum() > 0


def test_perceptual_off_and_bad_files(tmp_path):
    assert build_perceptual(None) is None
    with pytest.raises(ValueError, match="not found"):
        build_perceptual(str(tmp_path / "missing.pth"))
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="neither a torchvision vgg16"):
        build_perceptual(str(tmp_path / "other.pth"))
