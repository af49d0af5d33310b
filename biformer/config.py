"""The training configuration: one typed field per `biformer train` option.

Each field carries its default, its help text, the least value it accepts and whether it shapes
the training trajectory (such options must keep their values on --resume). The command line is
generated from the fields, so options, checks and the resume comparison cannot drift apart.
"""
from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError

AMP_MODES = ("none", "auto", "bf16", "fp16")
# options only some tasks take (each task lists those it takes: Task.train_options)
TASK_TRAIN_OPTIONS = frozenset({"mixup", "cutmix", "smoothing", "aa", "model_kwargs"})


def option(default: Any, help: str, *, shapes_run: bool = False, least: float | None = None, why: str = "",
           **cli: Any) -> Any:
    """A config field. least: the smallest valid value (why: the reason, for the message); cli: more
    argparse keywords (choices are also checked when the config is built in code)."""
    return field(default=default,
                 metadata={"help": help, "shapes_run": shapes_run, "least": least, "why": why, "cli": cli})


def flag(name: str) -> str:
    """The command-line option of a field: img_size -> --img-size."""
    return "--" + name.replace("_", "-")


def parse_model_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE texts as keyword arguments, each value a Python literal if it reads as one, else text."""
    arguments = {}
    for item in items:
        key, equals, text = item.partition("=")
        if not equals or not key.isidentifier():
            raise UserError(f"--model-kwargs {item!r}: expected KEY=VALUE, e.g. attention=window")
        try:
            arguments[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            arguments[key] = text
    return arguments


@dataclass(frozen=True)
class TrainConfig:
    """A training run; the fields are listed in the order `biformer train --help` shows them."""

    data: str = option("digits", "classification: 'digits' or a folder with train/ and val/; segmentation: "
                                 "'digit-scenes', a folder with images/, masks/ and classes.txt, or ADE20K; "
                                 "detection: 'digit-scenes' or a folder in COCO's layout (annotations/"
                                 "instances_{train,val}*.json beside {train,val}*/)", shapes_run=True)
    model: str = option("biformer_nano", "a biformer_* or any timm model name for classification; HEAD_BACKBONE "
                                         "(e.g. upernet_biformer_tiny, maskrcnn_biformer_small) for segmentation "
                                         "and detection: an unknown name's error lists every task's heads",
                        shapes_run=True)
    model_kwargs: tuple[str, ...] = option(
        (), "KEY=VALUE arguments for the classifier's constructor, each value read as a Python literal if it is "
            "one, else as text (e.g. attention=window topks=2,8,32,-2)", shapes_run=True, nargs="+", metavar="KEY=VALUE")
    pretrained: str | None = option(
        None, "weights to start from: a classifier's checkpoint (ours, the original release's .pth, or a timm or "
              "PyTorch one), its head re-initialized for another class count; for a segmentation or detection model "
              "its backbone's classifier checkpoint, or an original mmdet/mmseg checkpoint", shapes_run=True,
        metavar="FILE")
    epochs: int = option(30, "training epochs (the cosine schedule's length)", shapes_run=True, least=1)
    img_size: int = option(32, "input size in pixels (digits are upscaled to it; segmentation and detection: the "
                               "shorter image side)", shapes_run=True, least=32,
                           why=" (BiFormer downsamples 32x)")
    output: Path = option(Path("runs/train"), "folder for checkpoints and metrics.jsonl")
    batch_size: int = option(64, "per process", shapes_run=True, least=1)
    opt: str = option("adamw", "timm optimizer name", shapes_run=True)
    lr: float = option(2e-3, "peak learning rate, reached after the warm-up", shapes_run=True, least=0)
    min_lr: float = option(1e-5, "learning rate at the end of the cosine decay", shapes_run=True)
    weight_decay: float = option(0.05, "decoupled weight decay (AdamW)", shapes_run=True, least=0)
    warmup_epochs: int = option(2, "linear warm-up from lr/100", shapes_run=True, least=0)
    drop_path: float | None = option(None, "stochastic depth rate (default: 0 for classifiers, the original "
                                           "configs' rate for segmentation and detection models)", shapes_run=True, least=0)
    aa: str | None = option(None, "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment)",
                            shapes_run=True)
    mixup: float = option(0.0, "mixup alpha (0: off)", shapes_run=True, least=0)
    cutmix: float = option(0.0, "cutmix alpha (0: off)", shapes_run=True, least=0)
    smoothing: float = option(0.0, "label smoothing", shapes_run=True, least=0)
    clip_grad: float | None = option(None, "gradient norm clipping", shapes_run=True)
    model_ema: bool = option(False, "also keep and evaluate an EMA of the weights", shapes_run=True)
    ema_decay: float = option(0.998, "EMA decay per step", shapes_run=True)
    amp: str = option("none", "mixed precision; --amp alone: bf16 on CPU and recent GPUs, fp16 on older GPUs",
                      shapes_run=True, choices=AMP_MODES, nargs="?", const="auto")
    sync_bn: bool = option(False, "SyncBatchNorm across GPUs (on CPU, BatchNorm statistics are averaged after "
                                  "each epoch)")
    workers: int = option(0, "data loading processes", least=0)
    device: str | None = option(None, "cpu, cuda, cuda:1, ... (None: the GPU if there is one)")
    seed: int = option(0, "seeds the model, data order and augmentation", shapes_run=True)
    resume: bool = option(False, "continue the run in --output from its last complete epoch (same settings "
                                 "required)")
    tensorboard: bool = option(True, "also log to TensorBoard when it is installed")

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_kwargs", tuple(self.model_kwargs))  # argparse gives a list
        # --output=~/x reaches us unexpanded (the shell expands ~ only at a word's start)
        object.__setattr__(self, "output", Path(os.path.expanduser(os.fspath(self.output))))
        if self.pretrained is not None:
            # a text, as every option saved with the run state (which loads with weights_only=True)
            object.__setattr__(self, "pretrained", os.path.expanduser(os.fspath(self.pretrained)))
            if not os.path.isfile(self.pretrained):
                raise UserError(f"--pretrained {self.pretrained!r} does not exist; give the weights file to start from")
        self.model_arguments()  # a malformed KEY=VALUE fails here, before anything runs
        for spec in fields(self):
            value, least = getattr(self, spec.name), spec.metadata["least"]
            choices = spec.metadata["cli"].get("choices")
            if least is not None and value is not None and value < least:
                raise UserError(f"{flag(spec.name)} must be at least {least}{spec.metadata['why']}, got {value}")
            if choices is not None and value not in choices:
                raise UserError(f"{flag(spec.name)} must be one of {', '.join(choices)}, got {value!r}")

    def model_arguments(self) -> dict[str, Any]:
        """--model-kwargs as keyword arguments."""
        return parse_model_kwargs(self.model_kwargs)

    def run_options(self) -> dict[str, Any]:
        """The values of the options that shape the training trajectory, by field name."""
        return {spec.name: getattr(self, spec.name) for spec in fields(self) if spec.metadata["shapes_run"]}
