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

from tokpost_fast.images import save_image_grid
from tokpost_fast.models import is_continuous
from tokpost_fast.models.generator import DiTSampling, SamplingSettings, check_pair, load_generator, sample_images
from tokpost_fast.models.tokenizer import load_tokenizer

AR_ONLY = {"cfg_power": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}   # flags that mean nothing to a DiT


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
                        help="guidance g (METHOD.md A4: 6.75 for RAR-L; DiT: a constant scale on the velocity)")
    parser.add_argument("--cfg-power", type=float, default=None, help="AR: schedule power p (METHOD.md A4: 1.01)")
    parser.add_argument("--temperature", type=float, default=None, help="AR only (default 1.0)")
    parser.add_argument("--top-k", type=int, default=None, help="AR only (default 0: off)")
    parser.add_argument("--top-p", type=float, default=None, help="AR only (default 1.0: off)")
    parser.add_argument("--steps", type=int, default=None, help="DiT only: Euler steps (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

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
    if is_continuous(gpt):
        given = [f"--{name.replace('_', '-')}" for name, value in ar_flags.items() if value is not None]
        if given:
            parser.error(f"{', '.join(given)}: AR sampling settings; this run's generator is a DiT")
        sampling = DiTSampling(args.cfg_scale, 50 if args.steps is None else args.steps)
    else:
        if args.steps is not None:
            parser.error("--steps: a DiT setting; this run's generator is autoregressive")
        sampling = SamplingSettings(args.cfg_scale, **{name: AR_ONLY[name] if value is None else value
                                                       for name, value in ar_flags.items()})
    labels = torch.tensor(classes, device=device).repeat_interleave(args.num)
    generator = torch.Generator(device).manual_seed(args.seed)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        images = sample_images(gpt, tokenizer, labels, sampling, generator, args.batch_size)
    save_image_grid(args.out, images, nrow=args.num)
    print(f"wrote {args.out} ({len(classes)} classes x {args.num})")
    return args.out


if __name__ == "__main__":
    main()
