"""The encoder and decoder of diffusers' AutoencoderKL (the Stable Diffusion VAE), block by block.

Module and parameter names are diffusers' (models/autoencoders/vae.py Encoder/Decoder, unets/unet_2d_blocks.py
DownEncoderBlock2D / UpDecoderBlock2D / UNetMidBlock2D, resnet.py ResnetBlock2D, attention_processor.py Attention
with the current to_q/to_k/to_v/to_out.0 names), so a released SD-VAE state dict loads with strict key checking
(tests/models/tokenizer/diffusers_sdvae_keys.json was listed from diffusers 0.42.1 itself). Only the code is ours;
what it computes is diffusers' forward with act_fn silu, eps 1e-6, output_scale_factor 1 and no time embedding.

# KLEncoder: x [B, 3, H, W] -> moments [B, 2 * latent_channels, H / f, W / f],  f = 2**(len(block_out_channels)-1)
# KLDecoder: z [B, latent_channels, h, w] -> [B, 3, h * f, w * f]
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-6  # every GroupNorm of the SD-VAE (resnet_eps and conv_norm_out)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=EPS, affine=True)


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """The VAE's single-head spatial self-attention (diffusers Attention built with _from_deprecated_attn_block):
    GroupNorm, Linear q/k/v over the h*w positions, softmax scale 1/sqrt(C), Linear out, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)          # [B, hw, C]
        q, k, v = (proj(tokens)[:, None] for proj in (self.to_q, self.to_k, self.to_v))   # [B, 1, hw, C]
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]                       # [B, hw, C]
        out = self.to_out[1](self.to_out[0](out))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    """UNetMidBlock2D: resnet, attention, resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups)])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups, dropout) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # diffusers' downsample_padding=0: pad right/bottom only


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool,
                 dropout: float = 0.0):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups,
                                                    dropout) for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool,
                 dropout: float = 0.0):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups,
                                                    dropout) for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class KLEncoder(nn.Module):
    def __init__(self, block_out_channels: Sequence[int], layers_per_block: int, latent_channels: int,
                 groups: int, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        chans = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, 1, 1)
        self.down_blocks = nn.ModuleList()
        prev = chans[0]
        for i, out in enumerate(chans):
            self.down_blocks.append(DownEncoderBlock2D(prev, out, layers_per_block, groups,
                                                       add_downsample=i != len(chans) - 1, dropout=dropout))
            prev = out
        self.mid_block = MidBlock(chans[-1], groups, dropout)
        self.conv_norm_out = _norm(chans[-1], groups)
        self.conv_out = nn.Conv2d(chans[-1], 2 * latent_channels, 3, 1, 1)   # double_z: mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class KLDecoder(nn.Module):
    def __init__(self, block_out_channels: Sequence[int], layers_per_block: int, latent_channels: int,
                 groups: int, out_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        rev = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, 1, 1)
        # up_blocks is registered before mid_block (the state dict lists it first, as diffusers');
        # up_blocks.0 is the lowest resolution
        self.up_blocks = nn.ModuleList()
        self.mid_block = MidBlock(rev[0], groups, dropout)
        prev = rev[0]
        for i, out in enumerate(rev):
            self.up_blocks.append(UpDecoderBlock2D(prev, out, layers_per_block + 1, groups,
                                                   add_upsample=i != len(rev) - 1, dropout=dropout))
            prev = out
        self.conv_norm_out = _norm(rev[-1], groups)
        self.conv_out = nn.Conv2d(rev[-1], out_channels, 3, 1, 1)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))
