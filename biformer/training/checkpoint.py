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
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import UserError
from ..files import atomic_output

WEIGHTS, BEST, EMA_WEIGHTS, STATE, METRICS = (
    "last.safetensors", "best.safetensors", "last_ema.safetensors", "last.state.pt", "metrics.jsonl"
)


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_output(folder / ".write-test") as probe:
            probe.write_bytes(b"")
        (folder / ".write-test").unlink()
    except OSError as error:
        raise UserError(f"output folder {str(folder)!r} is not writable: {error.strerror or error}") from error


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_weights(path: Path, model: nn.Module, metadata: dict[str, Any]) -> None:
    with atomic_output(path) as tmp:
        save_file(cpu_state_dict(model), tmp, metadata={k: json.dumps(v) for k, v in metadata.items()})


def weights_metadata(path: Path) -> dict[str, Any]:
    with safe_open(path, "pt") as file:
        return {k: json.loads(v) for k, v in (file.metadata() or {}).items()}


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


def load_weights(model: nn.Module, path: str | os.PathLike, *, what: str = "checkpoint") -> None:
    """Strictly load weights (ours or an original release file), as a user error if they do not fit."""
    from ..models import load_checkpoint

    try:
        load_checkpoint(model, path)
    except (ValueError, FileNotFoundError) as error:
        raise UserError(f"{what}: {error}") from error


def write_metrics(folder: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl (one JSON object per epoch) from the committed history."""
    with atomic_output(folder / METRICS) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
