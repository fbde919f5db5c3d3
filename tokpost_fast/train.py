"""The one entry point of every training stage (METHOD.md B3).

    deepspeed [--num_gpus N] tokpost_fast/train.py --stage main --config configs/demo.yaml --run-dir runs/demo \
        [--set train.lr=1e-4 --set perturb.beta=0.2 ...] [--resume] [--max-steps N] [--data-backend auto|dali|torch]

Also runs under `torchrun --nproc_per_node N tokpost_fast/train.py ...` and plain `python tokpost_fast/train.py ...`
(one process, a 1-rank gloo group: the same code path). The config is loaded and checked, and the stage looked up,
before the process group or any model exists, so a typo costs nothing.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script, Python puts tokpost_fast/ itself on sys.path, where config.py, data/, ops/ ... would shadow
    # top-level modules of the same names. Put the repository root there instead (works without installing too).
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from tokpost_fast.atomic import file_sha256
from tokpost_fast.config import ConfigError, load_config
from tokpost_fast.data.folder import scan_image_folder
from tokpost_fast.models.tokenizer import save_tokenizer
from tokpost_fast.models.tokenizer.external import TOKENIZER_FILE, load_tokenizer_spec, parse_spec
from tokpost_fast.stages import SECTIONS, STAGES, StageNotImplemented, get_stage
from tokpost_fast.training.engine import (NonFiniteLossError, barrier, broadcast_object, init_distributed,
                                          launcher_world_size)

log = logging.getLogger("tokpost_fast.train")

DATA_BACKENDS = ("auto", "dali", "torch")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tokpost_fast/train.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--config", required=True, help="YAML file in configs/")
    parser.add_argument("--run-dir", required=True, help="checkpoints, log.jsonl, samples and exports go here")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-4 (value read as YAML; repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/latest")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many optimizer steps in total (the LR schedule does not change)")
    parser.add_argument("--data-backend", choices=DATA_BACKENDS, default=None,
                        help="image pipeline: DALI needs a GPU and nvidia-dali; auto picks it when it can")
    parser.add_argument("--on-bad-image", choices=("skip", "error"), default=None,
                        help="an unreadable image in the ImageFolder: skip it with a warning naming it and a count "
                             "at the end (the default), or stop with an error")
    parser.add_argument("--generator", choices=("ar", "dit"), default=None,
                        help="gen: the AR transformer (VQ tokenizer) or the DiT rectified flow (continuous "
                             "tokenizer); the same as --set gen.generator=...")
    parser.add_argument("--post-strength", type=float, default=None, metavar="S",
                        help="cache with a continuous tokenizer + DiT: the noise level in [0, 1] each real latent "
                             "is denoised from (0: the real latent, 1: pure noise); --set cache.post_strength=S")
    parser.add_argument("--tokenizer", default=None, metavar="llamagen:PATH|sdvae:PATH|PATH",
                        help="off-the-shelf tokenizer for gen/cache/post (LlamaGen VQ, or a Stable-Diffusion VAE in "
                             "the diffusers layout), imported once into RUN_DIR/tokenizer.pt "
                             "(models/tokenizer/external.py)")
    # The DeepSpeed launcher appends --local_rank=N; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def overrides(args: argparse.Namespace) -> list[str]:
    """--set values, then the shortcut flags as the --set they stand for (so they are checked the same way)."""
    out = list(args.overrides)
    if args.max_steps is not None:
        out.append(f"{SECTIONS[args.stage]}.max_steps={args.max_steps}")
    if args.data_backend is not None:
        out.append(f"data.backend={args.data_backend}")
    if args.generator is not None:
        out.append(f"gen.generator={args.generator}")
    if args.post_strength is not None:
        out.append(f"cache.post_strength={args.post_strength}")
    if args.on_bad_image is not None:
        out.append(f"data.on_bad_image={args.on_bad_image}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse, check, then run the stage. Callable in-process (tests): the process group is reused if present."""
    args = parse_args(argv)
    cfg = load_config(args.config, overrides(args), world_size=launcher_world_size(), stage=args.stage)
    run = get_stage(args.stage)
    check_image_folder(cfg)
    init_distributed()
    if args.tokenizer is not None:
        install_tokenizer(args.tokenizer, Path(args.run_dir), cfg, args.stage)
    return run(cfg, Path(args.run_dir), resume=args.resume)


def check_image_folder(cfg) -> None:
    """Every stage reads the ImageFolder: a missing or empty one is a one-line error before any work starts."""
    try:
        scan_image_folder(cfg.data.root)
    except ValueError as e:
        raise ConfigError(f"data.root: {e}") from None


def install_tokenizer(spec: str, run_dir: Path, cfg, stage: str) -> Path:
    """--tokenizer SPEC (models/tokenizer/external.py). Collective: rank 0 writes RUN_DIR/tokenizer.pt from SPEC
    unless it already holds that import; every rank returns its path. Refuses for stage main (which trains its own
    tokenizer) and over a tokenizer.pt of another origin."""
    if stage == "main":
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
    if error is not None:                              # _cli prints a ConfigError as one line
        raise ConfigError(f"--tokenizer {spec}: {error}")
    return target


def _cli() -> int:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        main()
    except (ConfigError, StageNotImplemented) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"train.py: stopped: {e}", file=sys.stderr)
        return 3
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
