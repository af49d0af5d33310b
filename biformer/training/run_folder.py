"""Training checkpoints: safetensors weights plus a state file, each written atomically.

Per epoch the trainer writes `last.safetensors` (weights; metadata: model, classes, epoch,
preprocessing), `best.safetensors` when the epoch is the best so far, `last_ema.safetensors`
with --model-ema, then `last.state.pt`: weights, optimizer, scheduler, grad scaler, EMA, metric
history and run configuration. The state file is the commit point and holds everything a
resume needs, so a run stopped at any moment, even while saving, resumes from the last epoch
whose state file was completed; the .safetensors files are for eval, predict and users.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..files import atomic_output

WEIGHTS, BEST, EMA_WEIGHTS, STATE, METRICS = (
    "last.safetensors", "best.safetensors", "last_ema.safetensors", "last.state.pt", "metrics.jsonl"
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
