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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3, distribute_bn
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from ..checkpoints.files import cpu_state_dict, save_weights
from ..errors import UserError
from . import checkpoint as ckpt
from .config import TrainConfig, flag
from .data import DataSplits, build_datasets, collate_readable
from .runtime import (
    Dist,
    all_reduce_sum,
    autocast,
    distributed_model,
    init_distributed,
    resolve_amp,
    seed_everything,
)


class Callbacks:
    """Hooks into a training run, called on every rank; they do nothing unless a subclass overrides them."""

    def on_epoch_start(self, epoch: int, loaders: Loaders) -> None:
        """Epoch `epoch` (from 1) begins; `loaders.epoch_indices()` lists the samples this rank trains on."""

    def on_step(self, global_step: int) -> None:
        """Training step `global_step` (counted from 0 over all epochs) is about to run."""

    def on_train_end(self, model: nn.Module, env: Dist) -> None:
        """The last epoch is committed; `model` is this rank's model (not the DDP wrapper)."""


class UnreadableImages:
    """Reports each unreadable image once, with its path, and counts them over all ranks."""

    def __init__(self) -> None:
        self.problems: set[str] = set()

    def add(self, problems: list[str]) -> None:
        for problem in problems:
            if problem not in self.problems:
                self.problems.add(problem)
                tqdm.write(f"warning: skipping unreadable image {problem}", file=sys.stderr)

    def count(self, env: Dist) -> int:
        if env.world == 1:
            return len(self.problems)
        gathered: list[set[str] | None] = [None] * env.world
        dist.all_gather_object(gathered, self.problems)
        return len(set().union(*gathered))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, env: Dist, amp: str = "none", desc: str = "val",
             unreadable: UnreadableImages | None = None) -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) over the loader's shards on all ranks."""
    model.eval()
    totals = [0.0, 0.0, 0.0, 0.0]  # loss sum, top-1 hits, top-5 hits, count
    for images, targets, problems in tqdm(loader, desc=desc, leave=False, disable=None if env.main else True,
                                          file=sys.stdout):
        if unreadable is not None:
            unreadable.add(problems)
        if images is None:
            continue
        images, targets = images.to(env.device), targets.to(env.device)
        with autocast(env.device, amp):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == targets[:, None]
        totals[0] += F.cross_entropy(logits, targets, reduction="sum").item()
        totals[1] += hits[:, 0].sum().item()
        totals[2] += hits.any(1).sum().item()
        totals[3] += len(targets)
    loss, top1, top5, count = all_reduce_sum(totals, env)
    if count == 0:
        raise UserError("no validation image could be read")
    return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "count": int(count)}


def val_loader(dataset, batch_size: int, workers: int, env: Dist) -> DataLoader:
    shard = Subset(dataset, range(env.rank, len(dataset), env.world))  # disjoint, nothing repeated
    return DataLoader(shard, batch_size=batch_size, num_workers=workers, shuffle=False, collate_fn=collate_readable)


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


def build_loaders(splits: DataSplits, config: TrainConfig, env: Dist) -> Loaders:
    """Training batches from a disjoint shard per rank, reshuffled each epoch; the validation shards."""
    if len(splits.train) < config.batch_size * env.world:
        raise UserError(f"--batch-size {config.batch_size} x {env.world} process(es) exceeds the "
                        f"{len(splits.train)} training images")
    sampler = DistributedSampler(splits.train, num_replicas=env.world, rank=env.rank, shuffle=True,
                                 seed=config.seed, drop_last=True)  # drop_last: shards stay disjoint
    train_loader = DataLoader(splits.train, batch_size=config.batch_size, sampler=sampler,
                              num_workers=config.workers, drop_last=True, collate_fn=collate_readable)
    return Loaders(sampler, train_loader, val_loader(splits.val, config.batch_size, config.workers, env))


def build_model(config: TrainConfig, env: Dist, num_classes: int) -> nn.Module:
    seed_everything(config.seed)  # the initial weights
    model = timm.create_model(config.model, num_classes=num_classes, drop_path_rate=config.drop_path)
    model.to(env.device)
    if config.sync_bn and env.world > 1:
        if env.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif env.main:  # SyncBatchNorm has no CPU kernel; BatchNorm statistics are averaged after each epoch
            print("note: --sync-bn is ignored on CPU", file=sys.stderr)
    return model


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
class Objective:
    """The classification loss, on mixed-up batches with --mixup/--cutmix."""

    criterion: nn.Module
    mixup: Mixup | None


def build_objective(config: TrainConfig, num_classes: int) -> Objective:
    if config.mixup > 0 or config.cutmix > 0:
        return Objective(SoftTargetCrossEntropy(), Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                                                         label_smoothing=config.smoothing, num_classes=num_classes))
    if config.smoothing > 0:
        return Objective(LabelSmoothingCrossEntropy(config.smoothing), None)
    return Objective(nn.CrossEntropyLoss(), None)


@dataclass
class Progress:
    """The committed part of a run: the last epoch done, a metrics row per epoch, the best epoch."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"val_top1": -1.0, "epoch": 0})

    def add(self, row: dict[str, Any]) -> None:
        self.epoch = row["epoch"]
        self.history.append(row)
        if row["val_top1"] > self.best["val_top1"]:
            self.best = {"val_top1": row["val_top1"], "epoch": row["epoch"]}


@dataclass
class Run:
    """Everything an epoch uses, built once by `setup`."""

    config: TrainConfig
    env: Dist
    amp: str
    splits: DataSplits
    loaders: Loaders
    model: nn.Module  # evaluated, saved and averaged into the EMA
    step_model: nn.Module  # what a training step calls: `model`, wrapped in DDP under torchrun
    optimization: Optimization
    objective: Objective
    callbacks: Callbacks
    unreadable: UnreadableImages = field(default_factory=UnreadableImages)


# ---------------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------------

def train(config: TrainConfig, callbacks: Callbacks | None = None) -> dict[str, Any]:
    """Train as `config` says (resuming a run with --resume); the last epoch's metrics row ({} if none)."""
    env = init_distributed(config.device)
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
    if config.model not in timm.list_models(config.model):
        raise UserError(f"--model {config.model!r} is not a registered timm model "
                        "(try biformer_nano, biformer_tiny, ...)")
    state = load_run(config, env)
    splits = build_datasets(config.data, config.img_size, auto_augment=config.aa)
    loaders = build_loaders(splits, config, env)
    if env.main:
        ckpt.check_writable(config.output)
    model = build_model(config, env, len(splits.classes))
    optimization = build_optimization(model, config, len(loaders.train), amp, env)
    progress = restore(state, model, optimization, config, env)
    if env.main:
        ckpt.write_metrics(config.output, progress.history)  # drops rows of an epoch that was not committed
    run = Run(config, env, amp, splits, loaders, model, distributed_model(model, env), optimization,
              build_objective(config, len(splits.classes)), callbacks)
    return run, progress


def run_options(config: TrainConfig, env: Dist) -> dict[str, Any]:
    """What shapes the training trajectory: saved with each epoch, compared on --resume."""
    return {**config.run_options(), "world_size": env.world}


def load_run(config: TrainConfig, env: Dist) -> dict[str, Any] | None:
    """The last committed state in --output (None if there is none), checked to be resumable as configured."""
    state = ckpt.load_state(config.output) if env.main else None
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
    changed = [f"{flag(k) if k != 'world_size' else 'number of processes'} {saved.get(k)!r} -> {current[k]!r}"
               for k in current if saved.get(k) != current[k]]
    if changed:
        raise UserError(f"--resume: the run in {str(config.output)!r} was started with other settings "
                        f"({'; '.join(changed)}); resume with the original settings, or train into another --output")
    return state


def restore(state: dict[str, Any] | None, model: nn.Module, optimization: Optimization, config: TrainConfig,
            env: Dist) -> Progress:
    """Load a resumed run's weights and optimization state; its progress (none for a new run)."""
    if state is None:
        if config.resume and env.main:
            print(f"no checkpoint in {config.output} to resume from; starting at epoch 1")
        return Progress()
    model.load_state_dict(state["model"])
    optimization.load_state_dict(state)
    progress = Progress(state["epoch"], state["history"], state["best"])
    if env.main:
        print(f"resumed from {config.output / ckpt.STATE}: " + (
            f"continuing at epoch {progress.epoch + 1}" if progress.epoch < config.epochs
            else f"all {config.epochs} epochs were already done"))
    return progress


def run_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """Train one epoch and validate: the epoch's metrics row."""
    env = run.env
    seed_everything(run.config.seed + 1_000_003 * epoch + 7919 * env.rank)
    run.loaders.sampler.set_epoch(epoch)
    run.callbacks.on_epoch_start(epoch, run.loaders)
    epoch_start = time.perf_counter()
    loss_sum, hits, seen = train_one_epoch(run, epoch)
    train_time = time.perf_counter() - epoch_start
    if env.world > 1:  # ranks saw different batches: average BatchNorm statistics so all ranks hold one model
        distribute_bn(run.model, env.world, reduce=True)
    val = evaluate(run.model, run.loaders.val, env, run.amp, unreadable=run.unreadable)
    row = {"epoch": epoch, "train_loss": loss_sum / seen, "val_loss": val["loss"], "val_top1": val["top1"],
           "val_top5": val["top5"], "lr": run.optimization.optimizer.param_groups[0]["lr"]}
    if run.objective.mixup is None:
        row["train_top1"] = 100 * hits / seen
    if run.optimization.ema is not None:
        ema_val = evaluate(run.optimization.ema.module, run.loaders.val, env, run.amp, desc="val (ema)")
        row.update(ema_val_loss=ema_val["loss"], ema_val_top1=ema_val["top1"], ema_val_top5=ema_val["top5"])
    row.update(epoch_time_s=time.perf_counter() - epoch_start, train_images_per_s=seen / train_time)
    return row


def train_one_epoch(run: Run, epoch: int) -> list[float]:
    """One pass over this rank's shard: [loss sum, top-1 hits, images], summed over all ranks."""
    env, loader, objective = run.env, run.loaders.train, run.objective
    run.step_model.train()
    start = time.perf_counter()
    sums = [0.0, 0.0, 0.0]
    bar = tqdm(loader, desc=f"epoch {epoch}/{run.config.epochs}", leave=False, disable=None if env.main else True,
               file=sys.stdout)
    for step, (images, targets, problems) in enumerate(bar):
        global_step = (epoch - 1) * len(loader) + step
        run.callbacks.on_step(global_step)
        run.unreadable.add(problems)
        if images is not None and objective.mixup is not None and len(images) % 2:  # mixup pairs images up
            images, targets = images[:-1], targets[:-1]
        if images is None or len(images) == 0:
            # every rank must take every step together under DDP, so only a lone process can skip one
            if env.world > 1:
                raise UserError(f"no image of a training batch could be read (epoch {epoch}, step {step})")
            continue
        images, targets = images.to(env.device), targets.to(env.device)
        hard_targets = targets
        if objective.mixup is not None:
            images, targets = objective.mixup(images, targets)
        with autocast(env.device, run.amp):
            logits = run.step_model(images)
            loss = objective.criterion(logits.float(), targets)
        if not math.isfinite(loss.item()):
            raise UserError(f"the loss is {loss.item()} at epoch {epoch} step {step}: training diverged; "
                            "lower --lr or set --clip-grad, then --resume")
        run.optimization.step(loss, run.model, global_step, run.config.clip_grad)
        sums[0] += loss.item() * len(images)
        sums[1] += (logits.argmax(1) == hard_targets).sum().item()
        sums[2] += len(images)
        bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{100 * sums[1] / sums[2]:.1f}%",
                        img_s=f"{sums[2] * env.world / (time.perf_counter() - start):.0f}")
    return all_reduce_sum(sums, env)


def commit_epoch(run: Run, progress: Progress) -> None:
    """Write the epoch's weights, then its state file (the commit point, see checkpoint), then the metrics."""
    config, splits, model, ema = run.config, run.splits, run.model, run.optimization.ema
    row = progress.history[-1]
    metadata = {"model": config.model, "classes": splits.classes, "epoch": row["epoch"], "img_size": config.img_size,
                "mean": list(splits.mean), "std": list(splits.std), "crop_pct": splits.crop_pct,
                "val_top1": row["val_top1"]}  # what eval and predict need to rebuild the model and its inputs
    save_weights(config.output / ckpt.WEIGHTS, model, metadata)
    if progress.best["epoch"] == row["epoch"]:
        save_weights(config.output / ckpt.BEST, model, metadata)
    if ema is not None:
        save_weights(config.output / ckpt.EMA_WEIGHTS, ema.module, {**metadata, "val_top1": row["ema_val_top1"]})
    ckpt.save_state(config.output / ckpt.STATE, {
        "epoch": row["epoch"], "model": cpu_state_dict(model), **run.optimization.state_dict(),
        "history": progress.history, "best": progress.best,
        "config": run_options(config, run.env),  # with the epoch, the seed determines every random generator's state
    })
    ckpt.write_metrics(config.output, progress.history)


def report(run: Run, progress: Progress, wall_time_s: float) -> None:
    """The final line, and how many unreadable images were skipped."""
    skipped = run.unreadable.count(run.env)  # on every rank: it gathers from all of them
    if not run.env.main:
        return
    if progress.history:
        final, best = progress.history[-1], progress.best
        minutes, seconds = divmod(wall_time_s, 60)
        print(f"final validation top-1: {final['val_top1']:.2f}% (best {best['val_top1']:.2f}% at epoch "
              f"{best['epoch']}); training wall time {int(minutes)}m{seconds:04.1f}s; "
              f"checkpoints in {run.config.output}", flush=True)
    if skipped:
        print(f"{skipped} unreadable image(s) were skipped", file=sys.stderr)


def _log_epoch(row: dict[str, Any], epochs: int, writer) -> None:
    if writer is not None:
        for key, value in row.items():
            writer.add_scalar(key, value, row["epoch"])
    text = (f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
            f"val_top1 {row['val_top1']:.2f}%  val_top5 {row['val_top5']:.2f}%")
    if "ema_val_top1" in row:
        text += f"  ema_val_top1 {row['ema_val_top1']:.2f}%"
    tqdm.write(text + f"  ({row['epoch_time_s']:.1f} s, {row['train_images_per_s']:.0f} img/s)", file=sys.stdout)


def _tensorboard(output: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(output / "tensorboard"))
