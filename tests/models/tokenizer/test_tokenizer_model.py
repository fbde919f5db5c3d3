"""VQTokenizer behaviour for both architectures at tiny sizes: shapes, the straight-through and codebook
gradients, partial-batch perturbation, parameter groups, DINOv2 initialisation."""

import pytest
import torch

from tokpost_fast.models.tokenizer import TokenizerConfig, build_tokenizer

TINY = {
    "vit": TokenizerConfig(arch="vit", image_size=16, codebook_size=64, codebook_embed_dim=8, width=32, depth=1,
                           heads=2, patch_size=4, num_latent_tokens=16),
    "vq_cnn": TokenizerConfig(arch="vq_cnn", image_size=16, codebook_size=64, codebook_embed_dim=8, ch=32,
                              ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=32),
}


@pytest.fixture(params=sorted(TINY))
def model(request):
    torch.manual_seed(0)
    return build_tokenizer(TINY[request.param])


def images(batch=3, size=16, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_shapes(model):
    x = images()
    g, c = model.grid_size, model.codebook_dim
    assert (g, c, model.codebook_size) == (4, 8, 64)
    z = model.encode_latent(x)
    assert z.shape == (3, c, g, g)
    q = model.quantize(z)
    assert q.z_q.shape == (3, c, g, g) and q.indices.shape == (3, g, g) and q.indices.dtype == torch.int64
    assert q.codebook_loss.dim() == 0 and q.commit_loss.dim() == 0
    assert model.decode(q.z_q).shape == x.shape
    rec, q2 = model(x)
    assert rec.shape == x.shape and torch.equal(q2.indices, q.indices)
    idx = model.encode(x)
    assert torch.equal(idx, q.indices)
    # decoding the codes equals decoding the straight-through latent (same values, no graph)
    torch.testing.assert_close(model.decode_codes(idx), model.decode(q.z_q), atol=1e-5, rtol=1e-5)


def test_straight_through_reaches_encoder_not_codebook(model):
    rec, q = model(images())
    rec.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_parameters())
    assert all(p.grad is not None for p in model.decoder_parameters())
    assert model.quantize.embedding.weight.grad is None  # the reconstruction path carries no codebook gradient


def test_codebook_loss_trains_codebook_commit_trains_encoder(model):
    _, q = model(images())
    q.codebook_loss.backward(retain_graph=True)
    grad = model.quantize.embedding.weight.grad
    used = torch.unique(q.indices)
    assert grad[used].abs().sum(dim=1).gt(0).all()
    unused = torch.ones(64, dtype=torch.bool)
    unused[used] = False
    assert grad[unused].abs().sum() == 0
    assert all(p.grad is None for p in model.encoder_parameters())
    q.commit_loss.backward()
    assert model.quant_conv.weight.grad.abs().sum() > 0


def test_perturb_samples_only_perturbs_the_first_n(model):
    x = images(batch=4)
    clean = model.encode(x)
    _, q = model(x, perturb_rate=1.0, perturb_topk=32, perturb_samples=2, seed=11)
    assert torch.equal(q.indices, clean)                       # losses use the clean codes
    changed = (q.perturbed_indices != q.indices).flatten(1).float().mean(1)
    assert torch.equal(q.perturbed_indices[2:], clean[2:])
    assert (changed[:2] > 0.5).all()                            # each token changes w.p. 31/32
    # z_q carries the perturbed codes: decoding it equals decoding those codes
    torch.testing.assert_close(model.decode(q.z_q), model.decode_codes(q.perturbed_indices), atol=1e-5, rtol=1e-5)
    _, q_again = model(x, perturb_rate=1.0, perturb_topk=32, perturb_samples=2, seed=11)
    assert torch.equal(q_again.perturbed_indices, q.perturbed_indices)


def test_parameter_groups_partition_the_model(model):
    groups = [list(model.encoder_parameters()), list(model.decoder_parameters()), list(model.codebook_parameters())]
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    assert any(model.last_layer() is p for p in groups[1])


def test_vit_semantic_projection_is_quant_conv():
    model = build_tokenizer(TINY["vit"])
    feats = torch.randn(5, 32)
    expected = feats @ model.quant_conv.weight.flatten(1).t() + model.quant_conv.bias
    torch.testing.assert_close(model.semantic_projection(feats), expected)
    with pytest.raises(ValueError):
        build_tokenizer(TINY["vq_cnn"]).semantic_projection(feats)


def fake_dinov2(path, width=64, depth=2, grid=4, patch=14, official=True):
    """A DINOv2 state dict in the official layout (timm's minus mask_token) with random values."""
    gen = torch.Generator().manual_seed(1)
    state = {"cls_token": torch.randn(1, 1, width, generator=gen),
             "pos_embed": torch.randn(1, 1 + grid * grid, width, generator=gen),
             "patch_embed.proj.weight": torch.randn(width, 3, patch, patch, generator=gen),
             "patch_embed.proj.bias": torch.randn(width, generator=gen),
             "norm.weight": torch.randn(width, generator=gen), "norm.bias": torch.randn(width, generator=gen)}
    if official:
        state["mask_token"] = torch.zeros(1, width)
    for i in range(depth):
        for name, shape in [("norm1.weight", [width]), ("norm1.bias", [width]), ("attn.qkv.weight", [3 * width, width]),
                            ("attn.qkv.bias", [3 * width]), ("attn.proj.weight", [width, width]),
                            ("attn.proj.bias", [width]), ("ls1.gamma", [width]), ("norm2.weight", [width]),
                            ("norm2.bias", [width]), ("mlp.fc1.weight", [4 * width, width]),
                            ("mlp.fc1.bias", [4 * width]), ("mlp.fc2.weight", [width, 4 * width]),
                            ("mlp.fc2.bias", [width]), ("ls2.gamma", [width])]:
            state[f"blocks.{i}.{name}"] = torch.randn(shape, generator=gen)
    torch.save(state, path)
    return state


def test_dinov2_init(tmp_path):
    path = tmp_path / "dinov2_tiny.pth"
    state = fake_dinov2(path)
    cfg = TokenizerConfig(arch="vit", image_size=32, codebook_size=64, codebook_embed_dim=8, width=64, depth=2,
                          heads=1, patch_size=8, num_latent_tokens=16, dinov2_weights=str(path))
    model = build_tokenizer(cfg)
    for part in (model.encoder.model, model.decoder.model):
        assert torch.equal(part.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
        assert torch.equal(part.pos_embed, state["pos_embed"])         # 32 / 8 = 4 = the file's grid
    assert model.encoder.model.patch_embed.proj.weight.shape == (64, 3, 8, 8)  # resampled from 14
    assert not hasattr(model.decoder.model, "patch_embed")
    assert model(torch.zeros(1, 3, 32, 32))[0].shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="heads"):
        build_tokenizer(TokenizerConfig(**{**cfg.__dict__, "heads": 2}))
