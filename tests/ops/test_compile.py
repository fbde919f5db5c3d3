"""A module calling the ops compiles with torch.compile(fullgraph=True): custom ops + fake kernels + autograd."""

import torch

from tokpost_fast import ops


class TinyQuantizer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 8)
        self.codebook = torch.nn.Parameter(torch.randn(97, 8))

    def forward(self, x, seed: int):
        out = ops.quantize(self.proj(x), self.codebook, rate=0.5, topk=5, seed=seed, perturb_samples=2)
        dist, _ = ops.nearest_codes(out.z_q.detach(), self.codebook, k=3, metric="cosine")
        return out.z_q.square().mean() + out.codebook_loss + out.commit_loss + 0 * dist.sum(), out.perturbed_indices


def test_fullgraph_compile_forward_backward_matches_eager():
    torch.manual_seed(0)
    model = TinyQuantizer()
    x = torch.randn(4, 10, 16)
    eager_loss, eager_idx = model(x, 3)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    loss, idx = compiled(x, 3)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert torch.equal(idx, eager_idx)
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)
