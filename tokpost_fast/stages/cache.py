"""Stage `cache`: build the post-training set (METHOD.md A5.1, B5) as sharded token grids.

    deepspeed [--num_gpus N] tokpost_fast/train.py --stage cache --config configs/demo.yaml --run-dir DIR [--resume]

For each selected real training image (center crop, no augmentation): encode it with the frozen DIR/tokenizer.pt
into ground-truth tokens t, draw a keep-mask m ~ Bernoulli(sigma) and run DIR/generator.pt token by token, taking
t_i where m_i = 1 and the generator's sample elsewhere (models/generator/sampling.py: teacher_forced_sample).
The grids go to DIR/cache/shard-NNNNN.safetensors (format: data/token_cache.py), shard s written by rank
s % world_size. Shard s is sampled in chunks of cache.batch_size rows, chunk c with the seed
chunk_seed(cache.seed, s, c): a shard's bytes depend only on the settings, never on the world size or on
interruptions, so a re-run (with or without --resume: present shards are complete by construction) continues at
the first missing shard and ends byte-identical to one clean run. DIR/cache/index.json is written last.

Continuous tokenizer + DiT generator (our reading of the paper, the diffusion analogue of the teacher
forcing above): each real latent x0 = encode_latent(image) * scaling_factor is noised to level cache.post_strength,
x_s = (1 - s) x0 + s eps, and the DiT integrates it back to t = 0 (models/generator/diffusion.py: denoise_from);
the result, divided by scaling_factor, is stored as fp16 `latents` (format: data/token_cache.py). eps is drawn
per image from image_seed(cache.seed, image index), so a shard's bytes again depend only on the settings.
s = 0 stores the real latent itself, s = 1 a pure sample of the image's class.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from tokpost_fast.atomic import file_sha256, remove_stale_temps
from tokpost_fast.data import ImageFolderDataset
from tokpost_fast.data.folder import collate
from tokpost_fast.data.token_cache import (FORMAT, INDEX, LATENT_FORMAT, PLAN, CacheRows, LatentRows, read_index,
                                           settings_diff, shard_name, token_dtype, write_json_atomic,
                                           write_latent_shard, write_shard)
from tokpost_fast.models import is_continuous
from tokpost_fast.models.generator import (check_generator_fits, denoise_from, load_generator,
                                           teacher_forced_sample)
from tokpost_fast.models.tokenizer import load_tokenizer
from tokpost_fast.training.engine import autocast, barrier, init_distributed, resolve_precision
from tokpost_fast.training.run_log import JsonlLog

log = logging.getLogger("tokpost_fast.train")


def chunk_seed(seed: int, shard: int, chunk: int) -> int:
    """62-bit seed of one sampling call: a function of (cache.seed, shard, chunk) only."""
    digest = hashlib.blake2b(f"cache:{seed}:{shard}:{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def image_seed(seed: int, image_index: int) -> int:
    """62-bit seed of one image's noise in a latent cache: a function of (cache.seed, image index) only."""
    digest = hashlib.blake2b(f"cache-image:{seed}:{image_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def select_images(count: int, num_images: Optional[int], seed: int) -> list[int]:
    """Data-set indices of the set's rows: all images in order, or a seeded subset of num_images (sorted, so a
    shard holds neighbouring files)."""
    if num_images is None or num_images >= count:
        return list(range(count))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(count, generator=g)[:num_images].tolist())


def cache_settings(cfg, num_rows: int, continuous: bool = False) -> dict:
    """Everything a cache's content depends on besides the checkpoints: recorded in the index and in every shard,
    and what `post` expects (computed from its own config). continuous: a latent cache's settings."""
    cc = cfg.cache
    sampling = ({"post_strength": cc.post_strength, "denoise_steps": cc.denoise_steps,
                 "denoise_cfg_scale": cc.denoise_cfg_scale} if continuous else {"sigma": cc.sigma, **cc.sampling()})
    return {**sampling, "seed": cc.seed, "batch_size": cc.batch_size, "shard_size": cc.shard_size,
            "num_images": cc.num_images, "rows": num_rows, "image_size": cfg.data.image_size, "crop": "center"}


def check_generator_tokenizer(gpt, tokenizer, tokenizer_sha256: str, generator_path) -> None:
    """The generator's tokens must be this tokenizer's codes (its latents, for a DiT): refuse a generator trained
    on another tokenizer, naming both hashes, or of the other kind."""
    check_generator_fits(gpt, tokenizer, str(generator_path))
    recorded = getattr(gpt, "checkpoint_extra", {}).get("tokenizer_hash")
    if recorded is not None and recorded != tokenizer_sha256:
        raise ValueError(f"{generator_path} was trained on the tokenizer with sha256 {recorded}, but this run's "
                         f"tokenizer.pt has sha256 {tokenizer_sha256}; retrain the generator (--stage gen) on it")
    if recorded is None:
        log.warning("%s records no tokenizer hash; assuming it was trained on this tokenizer", generator_path)


def plan_key(plan: dict) -> dict:
    """What a cache's bytes depend on (paths excluded: a moved run folder keeps its cache)."""
    sizes = {k: v for k, v in plan.items() if k not in ("tokenizer", "generator", "settings")}
    return {"tokenizer": plan["tokenizer"]["sha256"], "generator": plan["generator"]["sha256"], **sizes,
            **plan["settings"]}


def _prepare_folder(folder: Path, plan: dict, note) -> None:
    """Rank 0: start a new cache, or keep one being built with the same plan; a cache of another plan (other
    checkpoints or settings) is stale: removed, with a note in the log."""
    plan_path = folder / PLAN
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        diff = settings_diff(plan_key(old), plan_key(plan))
        if not diff:
            remove_stale_temps(folder)      # a killed run's half-written shard: never read, but not kept either
            return
        note(f"{folder} was built with another plan ({'; '.join(diff)}): rebuilding it")
        shutil.rmtree(folder)
    elif folder.exists() and any(folder.iterdir()):
        note(f"{folder} holds files but no {PLAN}: rebuilding it")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan_path, plan)


def _token_rows(tokenizer, gpt, cc, shard: int, chunk: int, images, labels, indices, dataset):
    """METHOD.md A5.1 for one chunk: teacher-forced grids, the chunk's seed from (cache.seed, shard, chunk)."""
    seed, grid, b = chunk_seed(cc.seed, shard, chunk), tokenizer.grid_size, images.shape[0]
    gt = tokenizer.encode(images)                                                   # [b, h, w]
    tokens, keep = teacher_forced_sample(gpt, labels, gt, cc.sigma, seed, **cc.sampling())
    gpt.free_cache()
    return CacheRows(tokens=tokens.view(b, grid, grid).cpu(), gt_tokens=gt.cpu(),
                     keep_mask=keep.view(b, grid, grid).cpu(), sample_index=indices.cpu(), label=labels.cpu(),
                     sigma=torch.full((b,), cc.sigma), seed=torch.full((b,), seed, dtype=torch.int64),
                     relative_paths=[dataset.relative_path(int(i)) for i in indices])


def _latent_rows(tokenizer, dit, cc, images, labels, indices, dataset):
    """The continuous analogue for one chunk: real latents denoised by the DiT from level post_strength, each
    image's noise from its own seed (drawn on the CPU: the same on every device and batch split)."""
    seeds = [image_seed(cc.seed, int(i)) for i in indices]
    z = tokenizer.encode_latent(images).float()                                     # [b, C, h, w]
    if cc.post_strength == 0:
        latents = z              # the real latent itself, not a round trip through * / scaling_factor
    else:
        sf = tokenizer.scaling_factor
        noise = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
        x0 = denoise_from(dit, z * sf, labels, cc.post_strength, cc.denoise_steps, cc.denoise_cfg_scale,
                          noise=noise.to(z.device))
        latents = x0 / sf
    b = images.shape[0]
    return LatentRows(latents=latents.half().cpu(), gt_latents=z.half().cpu(), sample_index=indices.cpu(),
                      label=labels.cpu(), strength=torch.full((b,), cc.post_strength),
                      seed=torch.tensor(seeds, dtype=torch.int64),
                      relative_paths=[dataset.relative_path(int(i)) for i in indices])


def run(cfg, run_dir: Path, resume: bool = False) -> dict:
    cc, run_dir = cfg.cache, Path(run_dir)
    info = init_distributed()
    device = info.device
    precision = resolve_precision(cc.precision, device)
    folder = run_dir / "cache"
    tokenizer_path, generator_path = run_dir / "tokenizer.pt", run_dir / "generator.pt"
    for path, stage in ((tokenizer_path, "main"), (generator_path, "gen")):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run --stage {stage} first")
    tokenizer_sha, generator_sha = file_sha256(tokenizer_path), file_sha256(generator_path)
    tokenizer = load_tokenizer(str(tokenizer_path)).to(device).eval()
    gpt = load_generator(generator_path, map_location=device).eval()
    check_generator_tokenizer(gpt, tokenizer, tokenizer_sha, generator_path)
    continuous = is_continuous(gpt)

    dataset = ImageFolderDataset(cfg.data, train=False, seed=0, epoch=0)
    rows = select_images(len(dataset), cc.num_images, cc.seed)
    settings = cache_settings(cfg, len(rows), continuous)
    plan = {"format": LATENT_FORMAT if continuous else FORMAT, "settings": settings,
            "tokenizer": {"path": str(tokenizer_path.resolve()), "sha256": tokenizer_sha},
            "generator": {"path": str(generator_path.resolve()), "sha256": generator_sha,
                          "tokenizer_hash": getattr(gpt, "checkpoint_extra", {}).get("tokenizer_hash")},
            "grid_size": tokenizer.grid_size}
    if continuous:
        plan.update(latent_channels=tokenizer.latent_channels, scaling_factor=tokenizer.scaling_factor,
                    dtype="float16", post_strength=cc.post_strength)
    else:
        plan.update(codebook_size=tokenizer.codebook_size,
                    dtype=str(token_dtype(tokenizer.codebook_size)).removeprefix("torch."))
    num_shards = math.ceil(len(rows) / cc.shard_size)
    # Every run continues the cache (present shards are complete), so the log is always appended to.
    stage_log = JsonlLog(run_dir / "cache_log.jsonl", info.is_main, resume_step=num_shards)
    if info.is_main:
        _prepare_folder(folder, plan, lambda message: stage_log.event(0, message))
    barrier()

    stop = num_shards if cc.max_steps is None else min(num_shards, cc.max_steps)
    mine = [s for s in range(info.rank, stop, info.world_size) if not (folder / shard_name(s)).is_file()]
    todo = sum(len(rows[s * cc.shard_size:(s + 1) * cc.shard_size]) for s in mine)
    if info.is_main:
        done = sum(1 for s in range(stop) if (folder / shard_name(s)).is_file())
        stage_log.write({"step": done, "event": "start", "shards": num_shards, "stop": stop, "present": done,
                         "images": len(rows), "world_size": info.world_size, **settings})
    bar = tqdm(total=todo, disable=not info.is_main, desc="cache", unit="img", dynamic_ncols=True, smoothing=0.1)
    written, t0 = 0, time.perf_counter()
    for shard in mine:
        shard_rows = rows[shard * cc.shard_size:(shard + 1) * cc.shard_size]
        chunks = [shard_rows[i:i + cc.batch_size] for i in range(0, len(shard_rows), cc.batch_size)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=chunks, collate_fn=collate,
                                             num_workers=cfg.data.num_workers)
        parts = []
        for chunk, (images, labels, indices, _bad) in enumerate(loader):
            images, labels = images.to(device), labels.to(device)
            with torch.no_grad(), autocast(device, precision):
                if continuous:
                    parts.append(_latent_rows(tokenizer, gpt, cc, images, labels, indices, dataset))
                else:
                    parts.append(_token_rows(tokenizer, gpt, cc, shard, chunk, images, labels, indices, dataset))
            bar.update(images.shape[0])
        if continuous:
            write_latent_shard(folder / shard_name(shard), LatentRows.concat(parts), shard, settings)
        else:
            write_shard(folder / shard_name(shard), CacheRows.concat(parts), shard, tokenizer.codebook_size,
                        settings)
        written += 1
    bar.close()
    seconds = time.perf_counter() - t0
    barrier()

    complete = all((folder / shard_name(s)).is_file() for s in range(num_shards))
    result = {"shards": num_shards, "written_by_rank0": written, "complete": complete, "cache": str(folder)}
    if info.is_main and complete:
        entries = []
        for s in range(num_shards):
            count = len(rows[s * cc.shard_size:(s + 1) * cc.shard_size])
            entries.append({"file": shard_name(s), "rows": count, "first_row": s * cc.shard_size,
                            "sha256": file_sha256(folder / shard_name(s))})
        index = {**plan, "shards": entries, "num_rows": len(rows)}
        if not (folder / INDEX).is_file() or read_index(folder) != index:
            write_json_atomic(folder / INDEX, index)
        stage_log.write({"step": num_shards, "event": "index", "path": str(folder / INDEX), "rows": len(rows),
                         "seconds_rank0": seconds,
                         "img_per_s_rank0": todo / seconds if seconds > 0 and todo else None})
    elif info.is_main:
        stage_log.write({"step": stop, "event": "stopped", "present": sum(
            1 for s in range(num_shards) if (folder / shard_name(s)).is_file()), "shards": num_shards})
    stage_log.close()
    barrier()
    return result
