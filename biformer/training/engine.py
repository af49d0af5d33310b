"""The training and evaluation loops, single process or DistributedDataParallel under torchrun.

`train` strings named steps together: `setup` (check the options, data and an earlier run before
anything is written; build the data stream, the model and its `Optimization`; write config.json and
schedule.csv; restore a resumed run), then per round of steps up to the next validation (an epoch, or
--val-every steps of an --iters run) `run_round` (`train_steps`, `evaluate`) and `commit`, and at
the end `report`. `Callbacks` let a caller observe the run (tests record shards or crash it on purpose).

Exact resume: the samples of every step and their augmentation are functions of (seed, step)
(see `stream`), the model-side randomness of every micro-step is seeded by (seed, step, micro-step,
rank) and the lr by the step (see `schedule`); the state saved at each commit (weights, optimizer,
grad scaler, EMA, BatchNorm statistics) holds everything else. So step s runs the same whether or not
the process was restarted before it.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3, distribute_bn
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..checkpoints.loading import CheckpointReport, pretrained_normalization
from ..checkpoints.weights import cpu_state_dict, save_weights
from ..config import TrainConfig, flag, setting_changes
from ..errors import CheckpointError, UserError
from ..files import output_folder, remove_stale_temporaries
from ..optim.param_groups import ParameterGroup, parameter_groups
from ..optim.schedule import Schedule
from ..progress import Heartbeat
from ..recipes import ResolvedRun, resolve
from ..runtime import (
    DistEnv,
    all_reduce_sum,
    autocast,
    distributed_model,
    init_distributed,
    resolve_amp,
    seed_everything,
)
from ..tasks.base import Objective, Task, UnreadableImages, val_loader
from . import run_folder
from .stream import RoundBatches, SeededSamples, TrainStream


class Callbacks:
    """Hooks into a training run, called on every rank; they do nothing unless a subclass overrides them."""

    def on_epoch_start(self, epoch: int, indices: list[int]) -> None:
        """Data epoch `epoch` (from 1) begins; `indices` are the samples this rank trains on in it, in order."""

    def on_step(self, global_step: int) -> None:
        """Optimizer step `global_step` (counted from 0 over the whole run) is about to run."""

    def on_train_end(self, model: nn.Module, env: DistEnv) -> None:
        """The last step is committed; `model` is this rank's model (not the DDP wrapper)."""


# ---------------------------------------------------------------------------------------------
# the parts of a run
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """How long the run is and where it validates and saves: after every epoch, or every --val-every steps of
    an --iters run (and at its end)."""

    steps_per_epoch: int
    total_steps: int
    by_iters: bool
    val_every: int

    @classmethod
    def of(cls, config: TrainConfig, steps_per_epoch: int) -> Plan:
        if config.iters is not None:
            return cls(steps_per_epoch, config.iters, True, config.val_every or config.iters)
        return cls(steps_per_epoch, config.epochs * steps_per_epoch, False, steps_per_epoch)

    @property
    def unit(self) -> str:
        """The metrics rows' counter: "iter" (steps done) or "epoch" (epochs done)."""
        return "iter" if self.by_iters else "epoch"

    @property
    def length(self) -> int:
        """The run's length in its unit."""
        return self.count(self.total_steps)

    def count(self, step: int) -> int:
        """Steps done, in the run's unit."""
        return step if self.by_iters else step // self.steps_per_epoch

    def commits_after(self, step: int) -> list[int]:
        """The steps (counted as done) at which the run validates and saves, after `step`."""
        points = list(range(self.val_every, self.total_steps, self.val_every)) + [self.total_steps]
        return [point for point in points if point > step]


def build_model(config: TrainConfig, env: DistEnv, classes: Sequence[str], task: Task) -> nn.Module:
    """The task's model, with --pretrained's weights where given, on the device."""
    seed_everything(config.seed)  # the initial weights
    try:
        model = task.build_model(config, classes)
    except CheckpointError as error:
        if config.pretrained is None:
            raise
        raise CheckpointError(f"--pretrained {config.pretrained!r}: {error}") from error
    model.to(env.device)
    if config.sync_bn and env.distributed:
        if env.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif env.main:  # SyncBatchNorm has no CPU kernel; BatchNorm statistics are averaged at each validation
            print("note: --sync-bn is ignored on CPU", file=sys.stderr)
    return model


def pretrained_report(model: nn.Module) -> CheckpointReport | None:
    """What the model (or its backbone) took from --pretrained, if anything: the tasks leave the report on the
    module that loaded the file."""
    return next((module.checkpoint_report for module in model.modules()
                 if getattr(module, "checkpoint_report", None) is not None), None)


def peak_lr(config: TrainConfig, recipe_global_batch: int | None, global_batch: int) -> float:
    """--lr, scaled by the global batch over the recipe's with --scale-lr."""
    if not config.scale_lr:
        return config.lr
    if recipe_global_batch is None:
        raise UserError("--scale-lr scales --lr by the global batch over the recipe's: give --recipe, or leave "
                        "--scale-lr out")
    return config.lr * global_batch / recipe_global_batch


def build_schedule(config: TrainConfig, plan: Plan, lr: float) -> Schedule:
    """The lr of every step: milestones count in the run's unit, the warm-up in steps."""
    per_epoch = config.lr_per_epoch and not plan.by_iters
    in_steps = 1 if plan.by_iters else plan.steps_per_epoch
    milestones = tuple(m * in_steps // (plan.steps_per_epoch if per_epoch else 1) for m in config.milestones)
    warmup = config.warmup_iters if config.warmup_iters is not None else config.warmup_epochs * plan.steps_per_epoch
    return Schedule(config.sched, lr, plan.total_steps, plan.steps_per_epoch, per_epoch=per_epoch,
                    min_lr=config.min_lr, milestones=milestones, decay_rate=config.decay_rate,
                    power=config.poly_power, warmup_steps=warmup, warmup_rule=config.warmup_rule,
                    warmup_ratio=config.warmup_ratio)


@dataclass
class Optimization:
    """What an optimizer step updates besides the weights: optimizer (its parameter groups), schedule, fp16 grad
    scaler, EMA."""

    optimizer: torch.optim.Optimizer
    groups: list[ParameterGroup]
    schedule: Schedule
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None
    zero_grad_in_place: bool  # under DDP the gradients are its buckets (see runtime.distributed_model)

    def begin(self, step: int) -> None:
        """Clear the gradients and set the lr of `step`."""
        self.optimizer.zero_grad(set_to_none=not self.zero_grad_in_place)
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule(step)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def finish(self, model: nn.Module, step: int, clip_grad: float | None) -> None:
        """Update the weights (gradients unscaled and clipped first), then the EMA."""
        if clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(model, step=step + 1)

    def lrs(self) -> dict[str, float]:
        return {f"lr_group{i}": group["lr"] for i, group in enumerate(self.optimizer.param_groups)}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


def warmup_note(config: TrainConfig, schedule: Schedule) -> str | None:
    """A note for a warm-up longer than the run, whose lr never reaches --lr (None if it fits); UserError if the
    user typed that warm-up on the command line (a default's, a recipe's or a caller's such as `ablate`'s is only
    noted: a short trial run keeps its settings)."""
    if schedule.warmup_steps <= schedule.total_steps:
        return None
    name = "warmup_iters" if config.warmup_iters is not None else "warmup_epochs"
    reached = max(schedule(step) for step in range(schedule.total_steps))
    what = (f"the warm-up of {schedule.warmup_steps} steps ({flag(name)} {getattr(config, name)}) is longer than the "
            f"run ({schedule.total_steps} steps): the lr peaks at {reached:g}, not {schedule.lr:g}")
    if name in config.typed:
        raise UserError(f"{what}; shorten the warm-up or lengthen the run")
    return f"note: {what} (warm-up: {config.sources.get(name, 'default')})"


def build_optimization(model: nn.Module, config: TrainConfig, schedule: Schedule, amp: str,
                       env: DistEnv) -> Optimization:
    """timm's optimizer over the recipe's parameter groups, the schedule, and the EMA with --model-ema."""
    groups = parameter_groups(model, config.weight_decay, config.decay_rule)
    optimizer = create_optimizer_v2([group.as_optimizer_group() for group in groups], opt=config.opt,
                                    lr=schedule(0), weight_decay=config.weight_decay)
    return Optimization(
        optimizer, groups, schedule, torch.amp.GradScaler(env.device.type, enabled=amp == "fp16"),
        ModelEmaV3(model, decay=config.ema_decay) if config.model_ema else None, zero_grad_in_place=env.distributed,
    )


@dataclass
class Progress:
    """The committed part of a run: the steps done, a metrics row per validation, the best row."""

    metric: str  # the metrics-row key that picks the best row
    unit: str  # the rows' counter ("epoch" or "iter")
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)

    def add(self, row: dict[str, Any], step: int) -> None:
        """Append the row of the validation after `step` steps; it becomes the best if its metric beats the best
        so far. A NaN metric (a validation split with nothing to score) beats nothing, but the first row is the
        best until one does, so every run has a best row."""
        self.step = step
        self.history.append(row)
        value, best = row[self.metric], self.best.get(self.metric)
        if not self.best or (not math.isnan(value) and (math.isnan(best) or value > best)):
            self.best = {self.metric: value, self.unit: row[self.unit], "at": f"{self.unit} {row[self.unit]}"}


@dataclass
class Run:
    """Everything a step uses, built once by `setup`."""

    config: TrainConfig
    env: DistEnv
    amp: str
    task: Task
    splits: Any
    train_set: Dataset  # what the steps train on: the training split, or the task's pairing of it (token labels)
    stream: TrainStream
    plan: Plan
    val_loader: DataLoader
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

def train(config: TrainConfig | ResolvedRun, callbacks: Callbacks | None = None, *, alone: bool = False
          ) -> dict[str, Any]:
    """Train as `config` says (resuming a run with --resume); the last metrics row ({} if none, or a dry run).

    config: the options, or what `biformer.recipes.resolve` made of them; alone: train in this process only, also
    under torchrun (whose ranks then train runs of their own).
    """
    resolved = config if isinstance(config, ResolvedRun) else resolve(config)
    config = resolved.config
    env = init_distributed(config.device, join=not alone)
    try:
        run, progress = setup(resolved, env, callbacks or Callbacks())
        if config.dry_run:
            if env.main:
                print(f"dry run: wrote {config.output / run_folder.CONFIG} and {config.output / run_folder.SCHEDULE}")
            return {}
        writer = _tensorboard(config.output) if env.main and config.tensorboard else None
        train_start = time.perf_counter()
        for end in run.plan.commits_after(progress.step):
            progress.add(run_round(run, progress.step, end), end)
            if env.main:
                commit(run, progress)
                _log_row(progress.history[-1], run.plan, writer, run.task.input_noun)
        if writer is not None:
            writer.close()
        run.callbacks.on_train_end(run.model, env)
        report(run, progress, time.perf_counter() - train_start)
        return progress.history[-1] if progress.history else {}
    finally:
        if env.distributed:
            dist.destroy_process_group()


def setup(resolved: ResolvedRun, env: DistEnv, callbacks: Callbacks) -> tuple[Run, Progress]:
    """Check the data and an earlier run before --output is created, then build the run."""
    config, task = resolved.config, resolved.task
    amp = resolve_amp(config.amp, env.device)
    state = load_run(config, env)
    normalization, normalized_by = input_normalization(config, task)
    splits = task.training_splits(config, normalization)
    stream = TrainStream(len(splits.train), config.batch_size, config.accum_steps, env.world, env.rank,
                         config.seed, config.aug_repeats)
    plan = Plan.of(config, stream.steps_per_epoch)
    schedule = build_schedule(config, plan, peak_lr(config, resolved.recipe_global_batch, stream.global_batch))
    note = warmup_note(config, schedule)
    model = build_model(config, env, splits.classes, task)  # before --output exists: --pretrained may not fit
    pretrained = pretrained_report(model)
    train_set = task.training_set(splits, config, model)  # before --output exists: token labels may not fit
    optimization = build_optimization(model, config, schedule, amp, env)
    if env.main:
        output_folder(config.output, "--output")
        remove_stale_temporaries(config.output)  # left by a process killed while it saved
        summary = run_summary(resolved, env, stream, plan, optimization)
        for name in ("mean", "std"):  # the statistics in effect, and where they come from
            summary["options"][name] = {"value": list(getattr(splits, name)), "source": normalized_by}
        run_folder.write_config(config.output, summary)
        run_folder.write_schedule(config.output, schedule, plan.steps_per_epoch, optimization.groups)
        print(options_table(config, summary) + (f"\n{note}" if note else ""), flush=True)
        if pretrained is not None:
            print(f"--pretrained: {pretrained}", flush=True)
    progress = restore(state, model, optimization, config, env, Progress(task.metric, plan.unit), plan)
    if env.main and not config.dry_run:
        run_folder.write_metrics(config.output, progress.history)  # drops rows of a round that was not committed
    run = Run(config, env, amp, task, splits, train_set, stream, plan,
              val_loader(splits.val, config.batch_size, config.workers, env, task.collate), model,
              distributed_model(model, env), optimization, task.build_objective(config, len(splits.classes), model),
              callbacks, pretrained)
    return run, progress


def input_normalization(config: TrainConfig, task: Task) -> tuple[tuple[tuple, tuple] | None, str]:
    """((mean, std) of the model's inputs, where they come from): --mean/--std, else the --pretrained checkpoint's
    (timm's rule: the pretrained model decides), else None: the data set's own (and none for a task whose models
    normalize inside)."""
    if task.normalizes_inside:
        return None, f"none here: {task.name} models normalize inside"
    if config.mean is not None:
        return (config.mean, config.std), "given"
    if config.pretrained is not None:
        mean, std, source = pretrained_normalization(config.pretrained)
        return (mean, std), source
    return None, f"--data {config.data}'s"


def run_summary(resolved: ResolvedRun, env: DistEnv, stream: TrainStream, plan: Plan,
                optimization: Optimization) -> dict[str, Any]:
    """config.json: every option with its value and source, and what the options come to."""
    config = resolved.config
    return {
        "options": {spec.name: {"value": _plain(getattr(config, spec.name)), "source": config.sources[spec.name]}
                    for spec in fields(config) if spec.init},
        "recipe": resolved.recipe.name if resolved.recipe is not None else None,
        "world_size": env.world, "global_batch": stream.global_batch,
        "recipe_global_batch": resolved.recipe_global_batch,
        "peak_lr": optimization.schedule.lr, "steps_per_epoch": plan.steps_per_epoch,
        "total_steps": plan.total_steps,
        "param_groups": [{"weight_decay": group.weight_decay, "tensors": len(group.names)}
                         for group in optimization.groups],
    }


def _plain(value: Any) -> Any:
    """A JSON value: paths as text, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    return list(value) if isinstance(value, tuple) else value


def options_table(config: TrainConfig, summary: dict[str, Any]) -> str:
    """The start-up table: every option's value and source, then the batch, length and lr they come to."""
    rows = [(flag(name), repr(entry["value"]), entry["source"]) for name, entry in summary["options"].items()]
    width = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{name:<{width[0]}}  {value:<{width[1]}}  {source}" for name, value, source in rows]
    lines.append(f"global batch {summary['global_batch']} ({config.batch_size} x {summary['world_size']} "
                 f"process(es) x {config.accum_steps} micro-step(s)); {summary['steps_per_epoch']} steps per epoch, "
                 f"{summary['total_steps']} steps; peak lr {summary['peak_lr']:g}")
    expected = summary["recipe_global_batch"]
    if expected is not None and expected != summary["global_batch"]:
        lines.append(f"note: recipe {summary['recipe']} trains with a global batch of {expected}; "
                     + ("--lr is scaled by the linear rule" if config.scale_lr
                        else "--lr is kept (--scale-lr scales it by the linear rule)"))
    return "\n".join(lines)


def load_run(config: TrainConfig, env: DistEnv) -> dict[str, Any] | None:
    """The last committed state in --output (None if there is none), checked to be resumable as configured."""
    state = run_folder.load_state(config.output) if env.main else None
    if env.distributed:  # only rank 0 need see the output folder (other machines may not share it)
        shared = [state]
        dist.broadcast_object_list(shared, src=0)
        state = shared[0]
    if state is None:
        return None
    if not config.resume:
        last = state["history"][-1]
        done = f"epoch {last['epoch']}" if "epoch" in last else f"iter {last['iter']}"
        raise UserError(f"--output {str(config.output)!r} already holds a training run ({done}); "
                        "pass --resume to continue it, or choose another --output")
    changed = setting_changes(state["config"], run_options(config, env), {"world_size": "number of processes"})
    if changed:
        raise UserError(f"--resume: the run in {str(config.output)!r} was started with other settings "
                        f"({'; '.join(changed)}); resume with the original settings, or train into another --output")
    return state


def run_options(config: TrainConfig, env: DistEnv) -> dict[str, Any]:
    """What shapes the training trajectory: saved with each commit, compared on --resume."""
    return {**config.run_options(), "world_size": env.world}


def restore(state: dict[str, Any] | None, model: nn.Module, optimization: Optimization, config: TrainConfig,
            env: DistEnv, progress: Progress, plan: Plan) -> Progress:
    """Load a resumed run's weights and optimization state into them; its progress (none for a new run)."""
    if state is None:
        if config.resume and env.main:
            print(f"no checkpoint in {config.output} to resume from; starting at step 0")
        return progress
    model.load_state_dict(state["model"])
    optimization.load_state_dict(state)
    progress.step, progress.history, progress.best = state["step"], state["history"], state["best"]
    threads = state.get("threads")  # runs saved before it was recorded: the process's own
    if threads is not None and threads != torch.get_num_threads() and env.device.type == "cpu":
        if env.main:
            print(f"note: resuming on {threads} CPU thread(s), as the run started (this process had "
                  f"{torch.get_num_threads()}): the same count computes the same bits")
        torch.set_num_threads(threads)
    if env.main:
        done = plan.count(progress.step)
        print(f"resumed from {config.output / run_folder.STATE}: " + (
            f"continuing at {plan.unit} {done + 1}" if progress.step < plan.total_steps
            else f"all {plan.length} {plan.unit}s were already done"))
    return progress


def step_seed(seed: int, step: int, micro_step: int, rank: int) -> int:
    """The seed of a micro-step's model-side randomness (drop path, mixup): a function of where it is alone."""
    return seed + 1_000_003 * (step + 1) + 7919 * rank + 104_729 * micro_step


def run_round(run: Run, start: int, end: int) -> dict[str, Any]:
    """Train the steps [start, end) and validate: the metrics row."""
    env, task, plan = run.env, run.task, run.plan
    round_start = time.perf_counter()
    (loss_sum, hits, counted, seen), parts = train_steps(run, start, end)
    train_time = time.perf_counter() - round_start
    if env.distributed:  # ranks saw different batches: average BatchNorm statistics so all ranks hold one model
        distribute_bn(run.model, env.world, reduce=True)
    row = {plan.unit: plan.count(end), "train_loss": loss_sum / max(seen, 1),
           **{f"train_{name}": value / max(seen, 1) for name, value in parts.items()},
           **_val_columns(task, task.evaluate(run.model, run.val_loader, env, splits=run.splits, amp=run.amp,
                                                 unreadable=run.unreadable)),
           **run.optimization.lrs()}
    if run.objective.mixup is None and task.train_accuracy is not None:
        row[task.train_accuracy] = 100 * hits / max(counted, 1)
    if run.optimization.ema is not None:
        ema_val = task.evaluate(run.optimization.ema.module, run.val_loader, env, splits=run.splits, amp=run.amp,
                                desc="val (ema)")
        row.update({f"ema_{key}": value for key, value in _val_columns(task, ema_val).items()})
    row.update(round_time_s=time.perf_counter() - round_start, train_images_per_s=seen / train_time)
    return row


def _val_columns(task: Task, result: dict[str, Any]) -> dict[str, Any]:
    return {f"val_{key}": result[key] for key in ("loss", *task.metric_columns()) if key in result}


def train_steps(run: Run, start: int, end: int) -> tuple[list[float], dict[str, float]]:
    """Optimizer steps [start, end) on this rank's micro-batches: [loss sum, accuracy hits, accuracy count,
    images] and the sum of each named loss term (see Objective.parts), summed over all ranks."""
    env, objective, task, stream, config = run.env, run.objective, run.task, run.stream, run.config
    loader = DataLoader(SeededSamples(run.train_set, config.seed),
                        batch_sampler=RoundBatches(stream, start, end), num_workers=config.workers,
                        collate_fn=task.collate)
    micro_batches = iter(loader)
    run.step_model.train()
    clock = time.perf_counter()
    sums = [0.0, 0.0, 0.0, 0.0]
    part_sums: dict[str, float] = {}
    plan = run.plan
    # an --iters run's bar counts the run's steps; an epoch's, the epoch's
    steps = range(start, end)
    label = "iters" if plan.by_iters else f"epoch {plan.count(start) + 1}/{plan.length}"
    bar = tqdm(steps, desc=label,
               initial=start if plan.by_iters else 0, total=plan.total_steps if plan.by_iters else len(steps),
               leave=False, disable=None if env.main else True, file=sys.stdout)
    heartbeat = Heartbeat(env.main)
    for step in bar:
        if step % stream.steps_per_epoch == 0:
            run.callbacks.on_epoch_start(step // stream.steps_per_epoch + 1,
                                         stream.epoch_indices(step // stream.steps_per_epoch + 1))
        run.callbacks.on_step(step)
        run.optimization.begin(step)
        stepped = False
        for micro_step in range(config.accum_steps):
            images, targets, problems = next(micro_batches)
            seed_everything(step_seed(config.seed, step, micro_step, env.rank))
            run.unreadable.add(problems)
            if images is not None:
                images, targets, hard_targets = task.prepare(images.to(env.device), targets.to(env.device), objective)
            if images is None or len(images) == 0:
                # every rank must take every step together under DDP, so only a lone process can skip a batch
                if env.distributed:
                    raise UserError(f"no image of a training batch could be read (step {step})")
                continue
            last = micro_step == config.accum_steps - 1
            # DDP averages the gradients over the ranks on the last micro-step only
            with (run.step_model.no_sync() if env.distributed and not last else contextlib.nullcontext()):
                with autocast(env.device, run.amp):
                    outputs = task.forward(run.step_model, images, targets)
                    loss = task.loss(outputs, targets, objective)
                if not math.isfinite(loss.item()):
                    raise UserError(f"the loss is {loss.item()} at step {step}: training diverged; lower --lr or "
                                    "set --clip-grad, then --resume")
                run.optimization.backward(loss / config.accum_steps)
            stepped = True
            batch_hits, batch_counted = task.hits(outputs, hard_targets)
            for index, value in enumerate((loss.item() * len(images), batch_hits, batch_counted, len(images))):
                sums[index] += value
            for name, value in objective.parts().items():
                part_sums[name] = part_sums.get(name, 0.0) + value.item() * len(images)
        if stepped:
            run.optimization.finish(run.model, step, config.clip_grad)
        accuracy = {"acc": f"{100 * sums[1] / max(sums[2], 1):.1f}%"} if task.train_accuracy else {}
        speed = f"{sums[3] * env.world / (time.perf_counter() - clock):.0f}"
        bar.set_postfix(loss=f"{sums[0] / max(sums[3], 1):.3f}", **accuracy, img_s=speed)
        heartbeat(lambda: f"{label}: step {step + 1}/{plan.total_steps}, loss {sums[0] / max(sums[3], 1):.4f}, "
                          f"{speed} {task.input_noun}s/s")
    names = sorted(part_sums)
    totals = all_reduce_sum(sums + [part_sums[name] for name in names], env)
    return totals[:4], dict(zip(names, totals[4:]))


def commit(run: Run, progress: Progress) -> None:
    """Write the weights, then the state file (the commit point, see run_folder), then the metrics."""
    config, model, ema, metric, unit = run.config, run.model, run.optimization.ema, run.task.metric, run.plan.unit
    row = progress.history[-1]
    splits = run.splits  # what eval and predict need to rebuild the model and its inputs:
    metadata = {"model": config.model, "task": run.task.name, "model_kwargs": config.model_arguments(),
                "classes": splits.classes, "data": config.data,
                "img_size": config.img_size,
                "mean": list(splits.mean), "std": list(splits.std), **run.task.metadata(splits),
                **({"pretrained": run.pretrained.as_metadata()} if run.pretrained is not None else {}),
                unit: row[unit], metric: row[metric]}
    weights = run.task.inference_model(model)
    save_weights(config.output / run_folder.WEIGHTS, weights, metadata)
    if progress.best[unit] == row[unit]:
        save_weights(config.output / run_folder.BEST, weights, metadata)
    if ema is not None:
        save_weights(config.output / run_folder.EMA_WEIGHTS, run.task.inference_model(ema.module),
                     {**metadata, metric: row[f"ema_{metric}"]})
    run_folder.save_state(config.output / run_folder.STATE, {
        "step": progress.step, "model": cpu_state_dict(model), **run.optimization.state_dict(),
        "history": progress.history, "best": progress.best,
        "config": run_options(config, run.env),  # with the step, the seed determines every random generator's state
        # CPU kernels split their sums by thread: another count rounds differently (one thread against two: 173 of
        # Mask R-CNN nano's 180 tensors differ after an epoch), so a resumed run computes on the run's own count
        "threads": torch.get_num_threads(),
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


def _log_row(row: dict[str, Any], plan: Plan, writer, noun: str) -> None:
    scalars = {key: value for key, value in row.items() if isinstance(value, (int, float))}
    if writer is not None:
        for key, value in scalars.items():
            writer.add_scalar(key, value, row[plan.unit])
    percents = [key for key in scalars if key.startswith(("val_", "ema_val_")) and not key.endswith(("_loss", "_mm"))]
    lengths = [key for key in scalars if key.startswith(("val_", "ema_val_")) and key.endswith("_mm")]
    parts = "".join(f"{key[6:]} {row[key]:.4f}  " for key in scalars
                    if key.startswith("train_") and key.endswith("_loss") and key != "train_loss")
    text = (f"{plan.unit} {row[plan.unit]}/{plan.length}  train_loss {row['train_loss']:.4f}  {parts}"
            + (f"val_loss {row['val_loss']:.4f}  " if "val_loss" in row else "")
            + "  ".join([f"{key} {row[key]:.2f}%" for key in percents] + [f"{key} {row[key]:.2f}" for key in lengths]))
    rate = row["train_images_per_s"]
    tqdm.write(text + f"  ({row['round_time_s']:.1f} s, {rate:.{0 if rate >= 10 else 2}f} {noun}s/s)", file=sys.stdout)


def _tensorboard(output: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(output / "tensorboard"))
