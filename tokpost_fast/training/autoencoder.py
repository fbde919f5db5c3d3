"""The autoencoder's training objective, shared by the main stage (tokenizer from scratch) and post-training (the
decoder on cached grids): the module its DeepSpeed engine wraps."""

from __future__ import annotations

import torch
import torch.nn as nn

from tokpost_fast.losses import TokenizerLoss
from tokpost_fast.models.tokenizer import Tokenizer


class AutoencoderObjective(nn.Module):
    """The autoencoder engine's module: its forward runs the tokenizer *and* the autoencoder-side loss (the
    reconstruction, perceptual, GAN-generator, semantic and codebook / KL terms).

    Why the loss lives inside forward: DeepSpeed hooks the tensors an engine's forward returns and treats the first
    gradient that reaches them as the start of engine.backward. The adaptive GAN weight takes two
    torch.autograd.grad calls through the reconstruction to the decoder's last layer; on hooked outputs they would
    open (and close, reducing empty gradient buckets) a backward of their own. Inside forward there are no hooks
    yet, and only the loss is returned with a graph.

    Registered here: the tokenizer and the loss's trainable parameters (a CNN tokenizer's semantic projection), so
    ZeRO owns every autoencoder-side parameter. Held but not registered: the loss module (frozen LPIPS / DINOv2,
    LeCam buffers) and the discriminator, which the other engine owns and which runs functionally on detached
    parameters here (a ZeRO engine must not see gradients of another engine's parameters)."""

    def __init__(self, tokenizer: Tokenizer, loss_fn: TokenizerLoss, discriminator: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer
        self.extra = nn.ParameterList(loss_fn.trainable_parameters())
        object.__setattr__(self, "loss_fn", loss_fn)
        object.__setattr__(self, "discriminator", discriminator)

    def _frozen_discriminator(self, images: torch.Tensor) -> torch.Tensor:
        state = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        state.update(self.discriminator.named_buffers())
        return torch.func.functional_call(self.discriminator, state, (images,))

    def reconstruct(self, images: torch.Tensor, perturb_rate: float, perturb_topk: int, perturb_samples: int,
                    seed: int, perturb_noise: float = 0.0):
        """-> (recon, q, z_q): the decoder's output, the QuantizeOutput whose codebook / commit terms count (a
        KLOutput for a continuous tokenizer: its KL term; None: no such terms), the latent the decoder saw (None:
        q's). Post-training overrides it (stages/post.py). A continuous tokenizer takes perturb_noise and ignores
        perturb_rate / perturb_topk."""
        if self.tokenizer.is_continuous:
            recon, out = self.tokenizer(images, perturb_noise=perturb_noise, perturb_samples=perturb_samples,
                                        seed=seed)
            return recon, out, None
        recon, q = self.tokenizer(images, perturb_rate=perturb_rate, perturb_topk=perturb_topk,
                                  perturb_samples=perturb_samples, seed=seed)
        return recon, q, None

    def forward(self, images: torch.Tensor, step: int, *inputs, **kw_inputs):
        recon, q, z_q = self.reconstruct(images, *inputs, **kw_inputs)
        loss, logs = self.loss_fn.generator_loss(images, recon, step=step, q=q, z_q=z_q,
                                                 discriminator=self._frozen_discriminator,
                                                 last_layer=self.tokenizer.last_layer(),
                                                 semantic_projection=self.tokenizer.semantic_projection)
        return loss, logs, recon.detach(), getattr(q, "indices", None)   # a KLOutput has no indices
