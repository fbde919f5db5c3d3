"""The embedded default data set (METHOD.md B4): an ImageFolder built from the colour photographs that ship inside the
scikit-image package (skimage/data/), one class per photograph, many deterministic random crops per class.

    python -m tokpost_fast.data.embedded --out data/embedded [--size 64] [--per-class 128] [--seed 0]

The files are read straight from skimage.data.data_dir (never through skimage.data's fetchers, which may try to
download); a photo missing from the installed package is left out, and fewer than MIN_CLASSES is an error.
Each crop: a square window of 30-100 % of the photo's shorter side at a uniform position, resized (Lanczos) to
size x size, saved as PNG. Idempotent: a manifest.json records the settings and file list, and a complete set with
the same settings is left alone. Built in a temp folder and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image

from tokpost_fast.atomic import atomic_folder

# class name -> file in skimage/data (colour photographs only; the greyscale and synthetic ones are left out)
PHOTOS = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "hubble": "hubble_deep_field.jpg",
    "ihc": "ihc.png",
    "motorcycle": "motorcycle_left.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
}
MIN_CLASSES = 4
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
MIN_CROP_FRAC = 0.3


def skimage_photos() -> dict[str, str]:
    """class name -> absolute path of the photographs present in the installed scikit-image."""
    import skimage.data

    found = {name: os.path.join(skimage.data.data_dir, f) for name, f in PHOTOS.items()}
    return {name: path for name, path in found.items() if os.path.isfile(path)}


def _settings(size: int, per_class: int, seed: int, classes: list[str]) -> dict:
    return {"version": FORMAT_VERSION, "size": size, "per_class": per_class, "seed": seed, "classes": classes}


def is_complete(out: str, settings: dict) -> bool:
    try:
        with open(os.path.join(out, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if {k: manifest.get(k) for k in settings} != settings:
        return False
    return all(os.path.isfile(os.path.join(out, rel)) for rel in manifest.get("files", []))


def _shrink(photo: Image.Image, size: int) -> Image.Image:
    """Downscale once so the smallest crop still has 2x the output resolution (keeps the build at seconds)."""
    target = 2 * size / MIN_CROP_FRAC
    scale = target / min(photo.size)
    if scale >= 1:
        return photo
    return photo.resize((round(photo.size[0] * scale), round(photo.size[1] * scale)), Image.LANCZOS)


def _crops(photo: Image.Image, size: int, count: int, rng: np.random.Generator):
    width, height = photo.size
    short = min(width, height)
    for _ in range(count):
        side = int(rng.integers(max(int(short * MIN_CROP_FRAC), size // 2, 1), short + 1))
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        yield photo.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)


def build_embedded(out: str, size: int = 64, per_class: int = 128, seed: int = 0) -> dict:
    """Build (or keep, when complete) the data set in `out`; returns its manifest."""
    if size < 8 or per_class < 1:
        raise ValueError(f"build_embedded: size must be >= 8 and per_class >= 1, got {size}, {per_class}")
    photos = skimage_photos()
    if len(photos) < MIN_CLASSES:
        raise ValueError(f"only {len(photos)} of the scikit-image photographs {sorted(PHOTOS)} are installed; "
                         f"need at least {MIN_CLASSES}")
    classes = sorted(photos)
    settings = _settings(size, per_class, seed, classes)
    if is_complete(out, settings):
        with open(os.path.join(out, MANIFEST)) as f:
            return json.load(f)

    with atomic_folder(out) as tmp:    # replaces an incomplete or differently-sized earlier build
        files = []
        for label, name in enumerate(classes):
            os.makedirs(os.path.join(tmp, name))
            with Image.open(photos[name]) as image:
                photo = _shrink(image.convert("RGB"), size)
            rng = np.random.default_rng([seed, label])
            for i, crop in enumerate(_crops(photo, size, per_class, rng)):
                rel = f"{name}/{name}_{i:05d}.png"
                crop.save(os.path.join(tmp, rel), optimize=False, compress_level=1)
                files.append(rel)
        manifest = {**settings, "source": "skimage.data (" + ", ".join(PHOTOS[c] for c in classes) + ")",
                    "num_images": len(files), "files": files}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/embedded", help="output folder (ImageFolder layout)")
    parser.add_argument("--size", type=int, default=64, help="square image side in pixels")
    parser.add_argument("--per-class", type=int, default=128, help="crops per source photograph")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    manifest = build_embedded(args.out, args.size, args.per_class, args.seed)
    print(f"{args.out}: {manifest['num_images']} images, {len(manifest['classes'])} classes "
          f"({', '.join(manifest['classes'])}), {manifest['size']}x{manifest['size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
