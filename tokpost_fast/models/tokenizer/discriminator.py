"""PatchGAN discriminator (pix2pix / taming), with LlamaGen's key names (discriminator_patchgan.py: `main.{i}`).

# x [B, 3, H, W] -> logits [B, 1, H', W'] (one logit per overlapping patch)

Functional by design: the trainer calls it through torch.func.functional_call with detached parameters in the
generator step (a DeepSpeed constraint), so forward must mutate nothing. BatchNorm therefore always normalises
with the batch's own statistics and never updates running stats (as a training-mode BatchNorm would); the
running_mean / running_var / num_batches_tracked buffers are kept only so LlamaGen discriminator checkpoints load
with strict keys. The LeCam EMA lives in the loss (losses/gan.py), not here.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BatchStatNorm(nn.BatchNorm2d):
    """BatchNorm2d that uses the batch statistics in train and eval alike and writes no buffer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True, momentum=0.0, eps=self.eps)


class PatchGANDiscriminator(nn.Module):
    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1      # the last hidden conv keeps the resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), BatchStatNorm(ndf * mult),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def build_discriminator(ndf: int = 64, n_layers: int = 3) -> PatchGANDiscriminator:
    return PatchGANDiscriminator(3, ndf, n_layers)
