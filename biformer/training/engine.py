"""The training and evaluation loops, single process or DistributedDataParallel under torchrun.

`train` strings named steps together: `setup` (check the options, data and an earlier run before
anything is written; build the loaders, the model and its `Optimization`; restore a resumed run),
then per epoch `run_epoch` (`train_one_epoch`, `evaluate`) and `commit_epoch`, and at the end
`report`. `Callbacks` let a caller observe the run (tests record shards or crash it on purpose).

Exact resume: every epoch re-seeds all random generators from (seed, epoch, rank) and the
sampler shuffles by (seed, epoch), so the random state at the start of an epoch is a function
of the epoch alone; the state saved at the end of each epoch (weights, optimizer, scheduler,
grad scaler, EMA, BatchNorm statistics) holds everything else. So epoch e runs the same whether
or not the process was restarted before it.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3, distribute_bn
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ..checkpoints.loading import CheckpointReport
from ..checkpoints.weights import cpu_state_dict, save_weights
from ..config import TrainConfig, flag
from ..errors import CheckpointError, UserError
from ..files import output_folder, remove_stale_temporaries
from ..runtime import (
    Dist,
    all_reduce_sum,
    autocast,
    distributed_model,
    init_distributed,
    resolve_amp,
    seed_everything,
)
from ..tasks.base import Objective, Task, UnreadableImages, val_loader
from ..tasks.registry import task_for_model
from . import run_folder


class Callbacks:
    """Hooks into a training run, called on every rank; they do nothing unless a subclass overrides them."""

    def on_epoch_start(self, epoch: int, loaders: Loaders) -> None:
        """Epoch `epoch` (from 1) begins; `loaders.epoch_indices()` lists the samples this rank trains on."""

    def on_step(self, global_step: int) -> None:
        """Training step `global_step` (counted from 0 over all epochs) is about to run."""

    def on_train_end(self, model: nn.Module, env: Dist) -> None:
        """The last epoch is committed; `model` is this rank's model (not the DDP wrapper)."""


# ---------------------------------------------------------------------------------------------
# the parts of a run
# ---------------------------------------------------------------------------------------------

@dataclass
class Loaders:
    sampler: DistributedSampler
    train: DataLoader
    val: DataLoader

    def epoch_indices(self) -> list[int]:
        """The samples this rank trains on in the sampler's current epoch, in order."""
        return list(iter(self.sampler))[: len(self.train) * self.train.batch_size]


def build_loaders(splits, config: TrainConfig, env: Dist, collate) -> Loaders:
    """Training batches from a disjoint shard per rank, reshuffled each epoch; the validation shards."""
    if len(splits.train) < config.batch_size * env.world:
        raise UserError(f"--batch-size {config.batch_size} x {env.world} process(es) exceeds the "
                        f"{len(splits.train)} training images")
    sampler = DistributedSampler(splits.train, num_replicas=env.world, rank=env.rank, shuffle=True,
                                 seed=config.seed, drop_last=True)  # drop_last: shards stay disjoint
    train_loader = DataLoader(splits.train, batch_size=config.batch_size, sampler=sampler,
                              num_workers=config.workers, drop_last=True, collate_fn=collate)
    return Loaders(sampler, train_loader, val_loader(splits.val, config.batch_size, config.workers, env, collate))


def build_model(config: TrainConfig, env: Dist, num_classes: int, task: Task) -> nn.Module:
    """The task's model, with --pretrained's weights where given, on the device."""
    seed_everything(config.seed)  # the initial weights
    try:
        model = task.build_model(config, num_classes)
    except CheckpointError as error:
        if config.pretrained is None:
            raise
        raise CheckpointError(f"--pretrained {config.pretrained!r}: {error}") from error
    model.to(env.device)
    if config.sync_bn and env.world > 1:
        if env.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif env.main:  # SyncBatchNorm has no CPU kernel; BatchNorm statistics are averaged after each epoch
            print("note: --sync-bn is ignored on CPU", file=sys.stderr)
    return model


def pretrained_report(model: nn.Module) -> CheckpointReport | None:
    """What the model (or its backbone) took from --pretrained, if anything: the tasks leave the report on the
    module that loaded the file."""
    return next((module.checkpoint_report for module in model.modules()
                 if getattr(module, "checkpoint_report", None) is not None), None)


@dataclass
class Optimization:
    """What an optimizer step updates besides the weights: optimizer, schedule, fp16 grad scaler, EMA."""

    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None
    zero_grad_in_place: bool  # under DDP the gradients are its buckets (see runtime.distributed_model)

    def step(self, loss: torch.Tensor, model: nn.Module, global_step: int, clip_grad: float | None) -> None:
        """Backward, then update the weights (gradients unscaled and clipped first), learning rate and EMA."""
        self.optimizer.zero_grad(set_to_none=not self.zero_grad_in_place)
        self.scaler.scale(loss).backward()
        if clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step_update(global_step + 1)
        if self.ema is not None:
            self.ema.update(model, step=global_step + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


def build_optimization(model: nn.Module, config: TrainConfig, steps_per_epoch: int, amp: str,
                       env: Dist) -> Optimization:
    """timm's optimizer, a per-step cosine schedule after a linear warm-up, and the EMA with --model-ema."""
    optimizer = create_optimizer_v2(model, opt=config.opt, lr=config.lr, weight_decay=config.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=config.epochs, warmup_epochs=config.warmup_epochs,
        warmup_lr=config.lr * 0.01, min_lr=config.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )
    return Optimization(
        optimizer, scheduler, torch.amp.GradScaler(env.device.type, enabled=amp == "fp16"),
        ModelEmaV3(model, decay=config.ema_decay) if config.model_ema else None, zero_grad_in_place=env.world > 1,
    )


@dataclass
class Progress:
    """The committed part of a run: the last epoch done, a metrics row per epoch, the best epoch."""

    metric: str  # the metrics-row key that picks the best epoch
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)

    def add(self, row: dict[str, Any]) -> None:
        """Append an epoch's row; it becomes the best if its metric beats the best so far. A NaN metric (a
        validation split with nothing to score) beats nothing, but the first epoch is the best until one does,
        so every run has a best epoch."""
        self.epoch = row["epoch"]
        self.history.append(row)
        value, best = row[self.metric], self.best.get(self.metric)
        if not self.best or (not math.isnan(value) and (math.isnan(best) or value > best)):
            self.best = {self.metric: value, "epoch": row["epoch"]}


@dataclass
class Run:
    """Everything an epoch uses, built once by `setup`."""

    config: TrainConfig
    env: Dist
    amp: str
    task: Task
    splits: Any
    loaders: Loaders
    model: nn.Module  # evaluated, saved and averaged into the EMA
    step_model: nn.Module  # what a training step calls: `model`, wrapped in DDP under torchrun
    optimization: Optimization
    objective: Objective
    callbacks: Callbacks
    pretrained: CheckpointReport | None  # what --pretrained gave the model
    unreadable: UnreadableImages = field(default_factory=UnreadableImages)


# ---------------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------------

def train(config: TrainConfig, callbacks: Callbacks | None = None, *, alone: bool = False) -> dict[str, Any]:
    """Train as `config` says (resuming a run with --resume); the last epoch's metrics row ({} if none).

    alone: train in this process only, also under torchrun (whose ranks then train runs of their own).
    """
    env = init_distributed(config.device, join=not alone)
    try:
        run, progress = setup(config, env, callbacks or Callbacks())
        writer = _tensorboard(config.output) if env.main and config.tensorboard else None
        train_start = time.perf_counter()
        for epoch in range(progress.epoch + 1, config.epochs + 1):
            progress.add(run_epoch(run, epoch))
            if env.main:
                commit_epoch(run, progress)
                _log_epoch(progress.history[-1], config.epochs, writer)
        if writer is not None:
            writer.close()
        run.callbacks.on_train_end(run.model, env)
        report(run, progress, time.perf_counter() - train_start)
        return progress.history[-1] if progress.history else {}
    finally:
        if env.world > 1:
            dist.destroy_process_group()


def setup(config: TrainConfig, env: Dist, callbacks: Callbacks) -> tuple[Run, Progress]:
    """Check the options, the data and an earlier run before --output is created, then build the run."""
    amp = resolve_amp(config.amp, env.device)
    task = task_for_model(config.model)
    task.check_config(config)
    state = load_run(config, env)
    splits = task.build_datasets(config.data, config.img_size, auto_augment=config.aa)
    loaders = build_loaders(splits, config, env, task.collate)
    model = build_model(config, env, len(splits.classes), task)  # before --output exists: --pretrained may not fit
    pretrained = pretrained_report(model)
    if env.main:
        output_folder(config.output, "--output")
        remove_stale_temporaries(config.output)  # left by a process killed while it saved
        if pretrained is not None:
            print(f"--pretrained: {pretrained}", flush=True)
    optimization = build_optimization(model, config, len(loaders.train), amp, env)
    progress = restore(state, model, optimization, config, env, task.metric)
    if env.main:
        run_folder.write_metrics(config.output, progress.history)  # drops rows of an epoch that was not committed
    run = Run(config, env, amp, task, splits, loaders, model, distributed_model(model, env), optimization,
              task.build_objective(config, len(splits.classes), model), callbacks, pretrained)
    return run, progress


def run_options(config: TrainConfig, env: Dist) -> dict[str, Any]:
    """What shapes the training trajectory: saved with each epoch, compared on --resume."""
    return {**config.run_options(), "world_size": env.world}


def load_run(config: TrainConfig, env: Dist) -> dict[str, Any] | None:
    """The last committed state in --output (None if there is none), checked to be resumable as configured."""
    state = run_folder.load_state(config.output) if env.main else None
    if env.world > 1:  # only rank 0 need see the output folder (other machines may not share it)
        shared = [state]
        dist.broadcast_object_list(shared, src=0)
        state = shared[0]
    if state is None:
        return None
    if not config.resume:
        raise UserError(f"--output {str(config.output)!r} already holds a training run (epoch {state['epoch']}); "
                        "pass --resume to continue it, or choose another --output")
    saved, current = state["config"], run_options(config, env)
    defaults = {spec.name: spec.default for spec in fields(TrainConfig)}  # for options newer than the run
    changed = [f"{flag(k) if k != 'world_size' else 'number of processes'} {saved.get(k, defaults.get(k))!r} -> "
               f"{current[k]!r}" for k in current if saved.get(k, defaults.get(k)) != current[k]]
    if changed:
        raise UserError(f"--resume: the run in {str(config.output)!r} was started with other settings "
                        f"({'; '.join(changed)}); resume with the original settings, or train into another --output")
    return state


def restore(state: dict[str, Any] | None, model: nn.Module, optimization: Optimization, config: TrainConfig,
            env: Dist, metric: str) -> Progress:
    """Load a resumed run's weights and optimization state; its progress (none for a new run)."""
    if state is None:
        if config.resume and env.main:
            print(f"no checkpoint in {config.output} to resume from; starting at epoch 1")
        return Progress(metric)
    model.load_state_dict(state["model"])
    optimization.load_state_dict(state)
    progress = Progress(metric, state["epoch"], state["history"], state["best"])
    if env.main:
        print(f"resumed from {config.output / run_folder.STATE}: " + (
            f"continuing at epoch {progress.epoch + 1}" if progress.epoch < config.epochs
            else f"all {config.epochs} epochs were already done"))
    return progress


def run_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """Train one epoch and validate: the epoch's metrics row."""
    env, task = run.env, run.task
    seed_everything(run.config.seed + 1_000_003 * epoch + 7919 * env.rank)
    run.loaders.sampler.set_epoch(epoch)
    run.callbacks.on_epoch_start(epoch, run.loaders)
    epoch_start = time.perf_counter()
    loss_sum, hits, counted, seen = train_one_epoch(run, epoch)
    train_time = time.perf_counter() - epoch_start
    if env.world > 1:  # ranks saw different batches: average BatchNorm statistics so all ranks hold one model
        distribute_bn(run.model, env.world, reduce=True)
    row = {"epoch": epoch, "train_loss": loss_sum / seen,
           **_val_columns(task, task.evaluate(run.model, run.loaders.val, env, run.amp, unreadable=run.unreadable)),
           "lr": run.optimization.optimizer.param_groups[0]["lr"]}
    if run.objective.mixup is None and task.train_accuracy is not None:
        row[task.train_accuracy] = 100 * hits / counted
    if run.optimization.ema is not None:
        ema_val = task.evaluate(run.optimization.ema.module, run.loaders.val, env, run.amp, desc="val (ema)")
        row.update({f"ema_{key}": value for key, value in _val_columns(task, ema_val).items()})
    row.update(epoch_time_s=time.perf_counter() - epoch_start, train_images_per_s=seen / train_time)
    return row


def _val_columns(task: Task, result: dict[str, Any]) -> dict[str, Any]:
    return {f"val_{key}": result[key] for key in ("loss", *task.metric_columns()) if key in result}


def train_one_epoch(run: Run, epoch: int) -> list[float]:
    """One pass over this rank's shard: [loss sum, accuracy hits, accuracy count, images], summed over all ranks."""
    env, loader, objective, task = run.env, run.loaders.train, run.objective, run.task
    run.step_model.train()
    start = time.perf_counter()
    sums = [0.0, 0.0, 0.0, 0.0]
    bar = tqdm(loader, desc=f"epoch {epoch}/{run.config.epochs}", leave=False, disable=None if env.main else True,
               file=sys.stdout)
    for step, (images, targets, problems) in enumerate(bar):
        global_step = (epoch - 1) * len(loader) + step
        run.callbacks.on_step(global_step)
        run.unreadable.add(problems)
        if images is not None:
            images, targets, hard_targets = task.prepare(images.to(env.device), targets.to(env.device), objective)
        if images is None or len(images) == 0:
            # every rank must take every step together under DDP, so only a lone process can skip one
            if env.world > 1:
                raise UserError(f"no image of a training batch could be read (epoch {epoch}, step {step})")
            continue
        with autocast(env.device, run.amp):
            outputs = task.forward(run.step_model, images, targets)
            loss = task.loss(outputs, targets, objective)
        if not math.isfinite(loss.item()):
            raise UserError(f"the loss is {loss.item()} at epoch {epoch} step {step}: training diverged; "
                            "lower --lr or set --clip-grad, then --resume")
        run.optimization.step(loss, run.model, global_step, run.config.clip_grad)
        hits, counted = task.hits(outputs, hard_targets)
        for index, value in enumerate((loss.item() * len(images), hits, counted, len(images))):
            sums[index] += value
        accuracy = {"acc": f"{100 * sums[1] / max(sums[2], 1):.1f}%"} if task.train_accuracy else {}
        bar.set_postfix(loss=f"{sums[0] / sums[3]:.3f}", **accuracy,
                        img_s=f"{sums[3] * env.world / (time.perf_counter() - start):.0f}")
    return all_reduce_sum(sums, env)


def commit_epoch(run: Run, progress: Progress) -> None:
    """Write the epoch's weights, then its state file (the commit point, see checkpoint), then the metrics."""
    config, model, ema, metric = run.config, run.model, run.optimization.ema, run.task.metric
    row = progress.history[-1]
    splits = run.splits  # what eval and predict need to rebuild the model and its inputs:
    metadata = {"model": config.model, "task": run.task.name, "model_kwargs": config.model_arguments(),
                "classes": splits.classes,
                "img_size": config.img_size,
                "mean": list(splits.mean), "std": list(splits.std), **run.task.metadata(splits),
                **({"pretrained": run.pretrained.as_metadata()} if run.pretrained is not None else {}),
                "epoch": row["epoch"], metric: row[metric]}
    save_weights(config.output / run_folder.WEIGHTS, model, metadata)
    if progress.best["epoch"] == row["epoch"]:
        save_weights(config.output / run_folder.BEST, model, metadata)
    if ema is not None:
        save_weights(config.output / run_folder.EMA_WEIGHTS, ema.module, {**metadata, metric: row[f"ema_{metric}"]})
    run_folder.save_state(config.output / run_folder.STATE, {
        "epoch": row["epoch"], "model": cpu_state_dict(model), **run.optimization.state_dict(),
        "history": progress.history, "best": progress.best,
        "config": run_options(config, run.env),  # with the epoch, the seed determines every random generator's state
    })
    run_folder.write_metrics(config.output, progress.history)


def report(run: Run, progress: Progress, wall_time_s: float) -> None:
    """The final summary, and how many unreadable images were skipped."""
    skipped = run.unreadable.count(run.env)  # on every rank: it gathers from all of them
    if not run.env.main:
        return
    if progress.history:
        minutes, seconds = divmod(wall_time_s, 60)
        print(f"{run.task.summary(progress.history[-1], progress.best, run.splits.classes)}\n"
              f"training wall time {int(minutes)}m{seconds:04.1f}s; checkpoints in {run.config.output}", flush=True)
    if skipped:
        print(f"{skipped} unreadable image(s) were skipped", file=sys.stderr)


def _log_epoch(row: dict[str, Any], epochs: int, writer) -> None:
    scalars = {key: value for key, value in row.items() if isinstance(value, (int, float))}
    if writer is not None:
        for key, value in scalars.items():
            writer.add_scalar(key, value, row["epoch"])
    percents = [key for key in scalars if key.startswith(("val_", "ema_val_")) and not key.endswith("_loss")]
    text = (f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  "
            + (f"val_loss {row['val_loss']:.4f}  " if "val_loss" in row else "")
            + "  ".join(f"{key} {row[key]:.2f}%" for key in percents))
    tqdm.write(text + f"  ({row['epoch_time_s']:.1f} s, {row['train_images_per_s']:.0f} img/s)", file=sys.stdout)


def _tensorboard(output: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(output / "tensorboard"))
