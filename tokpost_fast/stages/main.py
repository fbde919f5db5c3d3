"""Main training of the tokenizer (METHOD.md A1 + A2): autoencoder and discriminator as two DeepSpeed engines, the
latent perturbation on the first floor(B_local * beta) samples of each local batch, GAN from loss.disc_start with
the adaptive weight, EMA of the autoencoder weights; exports RUN/tokenizer.pt (the EMA model).

    deepspeed --num_gpus 2 tokpost_fast/train.py --stage main --config configs/demo.yaml --run-dir runs/demo

A continuous tokenizer (arch kl_cnn, KLTokenizer) trains through the same loop: its KL term replaces the
codebook / commitment terms, and the latent perturbation is Gaussian noise (perturb.noise, annealed like alpha) on
the same first floor(B_local * beta) samples, our analogue of METHOD.md A2; there is no codebook usage to log. When
tokenizer.scaling_factor is None it is measured at export (1 / std of the EMA model's posterior means).

The loop itself (steps, log rows, checkpoints, the NaN guard) is training/runner.py's AutoencoderLoop, shared with
post-training; this file sets it up and exports.

Codebook health (section `codebook`, training/codebook.py): every logged row carries the codes used,
their perplexity and the dead-code count; optional k-means init of the codebook and dead-code restarts (both off
by default). A restart writes the module, ZeRO's fp32 master and the EMA, and is checked to be the same bytes on
every rank; its state is in the checkpoint.

Exact resume: the data order depends only on (seed, epoch) and the batches of the current epoch already consumed
are skipped; every random draw of a step is keyed by (train.seed, global step, rank) (perturb.step_seed), and the
LR schedule by the step alone, so N steps + --resume + N steps give the weights of 2N straight steps.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from tokpost_fast.config import Config, config_diff, dump_config, read_yaml, to_dict
from tokpost_fast.data import ImageFolderDataset, build_loader
from tokpost_fast.images import save_image_grid
from tokpost_fast.losses import TokenizerLoss, build_tokenizer_loss
from tokpost_fast.models.tokenizer import Tokenizer, build_discriminator, build_tokenizer, save_tokenizer
from tokpost_fast.models.tokenizer.kl import estimate_scaling_factor
from tokpost_fast.perturb import perturb_params, perturbed_samples, step_seed
from tokpost_fast.training.autoencoder import AutoencoderObjective
from tokpost_fast.training.checkpoint import latest_checkpoint, load_checkpoint, state_hash
from tokpost_fast.training.codebook import CodebookHealth, kmeans_init_codebook, train_batches
from tokpost_fast.training.engine import (EMA, DistInfo, NonFiniteGuard, adamw, autocast, barrier, build_engine,
                                          cosine_lr, deepspeed_config, init_distributed, param_count,
                                          resolve_precision, seed_everything, unreadable_images_all_ranks)
from tokpost_fast.training.run_log import JsonlLog, StepTimer, progress_bar
from tokpost_fast.training.runner import AutoencoderLoop

log = logging.getLogger("tokpost_fast.train")

SCALE_IMAGES = 256  # eval-transformed training images behind a measured scaling_factor (spread over classes)


def fixed_images(cfg: Config, count: int) -> torch.Tensor:
    """`count` eval-transformed images spread evenly over the data set (so over its classes): what every sample
    grid shows."""
    dataset = ImageFolderDataset(cfg.data, train=False, seed=cfg.train.seed, epoch=0)
    count = min(count, len(dataset))
    return torch.stack([dataset[i * len(dataset) // count][0] for i in range(count)])


@torch.no_grad()
def write_samples(path: Path, tokenizer: Tokenizer, images: torch.Tensor, cfg: Config, epoch: int,
                  precision: str) -> None:
    """Rows: inputs / reconstructions / perturbed reconstructions (every token under the epoch's A2 operator; a
    continuous tokenizer: the posterior mean, then the mean under the epoch's Gaussian perturbation)."""
    was_training = tokenizer.training
    tokenizer.eval()
    pp = perturb_params(cfg.perturb, epoch)
    device = next(tokenizer.parameters()).device
    x = images.to(device)
    with autocast(device, precision):
        if tokenizer.is_continuous:
            recon, _ = tokenizer(x, sample_posterior=False)
            perturbed, _ = tokenizer(x, perturb_noise=pp.noise, perturb_samples=None, seed=cfg.train.seed,
                                     sample_posterior=False)
        else:
            recon, _ = tokenizer(x)
            perturbed, _ = tokenizer(x, perturb_rate=pp.rate, perturb_topk=pp.topk, perturb_samples=None,
                                     seed=cfg.train.seed)
    rows = [r.detach().float().cpu() for r in (x, recon, perturbed)]
    save_image_grid(path, torch.cat(rows), nrow=rows[0].shape[0])
    tokenizer.train(was_training)


class MainLoop(AutoencoderLoop):
    """The main stage's data (the training split, exact resume), inputs (the epoch's latent perturbation) and log
    keys (the perturbation, codebook health)."""

    def __init__(self, cfg: Config, run_dir: Path, codebook: CodebookHealth | None, samples, **loop):
        super().__init__(**loop)
        self.cfg, self.run_dir, self.codebook, self.samples = cfg, run_dir, codebook, samples
        self.continuous = self.tokenizer.is_continuous
        self.n_perturbed = 0

    def batches(self, epoch: int, skip: int):
        return train_batches(self.cfg, self.info, epoch, skip)

    def forward(self, step: int, epoch: int, batch):
        seed, rank = self.cfg.train.seed, self.info.rank
        images = batch[0].to(self.device, non_blocking=True)
        # Every random draw of this step (DiffAugment, dropout) is keyed by (seed, step, rank).
        torch.manual_seed(step_seed(seed, step, rank, stream="torch"))
        pp = perturb_params(self.cfg.perturb, epoch)
        self.n_perturbed = perturbed_samples(pp, images.shape[0], self.continuous)
        out = self.ae(images, step, pp.rate, pp.topk, self.n_perturbed, step_seed(seed, step, rank),
                      perturb_noise=pp.noise)
        return (images, *out)

    def after_update(self, step: int, indices) -> None:
        if self.codebook is not None:
            with self.timer.phase("codebook"):
                self.codebook.update(step, indices, self.ae_opt, self.ema)

    def row_head(self, epoch: int) -> dict:
        pp = perturb_params(self.cfg.perturb, epoch)
        return {**({"perturb_noise": pp.noise} if self.continuous else
                   {"perturb_rate": pp.rate, "perturb_topk": pp.topk}), "perturbed_per_rank": self.n_perturbed}

    def row_tail(self) -> dict:
        return self.codebook.row() if self.codebook is not None else {}

    def sample(self, step: int, epoch: int) -> None:
        write_samples(self.run_dir / "samples" / f"step-{step:08d}.png", self.tokenizer, self.samples, self.cfg,
                      epoch, self.precision)


def _prepare_run_dir(cfg: Config, run_dir: Path, resume: bool, info: DistInfo) -> None:
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        old = run_dir / "config.yaml"
        if resume and old.exists():
            changed = config_diff(read_yaml(old), to_dict(cfg))
            if changed:
                log.warning("resuming with a changed config: %s", "; ".join(changed))
        dump_config(cfg, run_dir / "config.yaml")
    barrier()


def run(cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    info = init_distributed()
    run_dir = Path(run_dir)
    tc = cfg.train
    device = info.device
    precision = resolve_precision(tc.precision, device)
    _prepare_run_dir(cfg, run_dir, resume, info)

    # Same initial weights on every rank (DeepSpeed also broadcasts rank 0's at initialize).
    seed_everything(tc.seed)
    tokenizer = build_tokenizer(cfg.tokenizer).to(device)
    loss_fn: TokenizerLoss = build_tokenizer_loss(cfg.loss, tokenizer).to(device)
    discriminator = build_discriminator(cfg.loss.disc_ndf, cfg.loss.disc_layers).to(device)
    autoencoder = AutoencoderObjective(tokenizer, loss_fn, discriminator)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None and info.is_main:
        log.warning("--resume: no checkpoint in %s; starting from step 0", run_dir)
    kmeans_init = None
    if cfg.codebook.init == "kmeans" and checkpoint is None:     # before the engines copy the weights
        kmeans_init = kmeans_init_codebook(cfg, info, tokenizer)

    local_batch = cfg.data.batch_size
    steps_per_epoch = len(build_loader(cfg.data, train=True, rank=info.rank, world_size=info.world_size,
                                       seed=tc.seed, epoch=0))
    total_steps = tc.epochs * steps_per_epoch
    stop_step = total_steps if tc.max_steps is None else min(total_steps, tc.max_steps)
    warmup_steps = round(tc.warmup_epochs * steps_per_epoch)
    disc_min_lr = tc.min_lr / tc.lr * tc.disc_lr

    ds_cfg = deepspeed_config(tc.deepspeed_config, local_batch, info.world_size, tc.zero_stage, tc.grad_clip)
    ae_opt = adamw(autoencoder.parameters(), tc.lr, tc.betas, tc.weight_decay)
    ae = build_engine(autoencoder, ae_opt, ds_cfg)
    de_opt = adamw(discriminator.parameters(), tc.disc_lr, tc.betas, tc.disc_weight_decay)
    de = build_engine(discriminator, de_opt, ds_cfg)
    engines = {"autoencoder": ae, "discriminator": de}
    ema = EMA(tokenizer, tc.ema_decay)
    guard = NonFiniteGuard(tc.max_bad_steps, device)
    continuous = tokenizer.is_continuous
    codebook = None if continuous else CodebookHealth(tokenizer, cfg)

    step = 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, engines, info)
        step = state["step"]
        ema.load_state_dict(state["ema"])
        loss_fn.lecam.load_state_dict(state["lecam"])
        guard.load_state_dict(state["guard"])
        if codebook is not None and state.get("codebook") is not None:
            codebook.load_state_dict(state["codebook"])
        elif codebook is not None and info.is_main:
            log.warning("%s holds no dead-code state: code usage is counted from step %d", checkpoint, step)
        if info.is_main:
            log.info("resumed from %s at step %d", checkpoint, step)

    jsonl = JsonlLog(run_dir / "log.jsonl", info.is_main, resume_step=step if checkpoint is not None else None)
    if checkpoint is None:
        cb = cfg.codebook
        jsonl.write({"step": 0, "event": "start", "world_size": info.world_size, "local_batch": local_batch,
                     "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "stop_step": stop_step,
                     "precision": precision, "params_autoencoder": param_count(autoencoder.parameters()),
                     "params_discriminator": param_count(discriminator.parameters()),
                     "codebook_init": cb.init, "restart_dead": cb.restart_dead})
        if kmeans_init is not None:
            jsonl.write({"step": 0, "event": "codebook k-means init", **kmeans_init})
        if loss_fn.perceptual is None and cfg.loss.perceptual > 0:
            jsonl.event(0, "LPIPS weight 0: no LPIPS weights configured (loss.perceptual_weights)")
        if loss_fn.semantic is None and cfg.loss.semantic > 0:
            jsonl.event(0, "semantic loss off: no DINOv2 weights configured (loss.dinov2_weights)")

    timer = StepTimer(device, sync=tc.time_split)
    if not continuous:
        timer.watch_module(tokenizer.quantize, "quantizer", inside="forward")
    samples = fixed_images(cfg, tc.sample_images) if info.is_main else None

    def state(at_step: int) -> dict:
        return {"step": at_step, "epoch": at_step // steps_per_epoch, "ema": ema.state_dict(),
                "lecam": loss_fn.lecam.state_dict(), "guard": guard.state_dict(), "config": to_dict(cfg),
                "codebook": codebook.state_dict() if codebook is not None else None}

    def schedule(at_step: int) -> tuple[float, float]:
        return (cosine_lr(at_step, total_steps, warmup_steps, tc.lr, tc.min_lr),
                cosine_lr(at_step, total_steps, warmup_steps, tc.disc_lr, disc_min_lr))

    loop = MainLoop(cfg, run_dir, codebook, samples, info=info, jsonl=jsonl, guard=guard, checkpoint_dir=run_dir,
                    engines=engines, state=state, ckpt_interval=tc.ckpt_interval, keep=tc.keep_checkpoints,
                    step=step, resumed=checkpoint is not None, precision=precision, tokenizer=tokenizer,
                    loss_fn=loss_fn, ae=ae, ae_opt=ae_opt, de=de, de_opt=de_opt, ema=ema, timer=timer,
                    bar=progress_bar(stop_step, step, info.is_main, desc="main"), schedule=schedule,
                    steps_per_epoch=steps_per_epoch, stop_step=stop_step, log_interval=tc.log_interval,
                    sample_interval=tc.sample_interval)
    loop.train()
    step = loop.step

    export = run_dir / "tokenizer.pt"
    content_hash = None
    if info.is_main:
        content_hash = export_tokenizer(cfg, export, ema, step, steps_per_epoch, samples, precision, device, jsonl)
        jsonl.write({"step": step, "event": "exported", "path": str(export), "content_hash": content_hash,
                     "nan_skipped": guard.skipped})
    unreadable = unreadable_images_all_ranks()
    if unreadable and info.is_main:
        jsonl.event(step, f"{len(unreadable)} unreadable images were skipped (data.on_bad_image=skip)",
                    unreadable=unreadable)
    jsonl.close()
    barrier()
    return {"step": step, "tokenizer": str(export), "content_hash": content_hash, "nan_skipped": guard.skipped,
            "unreadable_images": len(unreadable)}


def export_tokenizer(cfg: Config, export: Path, ema: EMA, step: int, steps_per_epoch: int, samples,
                     precision: str, device: torch.device, jsonl: JsonlLog) -> str:
    """Rank 0: RUN/tokenizer.pt holds the EMA weights (a continuous tokenizer's scaling_factor measured first when
    unset), and the final sample grid; returns the weights' content hash."""
    # The EMA weights replace everything, so no DINOv2 init is read (load_tokenizer rebuilds it the same way).
    exported = build_tokenizer(dataclasses.replace(cfg.tokenizer, dinov2_weights=None))
    ema.copy_to(exported)
    if exported.is_continuous and exported.config.scaling_factor is None:
        exported.to(device)
        scale = estimate_scaling_factor(exported, fixed_images(cfg, SCALE_IMAGES))
        exported.config = dataclasses.replace(exported.config, scaling_factor=scale)
        log.info("tokenizer.scaling_factor measured: %.6g (1 / std of the latents)", scale)
        jsonl.write({"step": step, "event": "scaling_factor measured", "scaling_factor": scale})
        exported.cpu()
    content_hash = state_hash(exported.state_dict())
    save_tokenizer(exported, str(export), extra={
        "weights": "ema", "content_hash": content_hash, "step": step,
        "epoch": step // steps_per_epoch, "run_config": to_dict(cfg)})
    exported.to(device)
    write_samples(export.parent / "samples" / "final.png", exported, samples, cfg,
                  max(0, step - 1) // steps_per_epoch, precision)
    return content_hash
