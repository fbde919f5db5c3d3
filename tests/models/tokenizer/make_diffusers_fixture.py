"""Regenerates diffusers_sdvae_keys.json from diffusers itself (not from our model, so the layout tests can fail).

    python tests/models/tokenizer/make_diffusers_fixture.py   # needs `diffusers` importable (not a dependency)

- "sdvae": the state-dict keys and shapes, in order, of diffusers' AutoencoderKL with the Stable Diffusion VAE
  config (block_out_channels (128, 256, 512, 512), layers_per_block 2, latent_channels 4, norm_num_groups 32).
- "small": a small AutoencoderKL (odd latent_channels, 8 groups) with weights drawn by `fill_state` below, a fixed
  input, and diffusers' outputs on it: the posterior mean / logvar and the decode of the mean. The test rebuilds
  the same weights in our model and compares outputs.
Not collected by pytest (no test_ prefix).
"""

import json
import os

import torch

SMALL = dict(block_out_channels=(16, 32, 32), layers_per_block=2, latent_channels=3, norm_num_groups=8)
SMALL_IMAGE = 16
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "diffusers_sdvae_keys.json")


def fill_state(keys: dict, seed: int = 0) -> dict:
    """Deterministic weights for a key -> shape dict (in its order): norm weights near 1, everything else
    N(0, 0.2^2) scaled by 1/sqrt(fan_in) * 2 so activations neither vanish nor explode."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in keys.items():
        value = torch.randn(shape, generator=gen, dtype=torch.float64)
        if "norm" in key and key.endswith(".weight"):
            value = 1.0 + 0.1 * value
        elif key.endswith(".weight"):
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            value = value * (1.5 / fan_in ** 0.5)
        else:
            value = 0.05 * value
        state[key] = value.float()
    return state


def small_input(seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, SMALL_IMAGE, SMALL_IMAGE, generator=gen) * 2 - 1


def compact_json(tree: dict) -> str:
    """One key (or one list) per line: a readable, diffable fixture."""
    lines = ["{"]
    for name, value in tree.items():
        if not isinstance(value, dict):
            lines.append(f" {json.dumps(name)}: {json.dumps(value)},")
            continue
        lines.append(f" {json.dumps(name)}: {{")
        for key, item in value.items():
            if key == "keys":
                rows = [f"   {json.dumps(k)}: {json.dumps(shape)}," for k, shape in item.items()]
                rows[-1] = rows[-1].rstrip(",")
                lines += ['  "keys": {', *rows, "  },"]
            else:
                lines.append(f"  {json.dumps(key)}: {json.dumps(item)},")
        lines[-1] = lines[-1].rstrip(",")
        lines.append(" },")
    lines[-1] = lines[-1].rstrip(",")
    return "\n".join(lines + ["}"]) + "\n"


def main() -> None:
    import diffusers
    from diffusers import AutoencoderKL

    def build(**kw):
        n = len(kw["block_out_channels"])
        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                             up_block_types=("UpDecoderBlock2D",) * n, **kw)

    with torch.device("meta"):
        sdvae = build(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                      norm_num_groups=32, sample_size=256, scaling_factor=0.18215)
    small = build(**SMALL, sample_size=SMALL_IMAGE).eval()
    small_keys = {k: list(v.shape) for k, v in small.state_dict().items()}
    small.load_state_dict(fill_state(small_keys), strict=True)
    x = small_input()
    with torch.no_grad():
        dist = small.encode(x).latent_dist
        decoded = small.decode(dist.mean).sample
    out = {
        "source": f"diffusers {diffusers.__version__}: AutoencoderKL(...).state_dict(), listed on the meta device",
        "generated_by": "tests/models/tokenizer/make_diffusers_fixture.py",
        "sdvae": {"config": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                                 norm_num_groups=32),
                  "keys": {k: list(v.shape) for k, v in sdvae.state_dict().items()}},
        "small": {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in SMALL.items()},
                  "image_size": SMALL_IMAGE, "keys": small_keys,
                  "mean": dist.mean.flatten().tolist(), "logvar": dist.logvar.flatten().tolist(),
                  "decoded": decoded.flatten().tolist()},
    }
    with open(FIXTURE, "w") as f:
        f.write(compact_json(out))
    print(f"wrote {FIXTURE}: {len(out['sdvae']['keys'])} SD-VAE keys, {len(small_keys)} small keys")


if __name__ == "__main__":
    main()
