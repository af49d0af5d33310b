"""A training run's folder: safetensors weights plus a state file, each written atomically; the metrics; the
resolved configuration and the learning rate of every step.

At start-up the trainer writes `config.json` (every option's value and source, the global batch, the run's
length in steps) and `schedule.csv` (see `write_schedule`). At each validation (after an epoch, or --val-every
steps) it writes `last.safetensors` (weights; metadata: model, classes, epoch or iter, preprocessing),
`best.safetensors` when the validation is the best so far, `last_ema.safetensors` with --model-ema, then
`last.state.pt`: steps done, weights, optimizer, grad scaler, EMA, metric history and run configuration. The
state file is the commit point and holds everything a resume needs, so a run stopped at any moment, even while
saving, resumes from the last validation whose state file was completed; the .safetensors files are for eval,
predict and users.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..files import atomic_output

WEIGHTS, BEST, EMA_WEIGHTS, STATE, METRICS, CONFIG, SCHEDULE = (
    "last.safetensors", "best.safetensors", "last_ema.safetensors", "last.state.pt", "metrics.jsonl", "config.json",
    "schedule.csv",
)


def save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def load_state(folder: Path) -> dict[str, Any] | None:
    """The last committed training state in folder, or None if there is none."""
    path = folder / STATE
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # only our own atomic writes produce this file: anything else is foreign
        raise UserError(f"cannot read training state {str(path)!r}: {str(error).splitlines()[0]}") from error


def write_metrics(folder: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl (one JSON object per epoch) from the committed history."""
    with atomic_output(folder / METRICS) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in history))


def write_config(folder: Path, summary: dict[str, Any]) -> None:
    with atomic_output(folder / CONFIG) as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")


def write_schedule(folder: Path, schedule, steps_per_epoch: int, groups) -> None:
    """schedule.csv: a comment line per parameter group (its weight decay and how many tensors it holds), then
    `step,epoch,lr_group0,...` for every optimizer step (from 0; epoch from 1), each lr at full precision."""
    lines = [f"# group {i}: weight_decay {group.weight_decay!r}, {len(group.names)} tensors"
             for i, group in enumerate(groups)]
    lines.append(",".join(["step", "epoch", *(f"lr_group{i}" for i in range(len(groups)))]))
    for step in range(schedule.total_steps):
        lr = repr(schedule(step))
        lines.append(",".join([str(step), str(step // steps_per_epoch + 1), *([lr] * len(groups))]))
    with atomic_output(folder / SCHEDULE) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
