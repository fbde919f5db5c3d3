"""A random-init ViT tokenizer (arch "vit", no DINOv2 weights) must learn (models/tokenizer/vit.py init).

Regression for a collapse: with timm's fixed trunc_normal(0.02) Linear init at small widths, every latent token
ended up pointing the same way, the quantizer used one code for every token of every image and the
reconstruction stayed at the mean image. A short seeded run on crops of the scikit-image photographs (the embedded
data set's source) with the main stage's VQ terms (MSE + codebook + 0.25 commitment, AdamW betas (0.9, 0.95))
must reconstruct clearly better than the mean image and keep several codes in use. Measured at 300 steps: before
the fix MSE = the mean image's, 1 code; after, ~half the mean image's MSE and ~12 codes.

Not covered here: on smooth synthetic images the commitment term collapses this tiny ViT to one code within ~25
steps with the paper's quantizer; dead-code restarts (codebook.restart_dead) keep ~180 of 256 codes in use there,
tested in tests/models/tokenizer/test_dead_codes.py.
"""

import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tokpost_fast.data.embedded import build_embedded
from tokpost_fast.models.tokenizer import build_tokenizer
from tokpost_fast.models.tokenizer.config import TokenizerConfig

STEPS = 300
BATCH = 16


def photo_crops(root, size: int = 32) -> torch.Tensor:
    manifest = build_embedded(str(root), size=size, per_class=40, seed=0)
    arrays = [np.asarray(Image.open(root / rel).convert("RGB")) for rel in manifest["files"]]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]


def test_random_init_vit_tokenizer_learns(tmp_path):
    t0 = time.perf_counter()
    images = photo_crops(tmp_path / "photos")
    held_out, data = images[:64], images[64:]
    mean_image_mse = F.mse_loss(data.mean(0, keepdim=True).expand_as(held_out), held_out).item()
    torch.manual_seed(0)
    cfg = TokenizerConfig(arch="vit", image_size=32, codebook_size=256, codebook_embed_dim=8, width=64, depth=2,
                          heads=4, patch_size=8, num_latent_tokens=16, quantizer_backend="reference")
    model = build_tokenizer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        x = data[torch.randint(0, len(data), (BATCH,), generator=g)]
        recon, q = model(x)
        loss = F.mse_loss(recon, x) + q.codebook_loss + 0.25 * q.commit_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        recon, q = model(held_out)
    mse, used = F.mse_loss(recon, held_out).item(), int(q.indices.unique().numel())
    print(f"mse {mse:.4f} (mean image {mean_image_mse:.4f}), codes used {used}/256, {time.perf_counter() - t0:.1f} s")
    assert mse < 0.7 * mean_image_mse, f"MSE {mse:.4f} vs the mean image's {mean_image_mse:.4f}: no learning"
    assert used >= 4, f"{used} codes in use over {held_out.shape[0]} images: the codebook collapsed"
