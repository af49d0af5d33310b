"""The training and evaluation loops, single process or DistributedDataParallel under torchrun.

Exact resume: every epoch re-seeds all random generators from (seed, epoch, rank) and the
sampler shuffles by (seed, epoch), so the random state at the start of an epoch is a function
of the epoch alone; the state saved at the end of each epoch (weights, optimizer, scheduler,
grad scaler, EMA, BatchNorm statistics) holds everything else. So epoch e runs the same whether
or not the process was restarted before it.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, distribute_bn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from ..errors import UserError
from . import checkpoint as ckpt
from .data import build_datasets, collate_readable

# Fault injection for the resume test: SIGKILL this process at this global training step.
KILL_AT_STEP_ENV = "BIFORMER_SIGKILL_AT_STEP"
# Options that shape the training trajectory: a resumed run must use the values it started with.
RUN_OPTIONS = ("data", "model", "img_size", "batch_size", "epochs", "opt", "lr", "min_lr", "weight_decay",
               "warmup_epochs", "drop_path", "aa", "mixup", "cutmix", "smoothing", "clip_grad", "model_ema",
               "ema_decay", "amp", "seed")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """--device, or the GPU if there is one; a bare "cuda" means this process's GPU under torchrun."""
    if device in (None, "cuda") and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    target = torch.device(device or "cpu")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available; use --device cpu")
    return target


def init_distributed(device: str | None) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    target = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if world == 1:
        return Dist(0, 1, target)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), world, target)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce_sum(values: list[float], env: Dist) -> list[float]:
    if env.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def resolve_amp(amp: str, device: torch.device) -> str:
    """--amp auto: bfloat16 on CPU and on GPUs that have it, float16 on older GPUs."""
    if amp == "auto":
        return "bf16" if device.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16"
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a GPU; use --amp bf16 (or --amp) on CPU")
    return amp


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


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


def _format_row(row: dict[str, Any], epochs: int) -> str:
    text = (f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
            f"val_top1 {row['val_top1']:.2f}%  val_top5 {row['val_top5']:.2f}%")
    if "ema_val_top1" in row:
        text += f"  ema_val_top1 {row['ema_val_top1']:.2f}%"
    return text + f"  ({row['epoch_time_s']:.1f} s, {row['train_images_per_s']:.0f} img/s)"


def train(args: argparse.Namespace) -> dict[str, Any]:
    env = init_distributed(args.device)
    try:
        return _train(args, env)
    finally:
        if env.world > 1:
            dist.destroy_process_group()


def _run_config(args: argparse.Namespace, env: Dist) -> dict[str, Any]:
    return {**{name: getattr(args, name) for name in RUN_OPTIONS}, "world_size": env.world}


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], output: Path) -> None:
    changed = [f"{'--' + k.replace('_', '-') if k != 'world_size' else 'number of processes'} "
               f"{saved.get(k)!r} -> {current[k]!r}" for k in current if saved.get(k) != current[k]]
    if changed:
        raise UserError(f"--resume: the run in {str(output)!r} was started with other settings ({'; '.join(changed)}); "
                        "resume with the original settings, or train into another --output")


def _train(args: argparse.Namespace, env: Dist) -> dict[str, Any]:
    output = Path(args.output)
    if env.main:
        ckpt.check_writable(output)
    state = ckpt.load_state(output) if env.main else None
    if env.world > 1:  # only rank 0 need see the output folder (other machines may not share it)
        shared = [state]
        dist.broadcast_object_list(shared, src=0)
        state = shared[0]
    if state is not None and not args.resume:
        raise UserError(f"--output {str(output)!r} already holds a training run (epoch {state['epoch']}); "
                        "pass --resume to continue it, or choose another --output")
    amp = resolve_amp(args.amp, env.device)
    config = _run_config(args, env)
    if state is not None:
        _check_same_run(state["config"], config, output)
    if args.model not in timm.list_models(args.model):
        raise UserError(f"--model {args.model!r} is not a registered timm model (try biformer_nano, biformer_tiny, ...)")
    splits = build_datasets(args.data, args.img_size, auto_augment=args.aa)
    seed_everything(args.seed)
    model = timm.create_model(args.model, num_classes=len(splits.classes), drop_path_rate=args.drop_path)
    model.to(env.device)
    if args.sync_bn and env.world > 1:
        if env.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif env.main:  # SyncBatchNorm has no CPU kernel; BatchNorm statistics are averaged after each epoch
            print("note: --sync-bn is ignored on CPU", file=sys.stderr)

    if len(splits.train) < args.batch_size * env.world:
        raise UserError(f"--batch-size {args.batch_size} x {env.world} process(es) exceeds the "
                        f"{len(splits.train)} training images")
    sampler = DistributedSampler(splits.train, num_replicas=env.world, rank=env.rank, shuffle=True,
                                 seed=args.seed, drop_last=True)  # drop_last: shards stay disjoint
    train_loader = DataLoader(splits.train, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                              drop_last=True, collate_fn=collate_readable)
    eval_loader = val_loader(splits.val, args.batch_size, args.workers, env)

    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.lr * 0.01, min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=len(train_loader),
    )
    ema = ModelEmaV3(model, decay=args.ema_decay) if args.model_ema else None
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=len(splits.classes))
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp == "fp16")

    history: list[dict[str, Any]] = []
    start_epoch, best = 1, {"val_top1": -1.0, "epoch": 0}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"] + 1
        if env.main:
            print(f"resumed from {output / ckpt.STATE}: " + (f"continuing at epoch {start_epoch}" if start_epoch <= args.epochs
                                                             else f"all {args.epochs} epochs were already done"))
    elif args.resume and env.main:
        print(f"no checkpoint in {output} to resume from; starting at epoch 1")
    if env.main:
        ckpt.write_metrics(output, history)  # drops rows of an epoch that was not committed

    ddp_model = DistributedDataParallel(model) if env.world > 1 else model
    writer = _tensorboard(output) if env.main and args.tensorboard else None
    unreadable = UnreadableImages()
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0"))
    shard_log: dict[str, list[int]] = {}
    train_start = time.perf_counter()
    for epoch in range(start_epoch, args.epochs + 1):
        seed_everything(args.seed + 1_000_003 * epoch + 7919 * env.rank)
        sampler.set_epoch(epoch)
        if args.record_shards:
            shard_log[str(epoch)] = list(iter(sampler))[: len(train_loader) * args.batch_size]
        ddp_model.train()
        epoch_start = time.perf_counter()
        sums = [0.0, 0.0, 0.0]  # loss sum, top-1 hits, images
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{args.epochs}", leave=False, disable=None if env.main else True,
                   file=sys.stdout)
        for step, (images, targets, problems) in enumerate(bar):
            global_step = (epoch - 1) * len(train_loader) + step
            if kill_at and global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            unreadable.add(problems)
            if images is not None and mixup is not None and len(images) % 2:  # mixup pairs images up
                images, targets = images[:-1], targets[:-1]
            if images is None or len(images) == 0:
                # every rank must take every step together under DDP, so only a lone process can skip one
                if env.world > 1:
                    raise UserError(f"no image of a training batch could be read (epoch {epoch}, step {step})")
                continue
            images, targets = images.to(env.device), targets.to(env.device)
            hard_targets = targets
            if mixup is not None:
                images, targets = mixup(images, targets)
            with autocast(env.device, amp):
                logits = ddp_model(images)
                loss = criterion(logits.float(), targets)
            if not math.isfinite(loss.item()):
                raise UserError(f"the loss is {loss.item()} at epoch {epoch} step {step}: training diverged; "
                                "lower --lr or set --clip-grad, then --resume")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step_update(global_step + 1)
            if ema is not None:
                ema.update(model, step=global_step + 1)
            sums[0] += loss.item() * len(images)
            sums[1] += (logits.argmax(1) == hard_targets).sum().item()
            sums[2] += len(images)
            elapsed = time.perf_counter() - epoch_start
            bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{100 * sums[1] / sums[2]:.1f}%",
                            img_s=f"{sums[2] * env.world / elapsed:.0f}")
        train_time = time.perf_counter() - epoch_start
        loss_sum, hits, seen = all_reduce_sum(sums, env)
        if env.world > 1:  # ranks saw different batches: average BatchNorm statistics so all ranks hold one model
            distribute_bn(model, env.world, reduce=True)
        val = evaluate(model, eval_loader, env, amp, unreadable=unreadable)
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "val_loss": val["loss"], "val_top1": val["top1"],
               "val_top5": val["top5"], "lr": optimizer.param_groups[0]["lr"]}
        if mixup is None:
            row["train_top1"] = 100 * hits / seen
        if ema is not None:
            ema_val = evaluate(ema.module, eval_loader, env, amp, desc="val (ema)")
            row.update(ema_val_loss=ema_val["loss"], ema_val_top1=ema_val["top1"], ema_val_top5=ema_val["top5"])
        row.update(epoch_time_s=time.perf_counter() - epoch_start, train_images_per_s=seen / train_time)
        history.append(row)
        if row["val_top1"] > best["val_top1"]:
            best = {"val_top1": row["val_top1"], "epoch": epoch}
        if env.main:
            _save_epoch(output, args, splits, model, ema, row, best["epoch"] == epoch)
            ckpt.save_state(output / ckpt.STATE, {
                "epoch": epoch, "model": ckpt.cpu_state_dict(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "history": history, "best": best,
                "config": config,  # with the epoch, the seed determines every random generator's state
            })
            ckpt.write_metrics(output, history)
            if writer is not None:
                for key, value in row.items():
                    writer.add_scalar(key, value, epoch)
            tqdm.write(_format_row(row, args.epochs), file=sys.stdout)
    if writer is not None:
        writer.close()
    if args.record_shards:
        _record_shards(Path(args.record_shards), env, shard_log, model)
    skipped = unreadable.count(env)
    final = history[-1] if history else {}
    if env.main and final:
        minutes, seconds = divmod(time.perf_counter() - train_start, 60)
        print(f"final validation top-1: {final['val_top1']:.2f}% (best {best['val_top1']:.2f}% at epoch {best['epoch']}); "
              f"training wall time {int(minutes)}m{seconds:04.1f}s; checkpoints in {output}", flush=True)
    if env.main and skipped:
        print(f"{skipped} unreadable image(s) were skipped", file=sys.stderr)
    return final


def _save_epoch(output: Path, args: argparse.Namespace, splits, model: nn.Module, ema: ModelEmaV3 | None,
                row: dict[str, Any], is_best: bool) -> None:
    """The .safetensors files for eval/predict, with what they need to rebuild the model and its inputs."""
    metadata = {"model": args.model, "classes": splits.classes, "epoch": row["epoch"], "img_size": args.img_size,
                "mean": list(splits.mean), "std": list(splits.std), "crop_pct": splits.crop_pct,
                "val_top1": row["val_top1"]}
    ckpt.save_weights(output / ckpt.WEIGHTS, model, metadata)
    if is_best:
        ckpt.save_weights(output / ckpt.BEST, model, metadata)
    if ema is not None:
        ckpt.save_weights(output / ckpt.EMA_WEIGHTS, ema.module, {**metadata, "val_top1": row["ema_val_top1"]})


def _tensorboard(output: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(output / "tensorboard"))


def _record_shards(folder: Path, env: Dist, shard_log: dict[str, list[int]], model: nn.Module) -> None:
    """Debug output for the distributed test: this rank's sample indices and a digest of its weights."""
    import hashlib
    import json

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{env.rank}.json").write_text(json.dumps({"indices": shard_log, "weights_sha256": digest.hexdigest()}))
