"""Off-the-shelf tokenizers: `--tokenizer SPEC` of train.py and of `python -m tokpost_fast.evaluate`.

    SPEC = llamagen:PATH    a LlamaGen VQ checkpoint (e.g. vq_ds16_c2i.pt), loaded into our CNN tokenizer
                            (models/tokenizer/checkpoint.py: load_llamagen_checkpoint; sizes read from the tensors,
                            image size from the run config's data.image_size)
    SPEC = sdvae:PATH       a Stable Diffusion VAE in diffusers' AutoencoderKL layout (.safetensors, .bin, .pt),
                            loaded into our continuous KLTokenizer (models/tokenizer/kl_checkpoint.py:
                            load_sdvae_checkpoint; sizes read from the tensors, image size as above)
    SPEC = PATH             a tokpost_fast tokenizer file

train.py imports it once into RUN_DIR/tokenizer.pt (our format, recording the source file and its sha256:
train.py's install_tokenizer), so the stages that read RUN_DIR/tokenizer.pt (gen, cache, post, evaluate) run on
it unchanged. An existing RUN_DIR/tokenizer.pt from another source is never overwritten.
"""

from __future__ import annotations

from pathlib import Path

from tokpost_fast.models.tokenizer.checkpoint import load_llamagen_checkpoint, load_tokenizer
from tokpost_fast.models.tokenizer.kl_checkpoint import load_sdvae_checkpoint

LLAMAGEN = "llamagen:"
SDVAE = "sdvae:"
TOKENIZER_FILE = "tokenizer.pt"


def parse_spec(spec: str) -> tuple[str, Path]:
    """'llamagen:PATH' -> ("llamagen", PATH); 'sdvae:PATH' -> ("sdvae", PATH); 'PATH' -> ("tokpost", PATH).
    A missing file is an error."""
    kind, path = "tokpost", spec
    for prefix in (LLAMAGEN, SDVAE):
        if spec.startswith(prefix):
            kind, path = prefix[:-1], spec[len(prefix):]
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--tokenizer {spec}: no such file {path}")
    return kind, path


def load_tokenizer_spec(spec: str, image_size: int = 256):
    """The tokenizer SPEC names, on the CPU: a VQTokenizer, or a KLTokenizer for sdvae:PATH."""
    kind, path = parse_spec(spec)
    if kind == "llamagen":
        return load_llamagen_checkpoint(str(path), image_size=image_size)
    if kind == "sdvae":
        return load_sdvae_checkpoint(str(path), image_size=image_size)
    return load_tokenizer(str(path))
