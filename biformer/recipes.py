"""The original release's training recipes, as data: the one table `biformer train --recipe` and `biformer recipes`
read.

A recipe names values of `TrainConfig` options: for every model it trains, then per head or backbone. The values
are facts read from the release's configs (its classification `main.py` and `configs/`, `object_detection/configs/`
and `semantic_segmentation/configs/`); `notes` says what an option cannot express. A dense model trains with its
head's recipe unless --recipe says otherwise; a classifier with the built-in defaults (the digits' settings).
`resolve` settles a run's options once: its task, its recipe, every option's value and where it came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .config import TrainConfig
from .errors import UserError
from .tasks.base import Task
from .tasks.registry import task_for_training

NONE = "none"  # --recipe none: the built-in defaults


@dataclass(frozen=True)
class Recipe:
    name: str
    task: str  # the task whose models it trains
    summary: str
    source: str  # the original files its values come from
    gpus: int  # the original run's processes; its global batch is batch_size x gpus
    settings_all: Mapping[str, Any]  # TrainConfig field -> value
    settings_by_part: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # head or backbone -> more
    default_for: tuple[str, ...] = ()  # the heads whose models train with it unless --recipe says otherwise
    notes: tuple[str, ...] = ()

    def settings(self, model: str) -> dict[str, Any]:
        """The option values for `model`: the common ones, then its head's, then its backbone's."""
        merged = dict(self.settings_all)
        for part, values in self.settings_by_part.items():
            if model == part or model.startswith(part + "_") or model.endswith("_" + part):
                merged.update(values)
        return merged

    def global_batch(self, model: str) -> int:
        return self.settings(model)["batch_size"] * self.gpus


# mmdet's schedule_1x: 12 epochs, lr x0.1 after epochs 8 and 11, linear warm-up over 500 iterations from 0.001
COCO_1X = Recipe(
    name="coco-1x", task="detection", gpus=8,
    summary="COCO 2017 RetinaNet / Mask R-CNN, mmdet's 1x schedule",
    source="object_detection/configs/coco/{retinanet,maskrcnn}.1x.biformer_{small,base}.py and mmdet's schedule_1x",
    settings_all={
        "epochs": 12, "sched": "step", "milestones": (8, 11), "decay_rate": 0.1, "lr_per_epoch": True,
        "warmup_iters": 500, "warmup_rule": "mmcv", "warmup_ratio": 0.001,
        "opt": "adamw", "lr": 1e-4, "batch_size": 2, "img_size": 800,
    },
    settings_by_part={
        "retinanet": {"weight_decay": 1e-4, "decay_rule": "all"},
        "fcos": {"weight_decay": 1e-4, "decay_rule": "all"},  # no FCOS config in the release: RetinaNet's
        "maskrcnn": {"weight_decay": 0.05, "decay_rule": "mmcv"},
    },
    default_for=("retinanet", "fcos", "maskrcnn"),
    notes=("images resized to at most 1333x800 keeping their aspect ratio, flipped with probability 0.5",
           "fp16 mixed precision in the original: pass --amp on a GPU",
           "backbone BatchNorm statistics frozen (norm_eval) when the backbone starts from --pretrained"),
)

ADE20K_SFPN = Recipe(
    name="ade20k-sfpn", task="segmentation", gpus=8,
    summary="ADE20K Semantic FPN, 80k iterations",
    source="semantic_segmentation/configs/ade20k/sfpn.biformer_{small,base}.py (its 160k schedule halved for 8 GPUs)",
    settings_all={
        "iters": 80_000, "val_every": 4_000, "sched": "cosine", "min_lr": 2e-4 * 1e-8,
        "warmup_iters": 1000, "warmup_rule": "mmcv", "warmup_ratio": 0.1,
        "opt": "adamw", "lr": 2e-4, "weight_decay": 1e-4, "decay_rule": "all", "batch_size": 4, "img_size": 512,
    },
    default_for=("sfpn",),
    notes=("mmcv's CosineAnnealing to min_lr_ratio 1e-8 of the lr",
           "512x512 random crops (cat_max_ratio 0.75) of images resized with ratio 0.5-2.0 from 2048x512, flip 0.5, "
           "photometric distortion", "fp16 mixed precision in the original: pass --amp on a GPU"),
)

ADE20K_UPERNET = Recipe(
    name="ade20k-upernet", task="segmentation", gpus=8,
    summary="ADE20K UperNet, 160k iterations",
    source="semantic_segmentation/configs/ade20k/upernet.biformer_{small,base}.py and mmseg 0.30's schedule_160k "
           "(which the release's configs inherit but do not ship)",
    settings_all={
        "iters": 160_000, "val_every": 16_000, "sched": "poly", "poly_power": 1.0, "min_lr": 0.0,
        "warmup_iters": 1500, "warmup_rule": "mmcv", "warmup_ratio": 1e-6,
        "opt": "adamw", "lr": 6e-5, "weight_decay": 0.01, "decay_rule": "mmcv", "batch_size": 2, "img_size": 512,
    },
    default_for=("upernet",),
    notes=("512x512 random crops (cat_max_ratio 0.75) of images resized with ratio 0.5-2.0 from 2048x512, flip 0.5, "
           "photometric distortion", "auxiliary FCN head on the stride-16 map, loss weight 0.4",
           "fp16 mixed precision in the original: pass --amp on a GPU"),
)

IN1K = Recipe(
    name="in1k", task="classification", gpus=8,
    summary="ImageNet-1k classification, 300 epochs (the DeiT-style main.py)",
    source="main.py's defaults (configs/train_args.yaml) and the README's launch command (8 GPUs x 128)",
    settings_all={
        "epochs": 300, "sched": "cosine", "lr_per_epoch": True, "min_lr": 1e-5,
        "warmup_epochs": 5, "warmup_rule": "timm", "warmup_ratio": 1e-6 / 1e-3,
        "opt": "adamw", "lr": 1e-3, "weight_decay": 0.05, "decay_rule": "timm", "batch_size": 128, "img_size": 224,
        "aa": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1,
        "aug_repeats": 3, "drop_path": 0.1, "model_ema": True, "ema_decay": 0.99996,
    },
    settings_by_part={"biformer_small": {"drop_path": 0.15}},
    notes=("the original's lr is 5e-4 x global batch / 512 (1e-3 at 8 x 128); --scale-lr applies that rule to "
           "another global batch", "warm-up from 1e-6 (the ratio 0.001 of lr 1e-3); the lr changes once per epoch",
           "drop path: 0.15 for biformer_small (the README's command), else main.py's default 0.1",
           "repeated augmentation: 3 copies per image; the original also trims each rank's epoch to a multiple of "
           "256 images", "random erasing in pixel mode, once per image; mixup and cutmix switch with "
           "probability 0.5; colour jitter 0.4; fp16 mixed precision in the original (pass --amp on a GPU)"),
)

IN1K_TOKEN_LABELLING = Recipe(
    name="in1k-tl", task="classification", gpus=8,
    summary="ImageNet-1k with token labelling, 300 epochs (the paper's BiFormer-S* and B* rows; give --token-label)",
    source="in1k's settings (the release's main.py); token labelling's from LV-ViT (zihangJiang/TokenLabeling: "
           "its paper's token loss weight 0.5, MixToken, mixup and cutmix off); the release has no token labelling",
    settings_all={**IN1K.settings_all, "mixup": 0.0, "cutmix": 0.0, "mixtoken": True, "token_label_weight": 0.5},
    settings_by_part=IN1K.settings_by_part,
    notes=("the labels: `biformer label --teacher dm_nfnet_f6 --img-size 576` (LV-ViT's teacher and input; it keeps "
           "the top 5 classes of each cell) over the training folder, then --token-label on that folder",
           "LV-ViT supervises the class output with the teacher's crop-level score; ours with the ground truth, "
           "smoothed by --smoothing", "LV-ViT also warps the label maps by RandAugment's rotations, shears and "
           "translations; ours crops and flips them only",
           *IN1K.notes),
)

RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (IN1K, IN1K_TOKEN_LABELLING, COCO_1X, ADE20K_SFPN,
                                                                  ADE20K_UPERNET)}


def _head(model: str, heads: tuple[str, ...]) -> str | None:
    return next((head for head in heads if model.startswith(head + "_")), None)


def recipe_for(model: str, requested: str | None, task: Task) -> Recipe | None:
    """The recipe `model` (of `task`) trains with: --recipe's (None: the model's own; "none": no recipe); UserError
    for an unknown name or a recipe of another task."""
    if requested is None:
        head = _head(model, task.heads)
        return next((recipe for recipe in RECIPES.values() if head is not None and head in recipe.default_for), None)
    if requested == NONE:
        return None
    recipe = RECIPES.get(requested)
    if recipe is None:
        raise UserError(f"--recipe {requested!r} is not a recipe; choose one of {', '.join(RECIPES)} or {NONE} "
                        "(`biformer recipes` lists their settings)")
    if recipe.task != task.name:
        fitting = [name for name, other in RECIPES.items() if other.task == task.name]
        raise UserError(f"--recipe {requested} trains {recipe.task} models; {model} is a {task.name} model: use "
                        + ", ".join(fitting) + f" or {NONE}")
    return recipe


@dataclass(frozen=True)
class ResolvedRun:
    """A training run's settings, resolved once for the engine, `ablate` and --dry-run: every option has its value
    (`config.sources` says whether given, from the recipe or built in), with the task that trains the model and
    the recipe (None: the built-in defaults) and its global batch."""

    config: TrainConfig
    task: Task
    recipe: Recipe | None
    recipe_global_batch: int | None


def resolve(config: TrainConfig) -> ResolvedRun:
    """`config` with its unset options filled in from its recipe (see `recipe_for`), else the built-in defaults,
    checked against its task; UserError for options its task does not take."""
    task = task_for_training(config.model, config.pretrained)
    recipe = recipe_for(config.model, config.recipe, task)
    settings = recipe.settings(config.model) if recipe is not None else {}
    resolved = config.resolved(recipe.name if recipe is not None else None, settings)
    task.check_config(resolved)
    return ResolvedRun(resolved, task, recipe, recipe.global_batch(config.model) if recipe is not None else None)
