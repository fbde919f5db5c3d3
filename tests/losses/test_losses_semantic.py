"""Semantic InfoNCE: the loss by hand, the global-batch gather over two gloo ranks, and the DINOv2 teacher wired
to the tokenizer's quant_conv (ViT) or to its own projection (CNN)."""

import socket
import subprocess
import sys

import pytest
import torch

from tokpost_fast.losses import LossConfig, build_semantic, build_tokenizer_loss, contrastive, info_nce
from tokpost_fast.models.tokenizer import TokenizerConfig, build_tokenizer
from tokpost_fast.models.tokenizer.vit import ViTBackbone


def test_info_nce_by_hand():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    logits = 2.0 * a @ b.t()
    by_row = -torch.diagonal(logits.log_softmax(dim=1)).mean()
    by_col = -torch.diagonal(logits.log_softmax(dim=0)).mean()
    assert info_nce(a, b, logit_scale=2.0).item() == pytest.approx(0.5 * (by_row + by_col).item(), rel=1e-6)
    matched = 5 * torch.eye(4)
    assert info_nce(matched, matched).item() == pytest.approx(0.0, abs=1e-9)     # log(1 + 3 e^-25)
    assert info_nce(matched, matched.flip(0)).item() > 20


# Each rank is a bare `python -c` that loads losses/contrastive.py by path (torch only): spawning workers that
# re-import this test module would pull in timm/torchvision and take ~10x longer on a 2-core machine.
WORKER = """
import importlib.util, sys, torch, torch.distributed as dist
rank, port, path, data, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
spec = importlib.util.spec_from_file_location("contrastive", path)
contrastive = importlib.util.module_from_spec(spec)
spec.loader.exec_module(contrastive)
a, b = torch.load(data)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
local_a = a[rank * 3:(rank + 1) * 3].clone().requires_grad_()
loss = contrastive.info_nce(local_a, b[rank * 3:(rank + 1) * 3])
loss.backward()
torch.save((loss.detach(), local_a.grad), out)
dist.destroy_process_group()
"""


def test_info_nce_gathers_the_global_batch(tmp_path):
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    full_a = a.clone().requires_grad_()
    full = info_nce(full_a, b)
    full.backward()
    torch.save((a, b), tmp_path / "data.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(rank), str(port), contrastive.__file__,
                               str(tmp_path / "data.pt"), str(tmp_path / f"out{rank}.pt")]) for rank in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    for rank in range(2):
        loss, grad = torch.load(tmp_path / f"out{rank}.pt")
        assert loss.item() == pytest.approx(full.item(), rel=1e-5)               # every rank: the global loss
        # all_gather's backward sums the ranks' gradients, i.e. d(global loss) / d(local features) times the
        # world size; data-parallel gradient averaging divides that back out.
        torch.testing.assert_close(grad / 2, full_a.grad[rank * 3:(rank + 1) * 3])


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory):
    """Random DINOv2-layout weights: width 64 (1 head of 64), 1 block, patch 14, official layout (mask_token)."""
    torch.manual_seed(0)
    state = ViTBackbone(56, 14, 64, 1, 1, 4.0).state_dict()
    state["mask_token"] = torch.zeros(1, 64)
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_tiny.pth"
    torch.save(state, path)
    return str(path)


def test_semantic_loss_uses_quant_conv_for_the_vit(dinov2_file):
    torch.manual_seed(0)
    model = build_tokenizer(TokenizerConfig(arch="vit", image_size=32, codebook_size=32, codebook_embed_dim=8,
                                            width=64, depth=1, heads=1, patch_size=8, num_latent_tokens=16))
    semantic = build_semantic(dinov2_file, model)
    assert semantic.proj is None and semantic.teacher.model.grid == 2        # 32 px at patch 16
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    rec, q = model(x)
    loss = semantic(x, q.z_q, model.semantic_projection)
    # by hand: teacher class feature -> quant_conv, against the spatial mean of z_q
    target = model.semantic_projection(semantic.teacher(x))
    assert loss.item() == pytest.approx(info_nce(target, q.z_q.mean(dim=(2, 3))).item(), rel=1e-5)
    loss.backward()
    assert model.quant_conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in semantic.teacher.parameters())


def test_semantic_loss_owns_a_projection_for_the_cnn(dinov2_file):
    model = build_tokenizer(TokenizerConfig(arch="vq_cnn", image_size=16, codebook_size=32, codebook_embed_dim=8,
                                            ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=32))
    loss = build_tokenizer_loss(LossConfig(perceptual=0, gan=0, dinov2_weights=dinov2_file), model)
    assert loss.semantic.proj is not None and len(loss.trainable_parameters()) == 2
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    rec, q = model(x)
    total, logs = loss.generator_loss(x, rec, step=0, q=q)
    assert "semantic_loss" in logs
    total.backward()
    assert loss.semantic.proj.weight.grad is not None


def test_semantic_off_without_weights():
    assert build_semantic(None, build_tokenizer(TokenizerConfig())) is None
