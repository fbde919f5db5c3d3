"""Off-the-shelf tokenizers: `--tokenizer SPEC` of train.py and of `python -m tokpost_fast.evaluate`.

    SPEC = llamagen:PATH    a LlamaGen VQ checkpoint (e.g. vq_ds16_c2i.pt), loaded into our CNN tokenizer
                            (models/tokenizer/checkpoint.py: load_llamagen_checkpoint; sizes read from the tensors,
                            image size from the run config's data.image_size)
    SPEC = sdvae:PATH       a Stable Diffusion VAE in diffusers' AutoencoderKL layout (.safetensors, .bin, .pt),
                            loaded into our continuous KLTokenizer (models/tokenizer/kl_checkpoint.py:
                            load_sdvae_checkpoint; sizes read from the tensors, image size as above)
    SPEC = PATH             a tokpost_fast tokenizer file

train.py imports it once into RUN_DIR/tokenizer.pt (our format, recording the source file and its sha256), so the
stages that read RUN_DIR/tokenizer.pt (gen, cache, post, evaluate) run on it unchanged. An existing
RUN_DIR/tokenizer.pt from another source is never overwritten.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger("tokpost_fast.train")

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
    from tokpost_fast.models.tokenizer import load_llamagen_checkpoint, load_sdvae_checkpoint, load_tokenizer

    kind, path = parse_spec(spec)
    if kind == "llamagen":
        return load_llamagen_checkpoint(str(path), image_size=image_size)
    if kind == "sdvae":
        return load_sdvae_checkpoint(str(path), image_size=image_size)
    return load_tokenizer(str(path))


def image_size_of_run(run_dir, config: Optional[str] = None, default: int = 256) -> int:
    """data.image_size of the run config (--config, else RUN_DIR/config.yaml), else `default`."""
    path = config or (Path(run_dir) / "config.yaml")
    if not Path(path).is_file():
        return default
    from tokpost_fast.config import load_config

    return load_config(path).data.image_size


def install_tokenizer(spec: str, run_dir: Path, cfg, stage: str) -> Path:
    """Collective: rank 0 writes RUN_DIR/tokenizer.pt from SPEC unless it already holds that import; every rank
    returns its path. Refuses for stage main (which trains its own tokenizer) and over a tokenizer.pt of another
    origin."""
    from tokpost_fast.models.tokenizer import save_tokenizer
    from tokpost_fast.training.engine import barrier, broadcast_object, init_distributed
    from tokpost_fast.data.token_cache import file_sha256

    if stage == "main":
        from tokpost_fast.config import ConfigError

        raise ConfigError("--tokenizer is for the stages after main (gen, cache, post); main trains its own "
                         "tokenizer")
    info = init_distributed()
    target = Path(run_dir) / TOKENIZER_FILE
    error = None
    if info.is_main:
        try:
            kind, path = parse_spec(spec)
            source = {"kind": kind, "path": str(path.resolve()), "sha256": file_sha256(path)}
            if target.is_file():
                import torch

                existing = torch.load(target, map_location="cpu", weights_only=True).get("imported_from")
                if existing is None or existing["sha256"] != source["sha256"] or existing["kind"] != kind:
                    raise ValueError(f"{target} exists and is not an import of {spec} (it records "
                                     f"{existing or 'no import: a trained tokenizer'}); use a fresh --run-dir")
            else:
                model = load_tokenizer_spec(spec, image_size=cfg.data.image_size)
                target.parent.mkdir(parents=True, exist_ok=True)
                save_tokenizer(model, str(target), extra={"imported_from": source, "weights": "imported"})
                size = (f"{model.latent_channels} latent channels" if model.is_continuous
                        else f"K={model.codebook_size}")
                log.info("imported %s tokenizer %s into %s (%s, %dx%d grid)", kind, path, target, size,
                         model.grid_size, model.grid_size)
        except (ValueError, FileNotFoundError) as err:
            error = f"{type(err).__name__}: {err}"
    error = broadcast_object(error)
    barrier()
    if error is not None:
        from tokpost_fast.config import ConfigError     # train.py prints it as one line

        raise ConfigError(f"--tokenizer {spec}: {error}")
    return target
