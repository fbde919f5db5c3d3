"""The parameter groups every tokenizer exposes to the stages (main trains all, post trains the decoder side, the
adaptive GAN weight reads the last decoder layer). Both the VQ and the KL tokenizer are encoder -> quant_conv ->
(quantizer | Gaussian posterior) -> post_quant_conv -> decoder, so the grouping is shared."""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn


class AutoencoderParameterGroups:
    """Mixin for an nn.Module with encoder, quant_conv, post_quant_conv and decoder (decoder.last_layer)."""

    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, for the adaptive GAN weight."""
        return self.decoder.last_layer

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.encoder.parameters()
        yield from self.quant_conv.parameters()

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.post_quant_conv.parameters()
        yield from self.decoder.parameters()
