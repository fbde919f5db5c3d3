"""Stage `post`: post-train the decoder on the cached generated token grids (METHOD.md A5.2).

    deepspeed [--num_gpus N] tokpost_fast/train.py --stage post --config configs/demo.yaml --run-dir DIR [--resume]
        [--set post.input=reencode] [--set post.train_codebook=true]
    ... --set post.grids=clean --set post.name=control     (the control arm: the cache's clean grids, sigma = 1)

The decoder learns to map each cached grid (DIR/cache, built by --stage cache) to its paired *real* image with the
main stage's objective (the same AutoencoderObjective and TokenizerLoss: MSE, LPIPS, adaptive-weight hinge GAN
against a freshly initialised discriminator from post.disc_start = 0 on, semantic term), as two DeepSpeed engines
with EMA. Encoder and codebook are frozen (post.train_codebook unfreezes the codebook, as the official code
leaves it; our default keeps it, since the generator's indices refer to it: METHOD.md A7); no latent perturbation.

post.input: "tokens" (default) looks the cached ids up in the codebook and decodes them, what the paper describes;
"reencode" reproduces the official pipeline: decode the grid with the frozen main-stage tokenizer, round to 8 bits
(its PNG files), re-encode with the frozen encoder, quantize, decode.

Continuous tokenizer (a KL tokenizer, a DiT generator, a latent cache built with cache.post_strength):
the cached `latents` are decoded with tokenizer.decode; encoder and quant_conv are frozen, and there is no codebook.
"reencode" decodes them with the frozen tokenizer, rounds to 8 bits, and re-encodes to the posterior mean.

The cache is verified first (index checksums, tokenizer hash, settings against this config's cache section, each
shard's own metadata, each row's image path): a mismatch is refused naming the shard. Checkpoints, log.jsonl and
sample grids live in DIR/post/; the result is DIR/tokenizer_post.pt (EMA decoder; encoder and codebook copied
bit-exact from DIR/tokenizer.pt), never written over DIR/tokenizer.pt. post.name renames both (DIR/<name>/,
DIR/tokenizer_<name>.pt); post.grids=clean trains on the cache's ground-truth grids (latents) of the same images
instead of the generated ones: the control arm, same recipe and steps, sigma = 1. The loop (steps, log rows,
checkpoints, the NaN guard) is the main stage's: training/runner.py's AutoencoderLoop.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from tokpost_fast.atomic import file_sha256
from tokpost_fast.data import ImageFolderDataset
from tokpost_fast.data.token_cache import (FORMAT, INDEX, LATENT_FORMAT, CacheMismatch, load_rows, read_index,
                                           verify_cache)
from tokpost_fast.images import save_image_grid
from tokpost_fast.losses import build_tokenizer_loss
from tokpost_fast.models.tokenizer import build_discriminator, load_tokenizer, save_tokenizer
from tokpost_fast.perturb import step_seed
from tokpost_fast.stages.cache import cache_settings, select_images
from tokpost_fast.training.autoencoder import AutoencoderObjective
from tokpost_fast.training.checkpoint import latest_checkpoint, load_checkpoint, state_hash
from tokpost_fast.training.engine import (EMA, NonFiniteGuard, adamw, autocast, barrier, build_engine, cosine_lr,
                                          deepspeed_config, init_distributed, param_count, resolve_precision,
                                          seed_everything)
from tokpost_fast.training.run_log import JsonlLog, StepTimer, progress_bar
from tokpost_fast.training.runner import AutoencoderLoop

log = logging.getLogger("tokpost_fast.train")


def decode_inputs(tokenizer: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """A cache's decoder inputs -> images: token ids [B, h, w] through the codebook, latents [B, C, h, w] as is."""
    if inputs.is_floating_point():
        return tokenizer.decode(inputs.float())
    return tokenizer.decode_codes(inputs)


class PostObjective(AutoencoderObjective):
    """Main's objective with the decoder fed from the cache instead of the encoder: no perturbation, no
    codebook / commitment (or KL) terms in "tokens" mode (nothing upstream of the cached inputs trains)."""

    def reconstruct(self, images: torch.Tensor, token_grid: torch.Tensor,
                    source_images: Optional[torch.Tensor] = None):
        if source_images is None and token_grid.is_floating_point():   # continuous: [B, C, h, w] latents
            z = token_grid.float()
            return self.tokenizer.decode(z), None, z
        if source_images is None:                                   # "tokens": [B, h, w] ids -> codes
            z_q = self.tokenizer.quantize.lookup(token_grid)
            return self.tokenizer.decode(z_q), None, z_q
        if getattr(self.tokenizer, "is_continuous", False):         # "reencode", continuous: the posterior mean
            z = self.tokenizer.encode_latent(source_images)
            return self.tokenizer.decode(z), None, z
        q = self.tokenizer.quantize(self.tokenizer.encode_latent(source_images))   # "reencode"
        return self.tokenizer.decode(q.z_q), q, None


def freeze_for_post(tokenizer: nn.Module, train_codebook: bool) -> list[str]:
    """requires_grad off for the encoder side (and the codebook unless train_codebook); returns the names of the
    parameters that still train."""
    frozen = {id(p) for p in tokenizer.encoder_parameters()}
    if not train_codebook:
        frozen |= {id(p) for p in tokenizer.codebook_parameters()}
    for p in tokenizer.parameters():
        p.requires_grad_(id(p) not in frozen)
    return [n for n, p in tokenizer.named_parameters() if p.requires_grad]


def to_8bit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> the 256 levels a PNG stores, back in [-1, 1] (the official re-encode path reads PNGs)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


class PairedRows(torch.utils.data.Dataset):
    """Cache row r -> (real image [3, S, S], cached grid [h, w] int64 or latents [C, h, w] fp16, row r)."""

    def __init__(self, dataset, rows, grids: str = "generated"):
        self.dataset, self.rows = dataset, rows
        self.inputs = rows.decoder_inputs if grids == "generated" else clean_inputs(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, row: int):
        index = int(self.rows.sample_index[row])
        image, _, got, bad = self.dataset[index]
        if got != index:
            raise ValueError(f"real image {self.dataset.path(index)} of cache row {row} is unreadable: {bad}")
        return image, self.inputs[row], row


def clean_inputs(rows) -> torch.Tensor:
    """The cache's ground-truth grids [n, h, w] (or latents [n, C, h, w]) of the same images: the control arm."""
    return rows.gt_latents if hasattr(rows, "gt_latents") else rows.gt_tokens


def load_verified_cache(cfg, run_dir: Path, tokenizer_sha256: str, dataset, continuous: bool = False):
    """(index, rows) of DIR/cache after every check; CacheMismatch names the offending shard. continuous: the
    tokenizer is continuous, so the cache must be a latent one."""
    folder = Path(run_dir) / "cache"
    num_rows = len(select_images(len(dataset), cfg.cache.num_images, cfg.cache.seed))
    expected = cache_settings(cfg, num_rows, continuous)
    if (folder / INDEX).is_file():
        found = read_index(folder)["format"]
        wanted = LATENT_FORMAT if continuous else FORMAT
        if found != wanted:
            raise CacheMismatch(f"{folder / INDEX}: a {found} cache, but the tokenizer is "
                                f"{'continuous' if continuous else 'a VQ one'} and needs a {wanted} cache; rebuild "
                                "it with --stage cache")
    index = verify_cache(folder, tokenizer_sha256, expected)
    rows = load_rows(folder, index)
    for entry in index["shards"]:
        for row in range(entry["first_row"], entry["first_row"] + entry["rows"]):
            index_of_row = int(rows.sample_index[row])
            if index_of_row >= len(dataset) or dataset.relative_path(index_of_row) != rows.relative_paths[row]:
                raise CacheMismatch(f"shard {folder / entry['file']}: row {row} pairs with "
                                    f"{rows.relative_paths[row]!r}, which is not image {index_of_row} of "
                                    f"{cfg.data.root} any more; rebuild the cache")
    return index, rows


def _epoch_batches(seed: int, epoch: int, count: int, global_batch: int, rank: int, micro: int, skip: int):
    """This rank's row lists for the rest of an epoch: a permutation keyed by (seed, epoch) only."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    steps = count // global_batch
    return [order[s * global_batch + rank * micro:s * global_batch + (rank + 1) * micro].tolist()
            for s in range(skip, steps)]


class PostLoop(AutoencoderLoop):
    """Post-training's data (cache rows paired with their real images, a permutation per epoch), inputs (the
    cached grids, re-encoded first when post.input = reencode) and sample grids (real / original decoder / this
    one)."""

    def __init__(self, cfg, stage_dir: Path, pairs: "PairedRows", original: nn.Module, **loop):
        super().__init__(**loop)
        self.cfg, self.pc, self.stage_dir, self.pairs, self.original = cfg, cfg.post, stage_dir, pairs, original
        count = len(pairs)
        self.shown = [i * count // min(self.pc.sample_images, count) for i in range(min(self.pc.sample_images, count))]

    def batches(self, epoch: int, skip: int):
        pc, info = self.pc, self.info
        micro = pc.global_batch_size // info.world_size
        rows = _epoch_batches(pc.seed, epoch, len(self.pairs), pc.global_batch_size, info.rank, micro, skip)
        return torch.utils.data.DataLoader(self.pairs, batch_sampler=rows, num_workers=self.cfg.data.num_workers)

    def forward(self, step: int, epoch: int, batch):
        images, token_grid, _ = batch
        images = images.to(self.device, non_blocking=True)
        token_grid = token_grid.to(self.device, non_blocking=True)
        torch.manual_seed(step_seed(self.pc.seed, step, self.info.rank, stream="post"))   # DiffAugment draws
        source = None
        if self.pc.input == "reencode":
            with torch.no_grad():
                source = to_8bit(decode_inputs(self.original, token_grid).float())
        return (images, *self.ae(images, step, token_grid, source))

    @torch.no_grad()
    def sample_grid(self, name: str, model: nn.Module) -> None:
        real = torch.stack([self.pairs[i][0] for i in self.shown]).to(self.device)
        grids = self.pairs.inputs[self.shown].to(self.device)
        was_training = model.training
        model.eval()
        with autocast(self.device, self.precision):
            rows_out = [real, decode_inputs(self.original, grids), decode_inputs(model, grids)]
        model.train(was_training)
        rows_out = [r.detach().float().cpu() for r in rows_out]
        save_image_grid(self.stage_dir / "samples" / name, torch.cat(rows_out), nrow=len(self.shown))

    def sample(self, step: int, epoch: int) -> None:
        self.sample_grid(f"step-{step:08d}.png", self.tokenizer)


def run(cfg, run_dir: Path, resume: bool = False) -> dict:
    pc, run_dir = cfg.post, Path(run_dir)
    stage_dir = run_dir / pc.name
    info = init_distributed()
    device = info.device
    precision = resolve_precision(pc.precision, device)
    if pc.global_batch_size % info.world_size:
        raise ValueError(f"post.global_batch_size={pc.global_batch_size} is not divisible by the world size "
                         f"{info.world_size}")
    micro = pc.global_batch_size // info.world_size
    tokenizer_path = run_dir / "tokenizer.pt"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path} is missing: run --stage main first (or import one with "
                                "--tokenizer llamagen:PATH)")
    tokenizer_sha = file_sha256(tokenizer_path)
    dataset = ImageFolderDataset(cfg.data, train=False, seed=0, epoch=0)
    original = load_tokenizer(str(tokenizer_path)).to(device).eval().requires_grad_(False)
    continuous = bool(getattr(original, "is_continuous", False))
    index, rows = load_verified_cache(cfg, run_dir, tokenizer_sha, dataset, continuous)
    index_sha = file_sha256(run_dir / "cache" / INDEX)
    count = len(rows)
    steps_per_epoch = count // pc.global_batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"the cache holds {count} rows, fewer than post.global_batch_size={pc.global_batch_size}")
    total_steps = pc.epochs * steps_per_epoch
    stop_step = total_steps if pc.max_steps is None else min(total_steps, pc.max_steps)
    warmup_steps = round(pc.warmup_epochs * steps_per_epoch)
    disc_min_lr = pc.min_lr / pc.lr * pc.disc_lr

    seed_everything(pc.seed)                          # the same fresh discriminator on every rank
    tokenizer = load_tokenizer(str(tokenizer_path)).to(device)
    trainable = freeze_for_post(tokenizer, pc.train_codebook)
    loss_fn = build_tokenizer_loss(dataclasses.replace(cfg.loss, disc_start=pc.disc_start), tokenizer).to(device)
    discriminator = build_discriminator(cfg.loss.disc_ndf, cfg.loss.disc_layers).to(device)
    objective = PostObjective(tokenizer, loss_fn, discriminator)
    ds_cfg = deepspeed_config(pc.deepspeed_config, micro, info.world_size, pc.zero_stage, pc.grad_clip)
    ae_opt = adamw([p for p in objective.parameters() if p.requires_grad], pc.lr, pc.betas, pc.weight_decay)
    ae = build_engine(objective, ae_opt, ds_cfg)
    de_opt = adamw(discriminator.parameters(), pc.disc_lr, pc.betas, pc.disc_weight_decay)
    de = build_engine(discriminator, de_opt, ds_cfg)
    engines = {"decoder": ae, "discriminator": de}
    ema = EMA(tokenizer, pc.ema_decay)
    guard = NonFiniteGuard(pc.max_bad_steps, device)

    if info.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    step = 0
    checkpoint = latest_checkpoint(stage_dir) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, engines, info)
        if state["cache_index_sha256"] != index_sha:
            raise ValueError(f"{checkpoint} was trained on another cache than {run_dir / 'cache'} (index sha256 "
                             f"{state['cache_index_sha256']} vs {index_sha}); start without --resume")
        step = state["step"]
        ema.load_state_dict(state["ema"])
        loss_fn.lecam.load_state_dict(state["lecam"])
        guard.load_state_dict(state["guard"])
    jsonl = JsonlLog(stage_dir / "log.jsonl", info.is_main, resume_step=step if checkpoint is not None else None)
    if checkpoint is None:
        jsonl.write({"step": 0, "event": "start", "world_size": info.world_size, "local_batch": micro,
                     "rows": count, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                     "stop_step": stop_step, "input": pc.input, "grids": pc.grids, "train_codebook": pc.train_codebook,
                     "trainable": trainable, "params_trainable": param_count(
                         p for p in objective.parameters() if p.requires_grad),
                     "params_discriminator": param_count(discriminator.parameters()), "precision": precision,
                     "cache_index_sha256": index_sha, "tokenizer_sha256": tokenizer_sha})

    def state(at_step: int) -> dict:
        return {"step": at_step, "ema": ema.state_dict(), "lecam": loss_fn.lecam.state_dict(),
                "guard": guard.state_dict(), "cache_index_sha256": index_sha}

    def schedule(at_step: int) -> tuple[float, float]:
        return (cosine_lr(at_step, total_steps, warmup_steps, pc.lr, pc.min_lr),
                cosine_lr(at_step, total_steps, warmup_steps, pc.disc_lr, disc_min_lr))

    loop = PostLoop(cfg, stage_dir, PairedRows(dataset, rows, pc.grids), original, info=info, jsonl=jsonl,
                    guard=guard, checkpoint_dir=stage_dir, engines=engines, state=state,
                    ckpt_interval=pc.ckpt_interval, keep=pc.keep_checkpoints, step=step,
                    resumed=checkpoint is not None, precision=precision, tokenizer=tokenizer, loss_fn=loss_fn,
                    ae=ae, ae_opt=ae_opt, de=de, de_opt=de_opt, ema=ema, timer=StepTimer(device, sync=False),
                    bar=progress_bar(stop_step, step, info.is_main, desc=pc.name), schedule=schedule,
                    steps_per_epoch=steps_per_epoch, stop_step=stop_step, log_interval=pc.log_interval,
                    sample_interval=pc.sample_interval)
    loop.train()
    step = loop.step

    export = run_dir / f"tokenizer_{pc.name}.pt"
    content_hash = None
    if info.is_main:
        exported = load_tokenizer(str(tokenizer_path))
        ema.copy_to(exported)
        # Frozen parts stay bit-exact: the EMA of a constant is the constant only up to rounding.
        reference = original.state_dict()
        exported.load_state_dict({k: (v if k in trainable else reference[k].cpu())
                                  for k, v in exported.state_dict().items()})
        content_hash = state_hash(exported.state_dict())
        save_tokenizer(exported, str(export), extra={
            "weights": "ema", "content_hash": content_hash, "step": step, "source_tokenizer": {
                "path": str(tokenizer_path.resolve()), "sha256": tokenizer_sha},
            "cache_index_sha256": index_sha, "post_config": dataclasses.asdict(pc),
            "generator_sha256": index["generator"]["sha256"]})
        loop.sample_grid("final.png", exported.to(device))
        jsonl.write({"step": step, "event": "exported", "path": str(export), "content_hash": content_hash,
                     "nan_skipped": guard.skipped})
    jsonl.close()
    barrier()
    return {"step": step, "tokenizer_post": str(export), "content_hash": content_hash}
