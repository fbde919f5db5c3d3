"""The paper's ViT tokenizer (METHOD.md A1): DINOv2-style ViT encoder and decoder with learnable latent tokens.

Read from RobusTok's tokenizer/tokenizer_image/dino_enc/dinov2.py (DINOv2Encoder / DINOv2Decoder, the config's
abs_pos_embed=true path) and bytedance 1d-tokenizer:
- encoder: [cls, patches + pos] ++ [latent tokens + pos resampled to the latent grid], a level embedding (0 for
  cls + patches, 1 for latents), ViT blocks, final norm; the latent tokens are the output.
- decoder: [cls, mask token at every patch position + pos] ++ [decoded latents + pos], level embedding, ViT blocks,
  norm, then a linear pixel head per patch token (to_pixel, "linear") and unpatchify.
Parameter names follow timm's DINOv2 ViT under `model.` (cls_token, pos_embed, patch_embed.proj, blocks.{i}.norm1,
attn.qkv, ls1.gamma, mlp.fc1, ..., norm), so DINOv2 weights load into both backbones. The decoder has no
patch_embed (it never sees pixels), as in RobusTok.

# ViTEncoder: x [B, 3, H, W] -> [B, L, width]      ViTDecoder: [B, L, width] -> [B, 3, H, W]
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models.vision_transformer import Block

# DINOv2 ViTs use LayerScale (its gammas come from the DINOv2 file when one is given). From a random init the gammas
# start at 1: DINOv2's own 1e-5 makes every block an identity, so the latent tokens never read the image patches and
# a random-init tokenizer does not learn (measured: 2-12 codes used, flat reconstruction loss over 1280 steps).
LAYER_SCALE_INIT = 1.0


def _init_vit_weights(module: nn.Module) -> None:
    """Random init of the backbone (a DINOv2 file, when given, overwrites every tensor this touches).

    Linear layers: xavier-uniform (timm's "jax" ViT init), not timm's default trunc_normal(0.02). The fixed 0.02 is
    tuned for width 768, where it is about the fan-in scale (xavier gives 0.023-0.026 there). At small widths it
    makes every attention / MLP branch ~(0.02 * sqrt(width))^2 of its input: at width 64 the attention output a
    latent token reads from the image patches is ~0.03, under the level embedding shared by all latent tokens
    (std sqrt(1 / 3 width) = 0.07), so after the final norm all latents point the same way and the quantizer maps
    every token of every image to one code (measured: 1 code, reconstruction stuck at the mean image)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ViTBackbone(nn.Module):
    """The timm/DINOv2 ViT parameters we use: tokens, position table, blocks, final norm."""

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int, mlp_ratio: float,
                 drop_path: float = 0.0, with_patch_embed: bool = True):
        super().__init__()
        self.grid = image_size // patch_size
        if with_patch_embed:
            self.patch_embed = PatchEmbed(image_size, patch_size, 3, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, width))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[
            Block(width, heads, mlp_ratio, qkv_bias=True, init_values=LAYER_SCALE_INIT, drop_path=rate,
                  norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
            for rate in rates
        ])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(_init_vit_weights)

    def with_cls(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, W] patch tokens -> [B, 1 + N, W] with the class token and the position table added."""
        cls = self.cls_token.expand(patch_tokens.shape[0], -1, -1)
        return torch.cat([cls, patch_tokens], dim=1) + self.pos_embed

    def grid_pos_embed(self, grid: int) -> torch.Tensor:
        """The patch position table resampled to a grid x grid latent grid: [1, grid*grid, W]."""
        return resample_abs_pos_embed(self.pos_embed[:, 1:], (grid, grid), (self.grid, self.grid),
                                      num_prefix_tokens=0)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(x))


def _level_ids(num_image_tokens: int, num_latent_tokens: int) -> torch.Tensor:
    return torch.cat([torch.zeros(num_image_tokens, dtype=torch.long), torch.ones(num_latent_tokens, dtype=torch.long)])


class ViTEncoder(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int, mlp_ratio: float,
                 num_latent_tokens: int, drop_path: float = 0.0):
        super().__init__()
        self.model = ViTBackbone(image_size, patch_size, width, depth, heads, mlp_ratio, drop_path)
        self.num_latent_tokens = num_latent_tokens
        self.latent_grid = math.isqrt(num_latent_tokens)
        self.latent_tokens = nn.Parameter(torch.zeros(1, num_latent_tokens, width))
        nn.init.normal_(self.latent_tokens, std=1e-6)
        self.lvl_embed = nn.Embedding(2, width)
        nn.init.trunc_normal_(self.lvl_embed.weight, std=math.sqrt(1 / width / 3))
        n_img = 1 + self.model.grid ** 2
        self.register_buffer("level_ids", _level_ids(n_img, num_latent_tokens), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model.with_cls(self.model.patch_embed(x))                         # [B, 1+N, W]
        z = self.latent_tokens + self.model.grid_pos_embed(self.latent_grid)       # [1, L, W]
        x = torch.cat([x, z.expand(x.shape[0], -1, -1)], dim=1) + self.lvl_embed(self.level_ids)
        return self.model.run_blocks(x)[:, -self.num_latent_tokens:]              # [B, L, W]


class ToPixel(nn.Module):
    """Linear head per patch token -> patch_size x patch_size RGB, then unpatchify (RobusTok's to_pixel='linear')."""

    def __init__(self, width: int, patch_size: int, out_channels: int = 3):
        super().__init__()
        self.patch_size, self.out_channels = patch_size, out_channels
        self.model = nn.Linear(width, out_channels * patch_size * patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        g, p, c = math.isqrt(n), self.patch_size, self.out_channels
        x = self.model(x).reshape(b, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, g * p, g * p)


class ViTDecoder(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int, mlp_ratio: float,
                 num_latent_tokens: int, drop_path: float = 0.0):
        super().__init__()
        self.model = ViTBackbone(image_size, patch_size, width, depth, heads, mlp_ratio, drop_path,
                                 with_patch_embed=False)
        self.num_latent_tokens = num_latent_tokens
        self.latent_grid = math.isqrt(num_latent_tokens)
        self.num_img_tokens = self.model.grid ** 2
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.mask_token, std=1e-6)
        self.lvl_embed = nn.Embedding(2, width)
        nn.init.trunc_normal_(self.lvl_embed.weight, std=math.sqrt(1 / width / 3))
        self.register_buffer("level_ids", _level_ids(1 + self.num_img_tokens, num_latent_tokens), persistent=False)
        self.to_pixel = ToPixel(width, patch_size)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.to_pixel.model.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b = z.shape[0]
        x = self.model.with_cls(self.mask_token.expand(b, self.num_img_tokens, -1))  # [B, 1+N, W]
        z = z + self.model.grid_pos_embed(self.latent_grid)
        x = torch.cat([x, z], dim=1) + self.lvl_embed(self.level_ids)
        x = self.model.run_blocks(x)[:, 1:1 + self.num_img_tokens]                  # the patch positions
        return self.to_pixel(x)
