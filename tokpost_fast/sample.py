"""Sample a class-conditional image grid from a run directory.

    python -m tokpost_fast.sample --run-dir DIR [--classes 0,1,2] --num N --out grid.png \
        [--tokenizer DIR/tokenizer_post.pt] \
        [--cfg-scale 4.0 --cfg-power 1.0 --temperature 1.0 --top-k 0 --top-p 1.0 --seed 0 --device cuda]
    python -m tokpost_fast.sample --run-dir DIR ... [--steps 50 --cfg-scale 1.5]     (a DiT generator.pt)

Loads DIR/generator.pt and DIR/tokenizer.pt (or --tokenizer: e.g. the post-trained DIR/tokenizer_post.pt or the
control arm's DIR/tokenizer_control.pt), refuses a pair whose tokenizer hash (recorded in generator.pt at training
time) is neither this tokenizer's nor the one it was post-trained from, samples N images per class (one row per
class; every class of the generator when --classes is not given) and writes the grid as a PNG.
A DiT (continuous tokenizer) samples latents with the Euler sampler and decodes model.decode(x0 / scaling_factor).
"""

from __future__ import annotations

import argparse
import os

import torch

from tokpost_fast.atomic import atomic_write_with, file_sha256  # noqa: F401  (file_sha256 re-exported)
from tokpost_fast.models.generator import check_generator_fits, load_generator, sample, sample_dit

AR_ONLY = {"cfg_power": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}   # flags that mean nothing to a DiT


def check_pair(gpt, tokenizer, tokenizer_path=None) -> None:
    """The generator must model this tokenizer's output (kind and sizes) and, when it records one, have been
    trained on this tokenizer or the one it was post-trained from."""
    check_generator_fits(gpt, tokenizer)
    check_tokenizer_lineage(gpt, tokenizer_path)


def tokenizer_lineage(tokenizer_path) -> list[str]:
    """sha256 of the tokenizer file and, for a post-trained export (tokenizer_post.pt), of the tokenizer it was
    post-trained from: a generator trained on either emits codes this decoder means to read."""
    hashes = [file_sha256(tokenizer_path)]
    try:                 # mmap: only the small dict of extras is read, not the weights
        payload = torch.load(tokenizer_path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # a legacy (non-zip) file cannot be mapped
        payload = torch.load(tokenizer_path, map_location="cpu", weights_only=False)
    source = payload.get("source_tokenizer") if isinstance(payload, dict) else None
    if isinstance(source, dict) and source.get("sha256"):
        hashes.append(source["sha256"])
    return hashes


def check_tokenizer_lineage(gpt, tokenizer_path) -> None:
    """Refuse a generator whose recorded tokenizer_hash (written by the gen stage) is not this tokenizer's nor the
    one it was post-trained from; generators without a record (imported ones) pass."""
    recorded = getattr(gpt, "checkpoint_extra", {}).get("tokenizer_hash")
    if recorded is None or tokenizer_path is None:
        return
    if recorded not in tokenizer_lineage(tokenizer_path):
        raise ValueError(f"{tokenizer_path} is not the tokenizer this generator was trained on, nor post-trained "
                         f"from it (generator.pt records tokenizer_hash {recorded[:12]}...)")


@torch.no_grad()
def sample_images(gpt, tokenizer, labels: torch.Tensor, batch_size: int = 64, **sampling) -> torch.Tensor:
    """labels: [N] -> images [N, 3, H, W] in [-1, 1], sampled in chunks of batch_size. `sampling` is sample()'s
    settings for the AR generator, sample_dit()'s (steps, cfg_scale, generator) for a DiT."""
    grid = tokenizer.grid_size
    images = []
    for chunk in labels.split(batch_size):
        if gpt.kind == "dit":
            latents = sample_dit(gpt, chunk, **sampling) / tokenizer.scaling_factor
            images.append(tokenizer.decode(latents).float().clamp(-1, 1))
        else:
            tokens = sample(gpt, chunk, **sampling)
            images.append(tokenizer.decode_codes(tokens.view(-1, grid, grid)).float().clamp(-1, 1))
    return torch.cat(images)


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int) -> None:
    """images [N, 3, H, W] in [-1, 1] -> a PNG grid with `nrow` images per row, written atomically."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid((images.cpu() + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    atomic_write_with(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description="Sample a class-conditional image grid (one row per class).")
    parser.add_argument("--run-dir", required=True, help="holds generator.pt and tokenizer.pt")
    parser.add_argument("--classes", default=None,
                        help="comma-separated class ids, e.g. 0,1,2 (default: every class of the generator)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer checkpoint to decode with (default RUN_DIR/tokenizer.pt; e.g. "
                             "RUN_DIR/tokenizer_post.pt)")
    parser.add_argument("--num", type=int, default=8, help="images per class")
    parser.add_argument("--out", required=True, help="PNG path")
    parser.add_argument("--cfg-scale", type=float, default=1.0,
                        help="guidance g (SPEC A4: 6.75 for RAR-L; DiT: a constant scale on the velocity)")
    parser.add_argument("--cfg-power", type=float, default=None, help="AR: schedule power p (SPEC A4: 1.01)")
    parser.add_argument("--temperature", type=float, default=None, help="AR only (default 1.0)")
    parser.add_argument("--top-k", type=int, default=None, help="AR only (default 0: off)")
    parser.add_argument("--top-p", type=float, default=None, help="AR only (default 1.0: off)")
    parser.add_argument("--steps", type=int, default=None, help="DiT only: Euler steps (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from tokpost_fast.models.tokenizer import load_tokenizer

    device = torch.device(args.device)
    tokenizer_path = args.tokenizer or os.path.join(args.run_dir, "tokenizer.pt")
    if not os.path.isfile(tokenizer_path):
        parser.error(f"--tokenizer {tokenizer_path}: no such file")
    gpt = load_generator(os.path.join(args.run_dir, "generator.pt"), map_location=device).eval()
    tokenizer = load_tokenizer(tokenizer_path).to(device).eval()
    check_pair(gpt, tokenizer, tokenizer_path)
    if args.classes is None:
        classes = list(range(gpt.config.num_classes))
    else:
        try:
            classes = [int(c) for c in args.classes.split(",") if c.strip()]
        except ValueError:
            parser.error(f"--classes {args.classes!r}: expected comma-separated integers, e.g. 0,1,2")
        if not classes:
            parser.error("--classes: no class id given")
    bad = [c for c in classes if not 0 <= c < gpt.config.num_classes]
    if bad:
        parser.error(f"--classes {bad} outside [0, {gpt.config.num_classes})")
    ar_flags = {name: getattr(args, name) for name in AR_ONLY}
    if gpt.kind == "dit":
        given = [f"--{name.replace('_', '-')}" for name, value in ar_flags.items() if value is not None]
        if given:
            parser.error(f"{', '.join(given)}: AR sampling settings; this run's generator is a DiT")
        settings = {"steps": 50 if args.steps is None else args.steps}
    else:
        if args.steps is not None:
            parser.error("--steps: a DiT setting; this run's generator is autoregressive")
        settings = {name: AR_ONLY[name] if value is None else value for name, value in ar_flags.items()}
    labels = torch.tensor(classes, device=device).repeat_interleave(args.num)
    generator = torch.Generator(device).manual_seed(args.seed)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        images = sample_images(gpt, tokenizer, labels, args.batch_size, cfg_scale=args.cfg_scale, **settings,
                               generator=generator)
    save_image_grid(images, args.out, nrow=args.num)
    print(f"wrote {args.out} ({len(classes)} classes x {args.num})")
    return args.out


if __name__ == "__main__":
    main()
