"""Main training of the tokenizer (SPEC A1 + A2): autoencoder and discriminator as two DeepSpeed engines, the
latent perturbation on the first floor(B_local * beta) samples of each local batch, GAN from loss.disc_start with
the adaptive weight, EMA of the autoencoder weights; exports RUN/tokenizer.pt (the EMA model).

    deepspeed --num_gpus 2 tokpost_fast/train.py --stage main --config configs/demo.yaml --run-dir runs/demo

A continuous tokenizer (arch kl_cnn, KLTokenizer) trains through the same loop: its KL term replaces the
codebook / commitment terms, and the latent perturbation is Gaussian noise (perturb.noise, annealed like alpha) on
the same first floor(B_local * beta) samples, our analogue of SPEC A2; there is no codebook usage to log. When
tokenizer.scaling_factor is None it is measured at export (1 / std of the EMA model's posterior means).

Codebook health (section `codebook`, models/tokenizer/quantizer.py): every logged row carries the codes used,
their perplexity and the dead-code count; optional k-means init of the codebook and dead-code restarts (both off
by default). A restart writes the module, ZeRO's fp32 master and the EMA, and is checked to be the same bytes on
every rank; its state is in the checkpoint.

Exact resume: the data order depends only on (seed, epoch) and the batches of the current epoch already consumed
are skipped; every random draw of a step is keyed by (train.seed, global step, rank) (perturb.step_seed), and the
LR schedule by the step alone, so N steps + --resume + N steps give the weights of 2N straight steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from tokpost_fast.config import Config, config_diff, dump_config, read_yaml, to_dict
from tokpost_fast.data import ImageFolderDataset, build_loader
from tokpost_fast.losses import TokenizerLoss, build_tokenizer_loss
from tokpost_fast.models.tokenizer import Tokenizer, build_discriminator, build_tokenizer, save_tokenizer
from tokpost_fast.models.tokenizer.kl import estimate_scaling_factor
from tokpost_fast.models.tokenizer.quantizer import DeadCodeTracker, synchronised_fingerprints
from tokpost_fast.perturb import perturb_params, perturbed_samples, step_seed
from tokpost_fast.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tokpost_fast.training.engine import (EMA, DistInfo, NonFiniteGuard, NonFiniteLossError, autocast, barrier,
                                        build_engine, cosine_lr, deepspeed_config, init_distributed, param_count,
                                        resolve_precision, seed_everything, set_lr,
                                        unreadable_images_all_ranks)
from tokpost_fast.training.run_log import CodebookUsage, JsonlLog, StepTimer, progress_bar, save_image_grid

log = logging.getLogger("tokpost_fast.train")

SCALE_IMAGES = 256  # eval-transformed training images behind a measured scaling_factor (spread over classes)


class GeneratorObjective(nn.Module):
    """The autoencoder engine's module: its forward runs the tokenizer *and* the generator-side loss.

    Why the loss lives inside forward: DeepSpeed hooks the tensors an engine's forward returns and treats the first
    gradient that reaches them as the start of engine.backward. The adaptive GAN weight takes two
    torch.autograd.grad calls through the reconstruction to the decoder's last layer; on hooked outputs they would
    open (and close, reducing empty gradient buckets) a backward of their own. Inside forward there are no hooks
    yet, and only the loss is returned with a graph.

    Registered here: the tokenizer and the loss's trainable parameters (a CNN tokenizer's semantic projection), so
    ZeRO owns every generator-side parameter. Held but not registered: the loss module (frozen LPIPS / DINOv2,
    LeCam buffers) and the discriminator, which the other engine owns and which runs functionally on detached
    parameters here (a ZeRO engine must not see gradients of another engine's parameters)."""

    def __init__(self, tokenizer: Tokenizer, loss_fn: TokenizerLoss, discriminator: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer
        self.extra = nn.ParameterList(loss_fn.trainable_parameters())
        object.__setattr__(self, "loss_fn", loss_fn)
        object.__setattr__(self, "discriminator", discriminator)

    def _frozen_discriminator(self, images: torch.Tensor) -> torch.Tensor:
        state = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        state.update(self.discriminator.named_buffers())
        return torch.func.functional_call(self.discriminator, state, (images,))

    def reconstruct(self, images: torch.Tensor, perturb_rate: float, perturb_topk: int, perturb_samples: int,
                    seed: int, perturb_noise: float = 0.0):
        """-> (recon, q, z_q): the decoder's output, the QuantizeOutput whose codebook / commit terms count (a
        KLOutput for a continuous tokenizer: its KL term; None: no such terms), the latent the decoder saw (None:
        q's). Post-training overrides it (stages/post.py). A continuous tokenizer takes perturb_noise and ignores
        perturb_rate / perturb_topk."""
        if self.tokenizer.is_continuous:
            recon, out = self.tokenizer(images, perturb_noise=perturb_noise, perturb_samples=perturb_samples,
                                        seed=seed)
            return recon, out, None
        recon, q = self.tokenizer(images, perturb_rate=perturb_rate, perturb_topk=perturb_topk,
                                  perturb_samples=perturb_samples, seed=seed)
        return recon, q, None

    def forward(self, images: torch.Tensor, step: int, *inputs, **kw_inputs):
        recon, q, z_q = self.reconstruct(images, *inputs, **kw_inputs)
        loss, logs = self.loss_fn.generator_loss(images, recon, step=step, q=q, z_q=z_q,
                                                 discriminator=self._frozen_discriminator,
                                                 last_layer=self.tokenizer.last_layer(),
                                                 semantic_projection=self.tokenizer.semantic_projection)
        return loss, logs, recon.detach(), getattr(q, "indices", None)   # a KLOutput has no indices


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors of a state dict in key order: names the exported weights."""
    h = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


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
    save_image_grid(path, [x, recon, perturbed])
    tokenizer.train(was_training)


def _batches(cfg: Config, info: DistInfo, epoch: int, skip: int) -> Iterator:
    loader = build_loader(cfg.data, train=True, rank=info.rank, world_size=info.world_size, seed=cfg.train.seed,
                          epoch=epoch, start_batch=skip)
    return iter(loader)


@torch.no_grad()
def kmeans_init_codebook(cfg: Config, info: DistInfo, tokenizer: Tokenizer) -> dict:
    """codebook.init = kmeans (collective): the codebook becomes the k-means centroids (ops.kmeans) of the encoder
    outputs of the first ceil(codebook.kmeans_images / world) epoch-0 training images of every rank."""
    t0 = time.perf_counter()
    per_rank = -(-cfg.codebook.kmeans_images // info.world_size)
    latents, seen = [], 0
    tokenizer.eval()
    for batch in _batches(cfg, info, epoch=0, skip=0):
        z = tokenizer.encode_latent(batch[0][:per_rank - seen].to(info.device))
        latents.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float())
        seen += z.shape[0]
        if seen >= per_rank:
            break
    tokenizer.train()
    rows = torch.cat(latents)
    inertia = tokenizer.quantize.init_from_kmeans(rows, cfg.codebook.kmeans_iters, seed=cfg.train.seed)
    return {"images": seen * info.world_size, "latent_rows": rows.shape[0] * info.world_size,
            "iters": cfg.codebook.kmeans_iters, "inertia_per_row": float(inertia),
            "seconds": time.perf_counter() - t0}


def run(cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    info = init_distributed()
    run_dir = Path(run_dir)
    tc = cfg.train
    device = info.device
    precision = resolve_precision(tc.precision, device)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        old = run_dir / "config.yaml"
        if resume and old.exists():
            changed = config_diff(read_yaml(old), to_dict(cfg))
            if changed:
                log.warning("resuming with a changed config: %s", "; ".join(changed))
        dump_config(cfg, run_dir / "config.yaml")
    barrier()

    # Same initial weights on every rank (DeepSpeed also broadcasts rank 0's at initialize).
    seed_everything(tc.seed)
    tokenizer = build_tokenizer(cfg.tokenizer).to(device)
    loss_fn: TokenizerLoss = build_tokenizer_loss(cfg.loss, tokenizer).to(device)
    discriminator = build_discriminator(cfg.loss.disc_ndf, cfg.loss.disc_layers).to(device)
    autoencoder = GeneratorObjective(tokenizer, loss_fn, discriminator)
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
    ae, ae_opt = build_engine(autoencoder, autoencoder.parameters(), tc.lr, tc.betas, tc.weight_decay, ds_cfg)
    de, de_opt = build_engine(discriminator, discriminator.parameters(), tc.disc_lr, tc.betas,
                              tc.disc_weight_decay, ds_cfg)
    engines = {"autoencoder": ae, "discriminator": de}
    ema = EMA(tokenizer, tc.ema_decay)
    guard = NonFiniteGuard(tc.max_bad_steps, device)

    cb = cfg.codebook
    tracker = None if tokenizer.is_continuous else DeadCodeTracker(tokenizer.quantize, cb.dead_threshold,
                                                                   cb.dead_window, cb.usage_decay)
    step = 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, engines, info)
        step = state["step"]
        ema.load_state_dict(state["ema"])
        loss_fn.lecam.load_state_dict(state["lecam"])
        guard.load_state_dict(state["guard"])
        if tracker is not None and state.get("codebook") is not None:
            tracker.load_state_dict(state["codebook"])
        elif tracker is not None and info.is_main:
            log.warning("%s holds no dead-code state: code usage is counted from step %d", checkpoint, step)
        if info.is_main:
            log.info("resumed from %s at step %d", checkpoint, step)

    jsonl = JsonlLog(run_dir / "log.jsonl", info.is_main, resume_step=step if checkpoint is not None else None)
    if checkpoint is None:
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

    continuous = tokenizer.is_continuous
    timer = StepTimer(device, sync=tc.time_split)
    if not continuous:
        timer.watch_module(tokenizer.quantize, "quantizer", inside="forward")
    usage = None if continuous else CodebookUsage(tokenizer.codebook_size, tc.usage_window)
    samples = fixed_images(cfg, tc.sample_images) if info.is_main else None
    bar = progress_bar(stop_step, step, info.is_main, desc="main")
    sums: dict[str, torch.Tensor] = {}
    sums_n = 0
    last_saved = step if checkpoint is not None else -1
    interval_t0, interval_images = time.perf_counter(), 0
    restart_prints = None           # per-rank codebook fingerprints after the interval's last restart

    def save(at_step: int) -> None:
        state = {"step": at_step, "epoch": at_step // steps_per_epoch, "ema": ema.state_dict(),
                 "lecam": loss_fn.lecam.state_dict(), "guard": guard.state_dict(), "config": to_dict(cfg),
                 "codebook": tracker.state_dict() if tracker is not None else None}
        save_checkpoint(run_dir, at_step, engines, state, info, keep=tc.keep_checkpoints)

    ae.train()
    de.train()
    try:
        while step < stop_step:
            epoch = step // steps_per_epoch
            batches = _batches(cfg, info, epoch, skip=step % steps_per_epoch)
            while step < stop_step and step // steps_per_epoch == epoch:
                with timer.phase("data"):
                    batch = next(batches, None)
                    if batch is None:
                        raise RuntimeError(f"the data loader of epoch {epoch} ended after {step % steps_per_epoch} "
                                           f"batches; it promised {steps_per_epoch} (len)")
                    images = batch[0].to(device, non_blocking=True)
                # Every random draw of this step (DiffAugment, dropout) is keyed by (seed, step, rank).
                torch.manual_seed(step_seed(tc.seed, step, info.rank, stream="torch"))
                pp = perturb_params(cfg.perturb, epoch)
                n_perturbed = perturbed_samples(pp, images.shape[0], continuous)
                lr = cosine_lr(step, total_steps, warmup_steps, tc.lr, tc.min_lr)
                disc_lr = cosine_lr(step, total_steps, warmup_steps, tc.disc_lr, disc_min_lr)
                gan_on = loss_fn.gan_active(step)

                with timer.phase("forward"), autocast(device, precision):
                    loss, logs, recon, indices = ae(images, step, pp.rate, pp.topk, n_perturbed,
                                                    step_seed(tc.seed, step, info.rank), perturb_noise=pp.noise)
                if guard.ok(loss):
                    with timer.phase("backward"):
                        ae.backward(loss)
                    with timer.phase("optimizer"):
                        set_lr(ae_opt, lr)
                        ae.step()
                        ema.update(tokenizer)
                    if tracker is not None:
                        with timer.phase("codebook"):
                            tracker.observe(indices)
                            if cb.restart_dead:
                                restart = tracker.restart(step_seed(tc.seed, step, 0, stream="restart"), ae_opt)
                                if restart is not None:      # the EMA's copy restarts too: a blend is neither
                                    shadow = ema.shadow["quantize.embedding.weight"]
                                    shadow[restart.rows.to(shadow.device)] = restart.values.to(shadow)
                                    restart_prints = synchronised_fingerprints(tokenizer.quantize.embedding.weight)
                    if gan_on:
                        with timer.phase("disc"), autocast(device, precision):
                            d_loss, d_logs = loss_fn.discriminator_loss(images, recon, step=step,
                                                                        discriminator=de)
                            logs.update(d_logs)
                        if guard.ok(d_loss):
                            with timer.phase("disc"):
                                de.backward(d_loss)
                                set_lr(de_opt, disc_lr)
                                de.step()
                    if usage is not None:
                        usage.add(indices)
                    for k, v in logs.items():
                        sums[k] = sums.get(k, 0.0) + v.detach().float()
                    sums_n += 1
                timer.step_done()
                step += 1
                interval_images += images.shape[0] * info.world_size
                bar.update(1)

                if step % tc.log_interval == 0 or step == stop_step:
                    row = {"step": step, "epoch": epoch, "lr": lr, "disc_lr": disc_lr if gan_on else 0.0,
                           **({"perturb_noise": pp.noise} if continuous else
                              {"perturb_rate": pp.rate, "perturb_topk": pp.topk}),
                           "perturbed_per_rank": n_perturbed, "nan_skipped": guard.skipped}
                    row.update({k: float(v) / max(1, sums_n) for k, v in sums.items()})
                    if usage is not None:
                        row.update(usage.summary(device))
                    if tracker is not None:
                        row.update({"codebook/dead": tracker.dead_count(), "codebook/restarted": tracker.restarted})
                        if restart_prints is not None:
                            row["codebook/restart_fingerprints"], restart_prints = restart_prints, None
                    row.update(timer.summary())
                    elapsed = time.perf_counter() - interval_t0
                    row["img_per_s"] = interval_images / elapsed if elapsed > 0 else 0.0
                    jsonl.write(row)
                    bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", img_s=f"{row['img_per_s']:.1f}")
                    sums, sums_n = {}, 0
                    interval_t0, interval_images = time.perf_counter(), 0
                if info.is_main and tc.sample_interval and step % tc.sample_interval == 0:
                    write_samples(run_dir / "samples" / f"step-{step:08d}.png", tokenizer, samples, cfg, epoch,
                                  precision)
                if step % tc.ckpt_interval == 0 and guard.in_row == 0:   # never checkpoint inside a bad streak
                    save(step)
                    last_saved = step
    except NonFiniteLossError as e:
        jsonl.event(step, f"stopped: {e}", nan_skipped=guard.skipped)
        jsonl.close()
        raise
    finally:
        bar.close()

    if last_saved != step and guard.in_row == 0:
        save(step)
    export = run_dir / "tokenizer.pt"
    content_hash = None
    if info.is_main:
        # The EMA weights replace everything, so no DINOv2 init is read (load_tokenizer rebuilds it the same way).
        exported = build_tokenizer(dataclasses.replace(cfg.tokenizer, dinov2_weights=None))
        ema.copy_to(exported)
        if continuous and exported.config.scaling_factor is None:
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
        write_samples(run_dir / "samples" / "final.png", exported, samples, cfg,
                      max(0, step - 1) // steps_per_epoch, precision)
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
