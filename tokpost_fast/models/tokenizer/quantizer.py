"""The vector-quantizer module: owns the codebook and calls the fused op (SPEC A1, A2).

# z [B, C, h, w] -> QuantizeOutput(z_q [B, C, h, w], indices [B, h, w], perturbed_indices [B, h, w], losses [])
Keys as LlamaGen's VectorQuantizer: `embedding.weight` [K, C] and, for the LlamaGen CNN layout only, the
`codebook_used` buffer (65536 floats) that its checkpoints carry. We keep that buffer for strict loading but never
write it in forward (usage is computed from `indices` by the caller), so forward mutates no state.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokpost_fast.ops import QuantizeOutput, codebook_lookup, quantize

LLAMAGEN_USAGE_SLOTS = 65536


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, codebook_dim: int, l2_norm: bool = True, usage_buffer: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.codebook_size, self.codebook_dim = codebook_size, codebook_dim
        self.l2_norm, self.backend = l2_norm, backend
        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        # U(-1/K, 1/K) then l2-normalised (SPEC A1, as LlamaGen and RobusTok): the normalised rows keep the
        # codebook-loss gradient through F.normalize at a sane scale.
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if usage_buffer:
            self.register_buffer("codebook_used", torch.zeros(LLAMAGEN_USAGE_SLOTS))

    @property
    def metric(self) -> str:
        return "cosine" if self.l2_norm else "l2"

    def codebook(self) -> torch.Tensor:
        """The codebook as the quantizer uses it: [K, C], rows l2-normalised for the cosine quantizer."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def forward(self, z: torch.Tensor, perturb_rate: float = 0.0, perturb_topk: int = 1,
                perturb_samples: Optional[int] = None, seed: Optional[int] = None) -> QuantizeOutput:
        """codebook_loss = mean((code - sg(z))^2); commit_loss = mean((sg(code) - z)^2) *unweighted* (the op runs
        with beta_commit=1): LossConfig.commit (0.25) weights it. Both use the clean codes (SPEC A2 step 4)."""
        if z.dim() != 4 or z.shape[1] != self.codebook_dim:
            raise ValueError(f"z must be [B, {self.codebook_dim}, h, w], got {tuple(z.shape)}")
        z_last = z.permute(0, 2, 3, 1).contiguous()                                   # [B, h, w, C]
        out = quantize(z_last, self.embedding.weight, rate=perturb_rate, topk=perturb_topk, beta_commit=1.0,
                       metric=self.metric, seed=seed, backend=self.backend, perturb_samples=perturb_samples)
        return out._replace(z_q=out.z_q.permute(0, 3, 1, 2))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B, h, w] -> codes [B, C, h, w] (normalised codes for the cosine quantizer)."""
        codes = codebook_lookup(indices, self.codebook(), backend=self.backend)
        return codes.permute(0, 3, 1, 2)
