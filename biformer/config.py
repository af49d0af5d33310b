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
from typing import Any, Mapping, Sequence

from .errors import UserError
from .optim.param_groups import DECAY_RULES
from .optim.schedule import SCHEDULES, WARMUP_RULES

AMP_MODES = ("none", "auto", "bf16", "fp16")
# options only some tasks take (each task lists those it takes: Task.train_options)
TASK_TRAIN_OPTIONS = frozenset({"mixup", "cutmix", "smoothing", "aa", "reprob", "aug_repeats", "model_kwargs", "mean",
                                "std", "token_label", "token_label_weight", "mixtoken", "frames", "frame_stride",
                                "short_clips", "spacing", "foreground", "scale", "hflip"})


@dataclass(frozen=True)
class Unset:
    """The default of an option a recipe may set: the recipe's value if it sets one, else `builtin`."""

    builtin: Any

    def __str__(self) -> str:  # for --help
        return f"the recipe's, else {self.builtin!r}"


def option(default: Any, help: str, *, shapes_run: bool = False, least: float | None = None, why: str = "",
           recipe: bool = False, **cli: Any) -> Any:
    """A config field. least: the smallest valid value (why: the reason, for the message); recipe: a recipe may
    set it (see biformer.recipes); cli: more argparse keywords (choices are also checked when the config is built
    in code)."""
    return field(default=Unset(default) if recipe else default,
                 metadata={"help": help, "shapes_run": shapes_run, "least": least, "why": why, "cli": cli,
                           "recipe": recipe})


def builtin_default(spec: Any) -> Any:
    """A config field's value when neither the caller nor a recipe sets it."""
    return spec.default.builtin if isinstance(spec.default, Unset) else spec.default


def builtin_defaults() -> dict[str, Any]:
    """Every TrainConfig option's built-in default, by field name (also the value of an option newer than a run)."""
    return {spec.name: builtin_default(spec) for spec in fields(TrainConfig) if spec.init}


def flag(name: str) -> str:
    """The command-line option of a field: img_size -> --img-size."""
    return "--" + name.replace("_", "-")


def check_fields(options: Any) -> None:
    """UserError for a field of an options dataclass below its least value, or outside its choices."""
    for spec in fields(options):
        value, least = getattr(options, spec.name), spec.metadata.get("least")
        if not spec.init or isinstance(value, Unset) or value is None:
            continue
        choices = spec.metadata["cli"].get("choices")
        if least is not None and value < least:
            raise UserError(f"{flag(spec.name)} must be at least {least}{spec.metadata['why']}, got {value}")
        if choices is not None and value not in choices:
            raise UserError(f"{flag(spec.name)} must be one of {', '.join(map(str, choices))}, got {value!r}")


def setting_changes(saved: Mapping[str, Any], current: Mapping[str, Any],
                    labels: Mapping[str, str] | None = None) -> list[str]:
    """'--option old -> new' for each setting of `current` that differs from `saved` (a run's settings written
    earlier); an option newer than the saved run counts as its built-in default there. labels: how to name
    settings that are no option (e.g. the number of processes)."""
    defaults, labels = builtin_defaults(), labels or {}
    return [f"{labels.get(name) or flag(name)} {saved.get(name, defaults.get(name))!r} -> {value!r}"
            for name, value in current.items() if saved.get(name, defaults.get(name)) != value]


@dataclass(frozen=True)
class TaskOptions:
    """The options a task takes for `biformer eval` or `predict`: a frozen dataclass of `option` fields (a
    subclass adds them), checked when built; the commands generate their parser groups from the fields."""

    def __post_init__(self) -> None:
        check_fields(self)


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
    """A training run; the fields are listed in the order `biformer train --help` shows them.

    The options marked recipe=True stay `Unset` until `biformer.recipes.resolve` fills them in from the
    recipe (--recipe, else the model's own), else with their built-in value (`resolved`); `sources` then says
    where each value came from. `train` does that first.
    """

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
            "one, else as text (e.g. attention=window topks=2,8,32,global_input)", shapes_run=True, nargs="+", metavar="KEY=VALUE")
    pretrained: str | None = option(
        None, "weights to start from: a classifier's checkpoint (ours, the original release's .pth, or a timm or "
              "PyTorch one), its head re-initialized for another class count; for a segmentation or detection model "
              "its backbone's classifier checkpoint, or an original mmdet/mmseg checkpoint", shapes_run=True,
        metavar="FILE")
    mean: tuple[float, ...] | None = option(
        None, "the per-channel mean the inputs are normalized with; default: the --pretrained checkpoint's (ImageNet's "
              "for a file that records none), else the data set's (0.5 for the digits and digit-scenes, else "
              "ImageNet's)", shapes_run=True, nargs=3, metavar=("R", "G", "B"))
    std: tuple[float, ...] | None = option(
        None, "the per-channel standard deviation the inputs are normalized with; default: as --mean's",
        shapes_run=True, nargs=3, metavar=("R", "G", "B"))
    recipe: str | None = option(
        None, "the training recipe whose settings the options marked 'the recipe's' default to (`biformer recipes` "
              "lists them), or none for the built-in defaults; default: a detection or segmentation model's own "
              "(its head's COCO or ADE20K recipe), none for classifiers", shapes_run=True)
    epochs: int = option(30, "training epochs (the schedule's length); --iters instead counts optimizer steps",
                         shapes_run=True, least=1, recipe=True)
    iters: int | None = option(None, "train for this many optimizer steps instead of --epochs", shapes_run=True,
                               least=1, recipe=True)
    val_every: int | None = option(None, "with --iters: validate and save a checkpoint every this many steps "
                                         "(default: at the end only)", shapes_run=True, least=1, recipe=True)
    img_size: int = option(32, "input size in pixels (digits are upscaled to it; segmentation and detection: the "
                               "shorter image side)", shapes_run=True, least=32,
                           why=" (BiFormer downsamples 32x)", recipe=True)
    output: Path = option(Path("runs/train"), "folder for checkpoints, metrics.jsonl and config.json")
    batch_size: int = option(64, "per process and micro-step (the global batch is batch size x processes x "
                                 "--accum-steps)", shapes_run=True, least=1, recipe=True)
    accum_steps: int = option(1, "micro-steps per optimizer step (gradient accumulation)", shapes_run=True, least=1)
    opt: str = option("adamw", "timm optimizer name", shapes_run=True, recipe=True)
    lr: float = option(2e-3, "peak learning rate, reached after the warm-up", shapes_run=True, least=0,
                       recipe=True)
    scale_lr: bool = option(False, "scale --lr by the global batch over the recipe's global batch (its linear "
                                   "rule)", shapes_run=True)
    sched: str = option("cosine", "learning-rate schedule", shapes_run=True, choices=SCHEDULES, recipe=True)
    lr_per_epoch: bool = option(False, "change the learning rate at epoch boundaries only (else every step)",
                                shapes_run=True, recipe=True)
    min_lr: float = option(1e-5, "cosine: the final learning rate; poly: the floor it decays to", shapes_run=True,
                           least=0, recipe=True)
    milestones: tuple[int, ...] = option((), "step: the epochs (with --iters: steps) after which the learning rate "
                                             "is multiplied by --decay-rate", shapes_run=True, nargs="+", recipe=True)
    decay_rate: float = option(0.1, "step: the factor at each milestone", shapes_run=True, least=0, recipe=True)
    poly_power: float = option(1.0, "poly: the power of (1 - progress)", shapes_run=True, least=0, recipe=True)
    warmup_epochs: int = option(2, "linear warm-up length in epochs; --warmup-iters instead counts steps",
                                shapes_run=True, least=0, recipe=True)
    warmup_iters: int | None = option(None, "linear warm-up length in optimizer steps", shapes_run=True, least=0,
                                      recipe=True)
    warmup_rule: str = option("timm", "timm: from lr x --warmup-ratio up to lr; mmcv: the scheduled lr of each "
                                      "step x (1 - (1 - step / warmup) x (1 - ratio))", shapes_run=True,
                              choices=WARMUP_RULES, recipe=True)
    warmup_ratio: float = option(0.01, "the warm-up's first learning rate as a fraction of the peak (or, mmcv: "
                                       "of the scheduled one)", shapes_run=True, least=0, recipe=True)
    weight_decay: float = option(0.05, "decoupled weight decay (AdamW)", shapes_run=True, least=0, recipe=True)
    decay_rule: str = option("timm", "which parameters take weight decay: timm (not biases, 1-D parameters or "
                                     "the model's no_weight_decay() names), mmcv (not names containing norm, "
                                     "absolute_pos_embed or relative_position_bias_table) or all",
                             shapes_run=True, choices=DECAY_RULES, recipe=True)
    drop_path: float | None = option(None, "stochastic depth rate (default: 0 for classifiers, the original "
                                           "configs' rate for segmentation and detection models)", shapes_run=True,
                                     least=0, recipe=True)
    aa: str | None = option(None, "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment)",
                            shapes_run=True, recipe=True)
    reprob: float = option(0.0, "random erasing probability", shapes_run=True, least=0, recipe=True)
    scale: tuple[float, ...] | None = option(
        None, "image classifiers: the random resized crop's area range, MIN MAX as fractions of the image (default: "
              "0.75 1 for digits; timm's 0.08 1 for image folders, where a small object may fall outside the crop)",
        shapes_run=True, nargs=2, metavar=("MIN", "MAX"))
    hflip: float | None = option(None, "image classifiers: the probability of a horizontal flip (default: 0 for "
                                       "digits, where a mirrored digit is another symbol; 0.5 for image folders)",
                                 shapes_run=True, least=0)
    aug_repeats: int = option(1, "repeated augmentation: each image this many times per epoch, differently "
                                 "augmented (the epoch keeps its length)", shapes_run=True, least=1, recipe=True)
    mixup: float = option(0.0, "mixup alpha (0: off)", shapes_run=True, least=0, recipe=True)
    cutmix: float = option(0.0, "cutmix alpha (0: off)", shapes_run=True, least=0, recipe=True)
    smoothing: float = option(0.0, "label smoothing", shapes_run=True, least=0, recipe=True)
    token_label: str | None = option(
        None, "token labelling: supervise every final token with the teacher score maps in this folder (made by "
              "`biformer label` from the same --data), through a dense head that weights files leave out",
        shapes_run=True, metavar="LABELS")
    token_label_weight: float = option(0.5, "with --token-label: the token loss's weight beside the class loss",
                                       shapes_run=True, least=0, recipe=True)
    mixtoken: bool = option(False, "with --token-label: MixToken, CutMix in boxes aligned to the final tokens, "
                                   "their labels mixed alike", shapes_run=True, recipe=True)
    frames: int = option(8, "clip models: the frames of each sampled clip", shapes_run=True, least=2,
                         why=" (clip models merge frame pairs)")
    frame_stride: int = option(2, "clip models: the step between sampled frames", shapes_run=True, least=1)
    short_clips: str = option("loop", "clip models: what a clip with fewer frames than --frames x --frame-stride "
                                      "spans gets: looped, its last frame repeated (pad), or the run refused",
                              shapes_run=True, choices=("loop", "pad", "refuse"))
    spacing: tuple[float, ...] | None = option(
        None, "volume models: the voxel spacing (mm per axis, RAS order) volumes are resampled to; default: the "
              "training volumes' median", shapes_run=True, nargs=3, metavar=("X", "Y", "Z"))
    foreground: float = option(0.5, "volume models: the share of training crops centred on a foreground voxel",
                               shapes_run=True, least=0)
    clip_grad: float | None = option(None, "gradient norm clipping", shapes_run=True, recipe=True)
    model_ema: bool = option(False, "also keep and evaluate an EMA of the weights", shapes_run=True, recipe=True)
    ema_decay: float = option(0.998, "EMA decay per step", shapes_run=True, recipe=True)
    amp: str = option("none", "mixed precision; --amp alone: bf16 on CPU and recent GPUs, fp16 on older GPUs",
                      shapes_run=True, choices=AMP_MODES, nargs="?", const="auto")
    sync_bn: bool = option(False, "SyncBatchNorm across GPUs (on CPU, BatchNorm statistics are averaged after "
                                  "each validation)")
    workers: int = option(0, "data loading processes", least=0)
    device: str | None = option(None, "cpu, cuda, cuda:1, ... (None: the GPU if there is one)")
    seed: int = option(0, "seeds the model, data order and augmentation", shapes_run=True)
    resume: bool = option(False, "continue the run in --output from its last checkpoint (same settings required)")
    dry_run: bool = option(False, "build the data, model, optimizer and schedule, write config.json and "
                                  "schedule.csv into --output, and stop before training")
    tensorboard: bool = option(True, "also log to TensorBoard when it is installed")
    sources: dict[str, str] = field(default_factory=dict, init=False, compare=False, repr=False)
    typed: frozenset[str] = field(default=frozenset(), init=False, compare=False, repr=False)  # see from_options

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TrainConfig:
        """The config of the options a user typed, the others at their defaults; each typed option's source is
        "given", also where it equals the default."""
        config = cls(**options)
        object.__setattr__(config, "typed", frozenset(options))
        return config

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_kwargs", tuple(self.model_kwargs))  # argparse gives a list
        for name in ("mean", "std"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(value) for value in getattr(self, name)))
        if (self.mean is None) != (self.std is None):
            raise UserError("--mean and --std go together: give both, or neither (the defaults then come as a pair)")
        if self.std is not None and min(self.std) <= 0:
            raise UserError(f"--std must be positive in every channel, got {' '.join(map(str, self.std))}")
        # --output=~/x reaches us unexpanded (the shell expands ~ only at a word's start)
        object.__setattr__(self, "output", Path(os.path.expanduser(os.fspath(self.output))))
        if self.token_label is not None:
            object.__setattr__(self, "token_label", os.path.expanduser(os.fspath(self.token_label)))
        if self.pretrained is not None:
            # a text, as every option saved with the run state (which loads with weights_only=True)
            object.__setattr__(self, "pretrained", os.path.expanduser(os.fspath(self.pretrained)))
            if not os.path.isfile(self.pretrained):
                raise UserError(f"--pretrained {self.pretrained!r} does not exist; give the weights file to start from")
        self.model_arguments()  # a malformed KEY=VALUE fails here, before anything runs
        object.__setattr__(self, "milestones", tuple(self.milestones) if self.is_set("milestones") else self.milestones)
        if self.scale is not None:
            object.__setattr__(self, "scale", tuple(self.scale))
            if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
                raise UserError(f"--scale takes MIN MAX with 0 < MIN <= MAX <= 1 (fractions of the image's area), "
                                f"got {' '.join(map(str, self.scale))}")
        if self.hflip is not None and self.hflip > 1:
            raise UserError(f"--hflip is a probability (0 to 1), got {self.hflip}")
        check_fields(self)
        if self.is_set("val_every") and self.is_set("iters") and self.val_every is not None and self.iters is None:
            raise UserError("--val-every counts steps of an --iters run; with --epochs the run validates after "
                            "each epoch: leave --val-every out, or train by --iters")

    def is_set(self, name: str) -> bool:
        """Whether option `name` has a value (given, or filled in by `resolved`)."""
        return not isinstance(getattr(self, name), Unset)

    def resolved(self, recipe_name: str | None, settings: Mapping[str, Any]) -> TrainConfig:
        """This configuration with each unset option taken from the recipe's `settings`, else its built-in
        default; `sources` records where every value came from."""
        given = {spec.name for spec in fields(self) if spec.init and self.is_set(spec.name)}
        # a given alternative replaces the recipe's (--epochs its --iters); giving both is a mistake. A run counted
        # in the other unit than the recipe's also drops the recipe's values counted in its unit.
        for pair in (("epochs", "iters"), ("warmup_epochs", "warmup_iters")):
            both = [name for name in pair if name in given and getattr(self, name) is not None]
            if len(both) == 2:
                raise UserError(f"{flag(pair[0])} and {flag(pair[1])} are alternatives: give one")
            if both:
                other = pair[1 - pair.index(both[0])]
                unit_bound = ("val_every", "milestones", "lr_per_epoch") if pair[0] == "epochs" and other in settings else ()
                settings = {key: value for key, value in settings.items() if key not in (other, *unit_bound)}
        values, sources = {}, {}
        for spec in fields(self):
            if not spec.init:
                continue
            if spec.name in given:  # an option no recipe sets reads as given only where it differs from its default
                values[spec.name] = getattr(self, spec.name)
                differs = spec.metadata["recipe"] or spec.name in self.typed or values[spec.name] != spec.default
                sources[spec.name] = "given" if differs else "default"
            elif spec.name in settings:
                values[spec.name], sources[spec.name] = settings[spec.name], f"recipe {recipe_name}"
            else:
                values[spec.name], sources[spec.name] = builtin_default(spec), "default"
        config = TrainConfig(**values)
        object.__setattr__(config, "sources", sources)
        object.__setattr__(config, "typed", self.typed)
        return config

    def model_arguments(self) -> dict[str, Any]:
        """--model-kwargs as keyword arguments."""
        return parse_model_kwargs(self.model_kwargs)

    def run_options(self) -> dict[str, Any]:
        """The values of the options that shape the training trajectory, by field name."""
        return {spec.name: getattr(self, spec.name) for spec in fields(self) if spec.metadata.get("shapes_run")}
