"""Sample a class-conditional image grid from a run directory.

    python -m tokpost_fast.sample --run-dir DIR --classes 0,1,2 --num N --out grid.png \
        [--cfg-scale 4.0 --cfg-power 1.0 --temperature 1.0 --top-k 0 --top-p 1.0 --seed 0 --device cuda]

Loads DIR/generator.pt and DIR/tokenizer.pt, refuses a pair whose tokenizer hash (recorded in generator.pt at
training time) does not match, samples N images per class (one row per class) and writes the grid as a PNG.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile

import torch

from tokpost_fast.models.generator import load_generator, sample


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_pair(gpt, tokenizer, tokenizer_path=None) -> None:
    """The generator's tokens must be this tokenizer's codes: same vocabulary, grid and (when recorded) hash."""
    if gpt.config.vocab_size != tokenizer.codebook_size:
        raise ValueError(f"generator vocab_size {gpt.config.vocab_size} != tokenizer codebook_size "
                         f"{tokenizer.codebook_size}")
    if gpt.config.seq_len != tokenizer.grid_size ** 2:
        raise ValueError(f"generator seq_len {gpt.config.seq_len} != tokenizer grid {tokenizer.grid_size}^2")
    recorded = getattr(gpt, "checkpoint_extra", {}).get("tokenizer_hash")
    if recorded is not None and tokenizer_path is not None and recorded != file_sha256(tokenizer_path):
        raise ValueError(f"{tokenizer_path} is not the tokenizer this generator was trained on "
                         f"(generator.pt records tokenizer_hash {recorded[:12]}...)")


@torch.no_grad()
def sample_images(gpt, tokenizer, labels: torch.Tensor, batch_size: int = 64, **sampling) -> torch.Tensor:
    """labels: [N] -> images [N, 3, H, W] in [-1, 1], sampled in chunks of batch_size."""
    grid = tokenizer.grid_size
    images = []
    for chunk in labels.split(batch_size):
        tokens = sample(gpt, chunk, **sampling)
        images.append(tokenizer.decode_codes(tokens.view(-1, grid, grid)).float().clamp(-1, 1))
    return torch.cat(images)


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int) -> None:
    """images [N, 3, H, W] in [-1, 1] -> a PNG grid with `nrow` images per row, written atomically."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid((images.cpu() + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".grid-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(array).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description="Sample a class-conditional image grid (one row per class).")
    parser.add_argument("--run-dir", required=True, help="holds generator.pt and tokenizer.pt")
    parser.add_argument("--classes", required=True, help="comma-separated class ids, e.g. 0,1,2")
    parser.add_argument("--num", type=int, default=8, help="images per class")
    parser.add_argument("--out", required=True, help="PNG path")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="guidance g (SPEC A4: 6.75 for RAR-L)")
    parser.add_argument("--cfg-power", type=float, default=1.0, help="schedule power p (SPEC A4: 1.01)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from tokpost_fast.models.tokenizer import load_tokenizer

    device = torch.device(args.device)
    tokenizer_path = os.path.join(args.run_dir, "tokenizer.pt")
    gpt = load_generator(os.path.join(args.run_dir, "generator.pt"), map_location=device).eval()
    tokenizer = load_tokenizer(tokenizer_path).to(device).eval()
    check_pair(gpt, tokenizer, tokenizer_path)
    classes = [int(c) for c in args.classes.split(",") if c.strip()]
    bad = [c for c in classes if not 0 <= c < gpt.config.num_classes]
    if bad:
        parser.error(f"--classes {bad} outside [0, {gpt.config.num_classes})")
    labels = torch.tensor(classes, device=device).repeat_interleave(args.num)
    generator = torch.Generator(device).manual_seed(args.seed)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        images = sample_images(gpt, tokenizer, labels, args.batch_size, cfg_scale=args.cfg_scale,
                               cfg_power=args.cfg_power, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, generator=generator)
    save_image_grid(images, args.out, nrow=args.num)
    print(f"wrote {args.out} ({len(classes)} classes x {args.num})")
    return args.out


if __name__ == "__main__":
    main()
