"""Stage `gen`: train the class-conditional AR generator on the main-trained tokenizer's token grids (METHOD.md A4, B3),
or, for a continuous tokenizer, the DiT on its latents (gen.generator: dit).

    deepspeed [--num_gpus N] tokpost_fast/train.py --stage gen --config configs/demo.yaml --run-dir DIR [--resume]
        [--generator dit]

1. Token grids: every training image and its horizontal flip are encoded once with DIR/tokenizer.pt (center crop,
   no augmentation; ranks split the images) and cached in DIR/tokens/tokens.pt together with the tokenizer's
   sha256. A cache made by another tokenizer is rebuilt, never used.
2. Training: DeepSpeed ZeRO, AdamW (fused where the hardware has it), cosine LR with warm-up, class-label dropout
   for classifier-free guidance, one of the two flips per image and epoch. gen.order: raster trains on the raster
   order; rar trains RAR (arch rar) on sequences permuted with probability r, r annealed from 1 to 0 between
   gen.rar_anneal_start and gen.rar_anneal_end (default: half and three quarters of the run's steps, rar.yaml's
   125,000 and 187,500 of 250,000); the orders are a function of (gen.seed, step, rank), so resume redraws them.
   Sampling (sample grids, cache, evaluate) is raster order for both. Checkpoints, log.jsonl and sample grids live
   in DIR/gen/ (DIR/checkpoints belongs to the main stage); --resume continues from DIR/gen/checkpoints.
3. Export: DIR/generator.pt (EMA weights when ema_decay > 0) with the tokenizer's hash.

With gen.generator = dit the inputs are encode_latent(x) * scaling_factor (and flips), cached in
DIR/latents/latents.pt, and the loss is the rectified-flow MSE (models/generator/diffusion.py); everything else
(engine, checkpoints, resume, log, export) is the same. DiT's own recipe differs from RAR's defaults below: AdamW
lr 1e-4, betas (0.9, 0.999), no weight decay, constant LR, EMA 0.9999; set them in the config.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from tokpost_fast.atomic import atomic_torch_save, file_sha256
from tokpost_fast.data import build_loader
from tokpost_fast.data.token_cache import token_dtype
from tokpost_fast.images import save_image_grid
from tokpost_fast.models.generator import (DiTSampling, SamplingSettings, build_generator, draw_orders, flow_loss,
                                           flow_pair, generator_config, next_token_loss, order_generator,
                                           permute_tokens, random_ratio, sample_images, save_generator)
from tokpost_fast.models.generator.config import config_to_dict
from tokpost_fast.models.tokenizer import load_tokenizer
from tokpost_fast.training.checkpoint import latest_checkpoint, load_checkpoint
from tokpost_fast.training.engine import (EMA, NonFiniteGuard, all_reduce_sum, autocast, barrier, build_engine,
                                          cosine_lr, deepspeed_config, fused_adamw, init_distributed,
                                          resolve_precision, seed_everything, set_lr)
from tokpost_fast.training.run_log import JsonlLog, progress_bar
from tokpost_fast.training.runner import StageLoop

log = logging.getLogger("tokpost_fast.train")


# --- 1. token grids (or latents) --------------------------------------------------------------------------------
def _valid_cache(path: Path, tokenizer_hash: str, flip: bool) -> Optional[dict]:
    if not path.is_file():
        return None
    cache = torch.load(path, map_location="cpu", weights_only=True)
    if cache.get("tokenizer_hash") != tokenizer_hash or cache.get("flip") != flip:
        return None
    return cache


@torch.no_grad()
def extract_tokens(cfg, run_dir: Path, tokenizer, tokenizer_hash: str, info, precision: str, jsonl=None) -> dict:
    """Collective. DIR/tokens/tokens.pt = {"tokens": [N, F, h, w] (F = 2 with flips), "labels": [N],
    "num_classes", "tokenizer_hash", "flip"}; reused when its hash and flip setting match. Each rank encodes its
    share of the images into DIR/tokens/part-rank<r>.pt; rank 0 merges them by image index (the run folder is
    shared, as DeepSpeed's checkpoints already require)."""
    grid = tokenizer.grid_size
    return _extract(cfg, run_dir, tokenizer, tokenizer_hash, info, precision, jsonl, "tokens", tokenizer.encode,
                    token_dtype(tokenizer.codebook_size), (grid, grid))


@torch.no_grad()
def extract_latents(cfg, run_dir: Path, tokenizer, tokenizer_hash: str, info, precision: str, jsonl=None) -> dict:
    """extract_tokens for a continuous tokenizer: DIR/latents/latents.pt = {"latents": [N, F, C, h, w], ...}, the
    DiT's inputs encode_latent(x) * scaling_factor, stored fp16 (ImageNet x 2 flips of 4 x 32 x 32: 21 GB)."""
    sf, grid = tokenizer.scaling_factor, tokenizer.grid_size
    return _extract(cfg, run_dir, tokenizer, tokenizer_hash, info, precision, jsonl, "latents",
                    lambda x: tokenizer.encode_latent(x).float() * sf, torch.float16,
                    (tokenizer.latent_channels, grid, grid))


def _extract(cfg, run_dir, tokenizer, tokenizer_hash, info, precision, jsonl, key, encode, dtype, row_shape):
    gen = cfg.gen
    folder = Path(run_dir) / key
    path = folder / f"{key}.pt"
    cache = _valid_cache(path, tokenizer_hash, gen.flip)
    if cache is not None:
        return cache
    if path.is_file() and jsonl is not None:
        jsonl.event(0, f"{path} was made by another tokenizer or flip setting: re-extracting")
    data_cfg = dataclasses.replace(cfg.data, batch_size=gen.extract_batch_size)
    loader = build_loader(data_cfg, train=False, rank=info.rank, world_size=info.world_size, seed=0, epoch=0)
    tokenizer.to(info.device).eval()
    parts = {"indices": [], key: [], "labels": []}
    bar = progress_bar(len(loader), 0, info.is_main, f"extract {key}")
    for images, batch_labels, indices in loader:
        images = images.to(info.device, non_blocking=True)
        with autocast(info.device, precision):
            codes = [encode(images)] + ([encode(images.flip(-1))] if gen.flip else [])
        parts[key].append(torch.stack(codes, dim=1).cpu().to(dtype))           # [b, F, *row_shape]
        parts["labels"].append(torch.as_tensor(batch_labels).cpu().long())
        parts["indices"].append(torch.as_tensor(indices).cpu().long())
        bar.update(1)
    bar.close()
    if info.is_main:
        folder.mkdir(parents=True, exist_ok=True)
    barrier()
    atomic_torch_save({k: torch.cat(v) for k, v in parts.items()}, folder / f"part-rank{info.rank}.pt")
    barrier()
    if info.is_main:
        count, views = len(loader.dataset), 2 if gen.flip else 1
        tokens = torch.zeros(count, views, *row_shape, dtype=dtype)
        # index_put has no uint16 kernel: token ids are written through an int16 view of the same bytes
        writable = tokens.view(torch.int16) if dtype == torch.uint16 else tokens
        labels = torch.full((count,), -1, dtype=torch.long)
        for rank in range(info.world_size):
            part = torch.load(folder / f"part-rank{rank}.pt", map_location="cpu", weights_only=True)
            writable[part["indices"]] = part[key].view(writable.dtype)
            labels[part["indices"]] = part["labels"]
        encoded = labels >= 0   # an unreadable image (data.on_bad_image="skip") is encoded by no rank: drop its row
        if not encoded.all():
            message = f"{key} extraction: {int((~encoded).sum())} unreadable images left out"
            if jsonl is not None:
                jsonl.event(0, message)
            tokens, labels = tokens[encoded], labels[encoded]
        num_classes = getattr(loader.dataset, "num_classes", None) or int(labels.max()) + 1
        atomic_torch_save({key: tokens, "labels": labels, "num_classes": int(num_classes),
                           "tokenizer_hash": tokenizer_hash, "flip": gen.flip}, path)
        for rank in range(info.world_size):
            (folder / f"part-rank{rank}.pt").unlink()
    barrier()
    return torch.load(path, map_location="cpu", weights_only=True)


# --- 2. the epoch order -----------------------------------------------------------------------------------------
def _epoch_order(seed: int, epoch: int, count: int, views: int):
    """(permutation [N], flip choice [N]) of an epoch: a pure function of (seed, epoch), so resume replays it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=g), torch.randint(0, views, (count,), generator=g)


# --- 3. the stage -----------------------------------------------------------------------------------------------
class GenLoop(StageLoop):
    """The generator's step loop: one engine, the loss averaged over ranks per logged interval, EMA, sample grids;
    the checkpoint and non-finite policy are StageLoop's, as in main and post."""

    def __init__(self, gen, stage_dir: Path, data: tuple, gpt, optimizer, ema: Optional[EMA], tokenizer, model_cfg,
                 anneal, sizes: tuple, precision: str, **loop):
        super().__init__(**loop)
        self.gen, self.stage_dir, (self.inputs, self.labels) = gen, stage_dir, data     # inputs [N, F, ...]
        self.gpt, self.engine, self.optimizer, self.ema = gpt, self.engines["gpt"], optimizer, ema
        self.tokenizer, self.model_cfg, self.anneal, self.precision = tokenizer, model_cfg, anneal, precision
        self.micro, self.steps_per_epoch, self.total_steps, self.warmup = sizes
        self.dit = gen.generator == "dit"

    def loss(self, step: int, batch: torch.Tensor, batch_labels: torch.Tensor) -> torch.Tensor:
        gen, gpt, device = self.gen, self.gpt, self.info.device
        if self.dit:                                 # rectified flow on x0 = z * scaling_factor
            x_t, t, target = flow_pair(batch.float(), time_sampling=self.model_cfg.time_sampling)
            with autocast(device, self.precision):
                velocity = self.engine(x_t, t, gpt.drop_labels(batch_labels, gen.label_drop))
            return flow_loss(velocity, target)
        tokens = batch.flatten(1).long()
        extra, targets = (), tokens
        ratio = random_ratio(step, *self.anneal) if self.anneal else 0.0
        if ratio > 0:                                # RAR: some sequences in a random order
            orders = draw_orders(self.micro, tokens.shape[1], ratio, order_generator(gen.seed, step, self.info.rank))
            orders = orders.to(device, non_blocking=True)
            extra, targets = (orders,), permute_tokens(tokens, orders)
        with autocast(device, self.precision):
            logits = self.engine(tokens, gpt.drop_labels(batch_labels, gen.label_drop), *extra)
        return next_token_loss(logits, targets)

    def train(self, stop_at: int, bar) -> None:
        gen, info, micro = self.gen, self.info, self.micro
        count, views = self.inputs.shape[:2]
        order_epoch, order = -1, None
        loss_sum, items_seen, t0 = torch.zeros(2, dtype=torch.float64), 0, time.perf_counter()
        try:
            with self.stop_on_non_finite():
                while self.step < stop_at:
                    step = self.step
                    epoch, within = divmod(step, self.steps_per_epoch)
                    if epoch != order_epoch:
                        order_epoch, order = epoch, _epoch_order(gen.seed, epoch, count, views)
                    rows = order[0][within * gen.global_batch_size:][info.rank * micro:(info.rank + 1) * micro]
                    batch = self.inputs[rows, order[1][rows]].to(info.device, non_blocking=True)
                    batch_labels = self.labels[rows].to(info.device, non_blocking=True)
                    lr = cosine_lr(step, self.total_steps, self.warmup, gen.lr, gen.min_lr)
                    set_lr(self.optimizer, lr)
                    self.engine.train()
                    loss = self.loss(step, batch, batch_labels)
                    if self.guard.ok(loss):
                        self.engine.backward(loss)
                        self.engine.step()
                        if self.ema is not None:
                            self.ema.update(self.gpt)
                        loss_sum += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
                    self.step = step = step + 1
                    items_seen += batch.shape[0] if self.dit else batch[0].numel() * batch.shape[0]
                    bar.update(1)
                    if step % gen.log_interval == 0 or step == stop_at:
                        self.write_row(lr, loss_sum, items_seen, time.perf_counter() - t0, bar)
                        loss_sum.zero_()
                        items_seen, t0 = 0, time.perf_counter()
                    self.checkpoint_if_due(final=step == stop_at)
                    if (gen.sample_interval and step % gen.sample_interval == 0) or step == stop_at:
                        self.sample_grid()
        finally:
            bar.close()
        self.finish()

    def write_row(self, lr: float, loss_sum: torch.Tensor, items_seen: int, elapsed: float, bar) -> None:
        """Collective (the loss and throughput are summed over ranks)."""
        totals = all_reduce_sum(torch.cat([loss_sum, torch.tensor([float(items_seen)], dtype=torch.float64)]))
        step, anneal = self.step, self.anneal
        row = {"step": step, "epoch": step / self.steps_per_epoch, "lr": lr, "nan_skipped": self.guard.skipped,
               **({"random_ratio": random_ratio(step - 1, *anneal)} if anneal else {}),
               "loss": float(totals[0] / max(totals[1], 1.0)),
               ("images_per_s" if self.dit else "tokens_per_s"): float(totals[2]) / elapsed}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        self.jsonl.write(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}")

    def sample_grid(self) -> None:
        if not self.info.is_main:
            return
        gen, device = self.gen, self.info.device
        classes = torch.arange(min(gen.sample_classes, self.model_cfg.num_classes), device=device)
        sampling = (DiTSampling(gen.sample_cfg_scale, gen.sample_steps) if self.dit else
                    SamplingSettings(gen.sample_cfg_scale, gen.sample_cfg_power))
        sampled = sample_images(self.gpt, self.tokenizer.to(device), classes.repeat_interleave(gen.sample_images),
                                sampling, torch.Generator(device).manual_seed(gen.seed))
        if not self.dit:
            self.gpt.free_cache()
        save_image_grid(self.stage_dir / "samples" / f"step-{self.step:08d}.png", sampled, nrow=gen.sample_images)


def run(cfg, run_dir: Path, resume: bool = False) -> dict:
    gen, run_dir = cfg.gen, Path(run_dir)
    stage_dir = run_dir / "gen"
    info = init_distributed()
    precision = resolve_precision(gen.precision, info.device)
    if gen.global_batch_size % info.world_size:
        raise ValueError(f"gen.global_batch_size={gen.global_batch_size} is not divisible by the world size "
                         f"{info.world_size}")
    micro = gen.global_batch_size // info.world_size
    tokenizer_path = run_dir / "tokenizer.pt"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path} is missing: run --stage main first (it exports the tokenizer)")
    tokenizer_hash = file_sha256(tokenizer_path)
    tokenizer = load_tokenizer(str(tokenizer_path)).eval()
    dit = gen.generator == "dit"
    if dit != bool(getattr(tokenizer, "is_continuous", False)):
        raise ValueError(f"gen.generator={gen.generator!r} does not fit {tokenizer_path}, a "
                         f"{'continuous' if not dit else 'VQ'} tokenizer: the AR generator models token grids of a "
                         "VQ tokenizer, the DiT (--generator dit) latents of a continuous one")
    if info.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    checkpoint = latest_checkpoint(stage_dir) if resume else None
    jsonl = JsonlLog(stage_dir / "log.jsonl", info.is_main,
                     resume_step=None if checkpoint is None else int(checkpoint.name.split("-")[1]))
    extract = extract_latents if dit else extract_tokens
    data = extract(cfg, run_dir, tokenizer, tokenizer_hash, info, precision, jsonl)
    inputs, labels = data["latents" if dit else "tokens"], data["labels"]     # [N, F, ...]
    count, views = inputs.shape[:2]
    steps_per_epoch = count // gen.global_batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{count} training images is fewer than gen.global_batch_size={gen.global_batch_size}")
    total_steps = gen.epochs * steps_per_epoch
    stop_at = min(total_steps, gen.max_steps) if gen.max_steps is not None else total_steps
    warmup = int(gen.warmup_epochs * steps_per_epoch)

    sizes = (dict(latent_channels=tokenizer.latent_channels, grid_size=tokenizer.grid_size) if dit else
             dict(vocab_size=tokenizer.codebook_size, seq_len=tokenizer.grid_size ** 2))
    model_cfg = generator_config(gen.preset, **{"num_classes": data["num_classes"], **gen.model_overrides()}, **sizes,
                                 class_dropout=gen.label_drop)
    token_order = None if dit else gen.training_order(model_cfg.arch)     # raster | rar
    anneal = gen.rar_anneal(total_steps) if token_order == "rar" else None
    seed_everything(gen.seed)                        # the same initial weights on every rank
    gpt = build_generator(model_cfg).to(info.device)
    opt_name, optimizer = fused_adamw(gpt, gen.lr, gen.betas, gen.weight_decay, info.device)
    ds_config = deepspeed_config(gen.deepspeed_config, micro, info.world_size, gen.zero_stage, gen.grad_clip)
    engine = build_engine(gpt, optimizer, ds_config)
    ema = EMA(gpt, gen.ema_decay) if gen.ema_decay > 0 else None
    guard = NonFiniteGuard(gen.max_bad_steps, info.device)
    step = 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, {"gpt": engine}, info)
        if state["tokenizer_hash"] != tokenizer_hash:
            raise ValueError(f"{checkpoint} was trained on another tokenizer than {tokenizer_path}")
        step = state["step"]
        guard.load_state_dict(state["guard"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
    else:
        seed_everything(gen.seed + 7919 * info.rank)  # per-rank label-dropout (and DiT noise / time) draws
        jsonl.write({"step": 0, "event": "start", "params": gpt.num_params(), "optimizer": opt_name,
                     "images": count, "views": views, "steps": total_steps, "world_size": info.world_size,
                     "model": config_to_dict(model_cfg), **({} if dit else {"order": token_order}),
                     **({"rar_anneal": list(anneal)} if anneal else {})})
        if anneal and anneal[1] > total_steps:
            jsonl.event(0, f"gen.rar_anneal_end={anneal[1]} is past the run's {total_steps} steps: it ends at "
                           f"r = {random_ratio(total_steps, *anneal):.3f}, not raster-only")

    def state(at_step: int) -> dict:
        return {"step": at_step, "tokenizer_hash": tokenizer_hash, "guard": guard.state_dict(),
                "ema": ema.state_dict() if ema is not None else None}

    loop = GenLoop(gen, stage_dir, (inputs, labels), gpt, optimizer, ema, tokenizer, model_cfg, anneal,
                   (micro, steps_per_epoch, total_steps, warmup), precision, info=info, jsonl=jsonl, guard=guard,
                   checkpoint_dir=stage_dir, engines={"gpt": engine}, state=state, ckpt_interval=gen.ckpt_interval,
                   keep=gen.keep_checkpoints, step=step, resumed=checkpoint is not None)
    loop.train(stop_at, progress_bar(stop_at, step, info.is_main, "gen"))
    step = loop.step

    export = run_dir / "generator.pt"
    if info.is_main:
        final = ema.copy_to(build_generator(model_cfg)) if ema is not None else gpt
        save_generator(final, export, extra={"tokenizer_hash": tokenizer_hash, "step": step, "order": token_order,
                                             "gen_config": dataclasses.asdict(gen), "ema": ema is not None})
        jsonl.write({"step": step, "event": "exported", "path": str(export), "nan_skipped": guard.skipped})
    jsonl.close()
    barrier()
    return {"step": step, "generator": str(export), ("latents" if dit else "tokens"): count * views}
