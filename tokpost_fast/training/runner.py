"""The step loop of the training stages.

`StageLoop` is the policy every stage (main, gen, post) shares: checkpoints every `ckpt_interval` steps and once at
the end, never inside a streak of non-finite losses (so the newest checkpoint is always a good state, the one
--resume restarts from), and a "stopped" event with `nan_skipped` in log.jsonl when NonFiniteGuard gives up.

`AutoencoderLoop` is the whole loop of the two autoencoder stages (main trains the tokenizer, post the decoder):
per step the autoencoder engine (AutoencoderObjective) and, once the GAN is active, the discriminator engine, the
EMA, the NaN guard, per-phase timing; every `log_interval` steps one log.jsonl row with the mean of every loss
term; sample grids and checkpoints. A stage subclasses it with its data (`batches`), its forward inputs
(`forward`), and what it adds to the log row or does after an update.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import torch

from tokpost_fast.training.checkpoint import save_checkpoint
from tokpost_fast.training.engine import EMA, DistInfo, NonFiniteGuard, NonFiniteLossError, autocast, set_lr
from tokpost_fast.training.run_log import JsonlLog, StepTimer


class StageLoop:
    """Step counter, checkpoint policy and non-finite stop of a training stage. `state(step)` is the stage's own
    checkpoint state (rank 0's is saved); `engines` the DeepSpeed engines by name."""

    def __init__(self, info: DistInfo, jsonl: JsonlLog, guard: NonFiniteGuard, checkpoint_dir: Path,
                 engines: Mapping[str, object], state: Callable[[int], dict], ckpt_interval: int, keep: int,
                 step: int = 0, resumed: bool = False):
        self.info, self.jsonl, self.guard = info, jsonl, guard
        self.checkpoint_dir, self.engines, self.state = Path(checkpoint_dir), engines, state
        self.ckpt_interval, self.keep = ckpt_interval, keep
        self.step = step
        self.last_saved = step if resumed else -1

    def save(self) -> None:
        save_checkpoint(self.checkpoint_dir, self.step, self.engines, self.state(self.step), self.info,
                        keep=self.keep)
        self.last_saved = self.step

    def checkpoint_if_due(self, final: bool = False) -> None:
        """After a step: the periodic checkpoint (or, `final`, one of the last step), skipped inside a non-finite
        streak and when this step is saved already."""
        if (final or self.step % self.ckpt_interval == 0) and self.guard.in_row == 0 and self.last_saved != self.step:
            self.save()

    def finish(self) -> None:
        """After the last step: a checkpoint of it unless one exists or the run ends inside a non-finite streak."""
        self.checkpoint_if_due(final=True)

    @contextlib.contextmanager
    def stop_on_non_finite(self):
        """Logs the guard's stop as a "stopped" event (with nan_skipped) before the error leaves the stage."""
        try:
            yield
        except NonFiniteLossError as err:
            self.jsonl.event(self.step, f"stopped: {err}", nan_skipped=self.guard.skipped)
            self.jsonl.close()
            raise


class AutoencoderLoop(StageLoop):
    """The autoencoder + discriminator loop of main and post (see the module docstring). `schedule(step)` gives
    (lr, disc_lr) of a step; `bar` is the stage's progress bar."""

    def __init__(self, *, info: DistInfo, jsonl: JsonlLog, guard: NonFiniteGuard, checkpoint_dir: Path,
                 engines: Mapping[str, object], state: Callable[[int], dict], ckpt_interval: int, keep: int,
                 step: int, resumed: bool, precision: str, tokenizer: torch.nn.Module, loss_fn, ae, ae_opt, de,
                 de_opt, ema: EMA, timer: StepTimer, bar, schedule: Callable[[int], tuple[float, float]],
                 steps_per_epoch: int, stop_step: int, log_interval: int, sample_interval: Optional[int]):
        super().__init__(info, jsonl, guard, checkpoint_dir, engines, state, ckpt_interval, keep, step, resumed)
        self.device, self.precision = info.device, precision
        self.tokenizer, self.loss_fn, self.ema, self.timer, self.bar = tokenizer, loss_fn, ema, timer, bar
        self.ae, self.ae_opt, self.de, self.de_opt = ae, ae_opt, de, de_opt
        self.schedule, self.steps_per_epoch, self.stop_step = schedule, steps_per_epoch, stop_step
        self.log_interval, self.sample_interval = log_interval, sample_interval
        self.sums: dict[str, torch.Tensor] = {}
        self.sums_n = 0
        self.interval_t0, self.interval_images = time.perf_counter(), 0
        self.lrs = (0.0, 0.0)          # (lr, disc_lr) applied at the last step; disc_lr 0 before the GAN starts

    # --- what a stage provides ----------------------------------------------------------------------------------
    def batches(self, epoch: int, skip: int) -> Iterable:
        """The rest of an epoch's batches after the first `skip` (exact resume)."""
        raise NotImplementedError

    def forward(self, step: int, epoch: int, batch):
        """Runs inside the forward phase and autocast: seeds the step's draws, moves the batch to the device and
        calls self.ae. -> (real images [B, 3, S, S], loss, logs, detached reconstruction, code indices or None)."""
        raise NotImplementedError

    def after_update(self, step: int, indices: Optional[torch.Tensor]) -> None:
        """After the autoencoder's optimizer step and EMA update of a good step (codebook health in main)."""

    def row_head(self, epoch: int) -> dict:
        """Keys of the log row between the learning rates and nan_skipped (main: the perturbation)."""
        return {}

    def row_tail(self) -> dict:
        """Keys of the log row after the loss means (main: codebook usage)."""
        return {}

    def sample(self, step: int, epoch: int) -> None:
        """Rank 0, every sample_interval steps: write a sample grid."""

    # --- the loop -----------------------------------------------------------------------------------------------
    def train(self) -> None:
        self.ae.train()
        self.de.train()
        spe = self.steps_per_epoch
        try:
            with self.stop_on_non_finite():
                while self.step < self.stop_step:
                    epoch = self.step // spe
                    batches = iter(self.batches(epoch, self.step % spe))
                    while self.step < self.stop_step and self.step // spe == epoch:
                        with self.timer.phase("data"):
                            batch = next(batches, None)
                        if batch is None:
                            raise RuntimeError(f"the data loader of epoch {epoch} ended after {self.step % spe} "
                                               f"batches; it promised {spe} (len)")
                        self.train_step(epoch, batch)
                        self.step += 1
                        self.bar.update(1)
                        self.after_step(epoch)
        finally:
            self.bar.close()
        self.finish()

    def train_step(self, epoch: int, batch) -> None:
        step, timer, guard = self.step, self.timer, self.guard
        lr, disc_lr = self.schedule(step)
        gan_on = self.loss_fn.gan_active(step)
        with timer.phase("forward"), autocast(self.device, self.precision):
            images, loss, logs, recon, indices = self.forward(step, epoch, batch)
        if guard.ok(loss):
            with timer.phase("backward"):
                self.ae.backward(loss)
            with timer.phase("optimizer"):
                set_lr(self.ae_opt, lr)
                self.ae.step()
                self.ema.update(self.tokenizer)
            self.after_update(step, indices)
            if gan_on:
                with timer.phase("disc"), autocast(self.device, self.precision):
                    d_loss, d_logs = self.loss_fn.discriminator_loss(images, recon, step=step, discriminator=self.de)
                    logs.update(d_logs)
                if guard.ok(d_loss):
                    with timer.phase("disc"):
                        self.de.backward(d_loss)
                        set_lr(self.de_opt, disc_lr)
                        self.de.step()
            for k, v in logs.items():
                self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
            self.sums_n += 1
        timer.step_done()
        self.interval_images += images.shape[0] * self.info.world_size
        self.lrs = (lr, disc_lr if gan_on else 0.0)

    def after_step(self, epoch: int) -> None:
        step = self.step
        if step % self.log_interval == 0 or step == self.stop_step:
            self.write_row(epoch)
        if self.info.is_main and self.sample_interval and step % self.sample_interval == 0:
            self.sample(step, epoch)
        self.checkpoint_if_due()

    def write_row(self, epoch: int) -> None:
        lr, disc_lr = self.lrs
        row = {"step": self.step, "epoch": epoch, "lr": lr, "disc_lr": disc_lr, **self.row_head(epoch),
               "nan_skipped": self.guard.skipped}
        row.update({k: float(v) / max(1, self.sums_n) for k, v in self.sums.items()})
        row.update(self.row_tail())
        row.update(self.timer.summary())
        elapsed = time.perf_counter() - self.interval_t0
        row["img_per_s"] = self.interval_images / elapsed if elapsed > 0 else 0.0
        self.jsonl.write(row)
        self.bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", img_s=f"{row['img_per_s']:.1f}")
        self.sums, self.sums_n = {}, 0
        self.interval_t0, self.interval_images = time.perf_counter(), 0
