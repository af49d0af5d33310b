"""Image classification: the digits or an ImageNet-style folder, any timm classifier, top-1/top-5; restored
from our weights files or an original release file."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.data import ImageNetInfo, Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..checkpoints.loading import load_pretrained_classifier, load_weights
from ..checkpoints.weights import read_state_dict
from ..config import TASK_TRAIN_OPTIONS, TaskOptions, TrainConfig, flag, option
from ..data.classification import DataSplits, build_datasets, collate_readable
from ..data.video import MOVING_DIGITS_NAME, holds_clips
from ..data.token_labels import TokenLabelledImages, TokenLabels, TokenTargets, image_keys
from ..errors import UserError
from ..runtime import DistEnv, all_reduce_sum, autocast
from .base import Objective, Prediction, Restored, Task, UnreadableImages, eval_batches
from .token_labelling import MixToken, TokenLabelledClassifier, TokenLabelLoss, TokenLabelOutputs, smoothed


@dataclass(frozen=True)
class ClassificationPredictOptions(TaskOptions):
    topk: int = option(5, "the classes shown per image, most probable first", least=1)


def _refuse_other_data(data: str) -> None:
    """UserError for data of another task's kind: scenes, clips."""
    if data == "digit-scenes":
        raise UserError("--data digit-scenes is a segmentation and detection data set; a classifier trains on "
                        "--data digits or a folder with train/<class>/* and val/<class>/*")
    if data == MOVING_DIGITS_NAME or holds_clips(data):
        raise UserError(f"--data {data} holds clips, and image classifiers take images: train a clip model "
                        "(biformer3d_tiny, or torchvision's swin3d_t, r3d_18, ...) on it")


class ClassificationTask(Task):
    name = "classification"
    default_data = "digits"
    reference_classes = 1000  # ImageNet
    # all but the clip and volume models' own
    train_options = TASK_TRAIN_OPTIONS - {"frames", "frame_stride", "short_clips", "spacing", "foreground"}
    PredictOptions = ClassificationPredictOptions
    metric = "val_top1"
    train_accuracy = "train_top1"
    collate = staticmethod(collate_readable)

    @classmethod
    def claims(cls, model_name: str) -> bool:
        return model_name in timm.list_models(model_name)

    @classmethod
    def model_forms(cls) -> str:
        return "any timm model (biformer_nano, biformer_tiny, ...)"

    def build_datasets(self, data: str, img_size: int, *, auto_augment: str | None = None,
                       random_erasing: float = 0.0, eval_only: bool = False,
                       normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> DataSplits:
        _refuse_other_data(data)
        return build_datasets(data, img_size, auto_augment=auto_augment, random_erasing=random_erasing,
                              eval_only=eval_only, normalization=normalization)

    def training_splits(self, config: TrainConfig, normalization: tuple[tuple[float, ...], tuple[float, ...]] | None
                        ) -> DataSplits:
        _refuse_other_data(config.data)
        return build_datasets(config.data, config.img_size, auto_augment=config.aa, random_erasing=config.reprob,
                              crop_scale=config.scale, hflip=config.hflip, normalization=normalization)

    def check_config(self, config: TrainConfig) -> None:
        super().check_config(config)
        if config.token_label is not None:
            if config.mixup > 0 or config.cutmix > 0:
                raise UserError("--mixup and --cutmix mix whole images, which token labels cannot follow; with "
                                "--token-label use --mixtoken (and --mixup 0 --cutmix 0)")
            return
        stray = [name for name in ("mixtoken", "token_label_weight") if config.sources.get(name, "default") != "default"]
        if stray:
            source = config.sources[stray[0]]
            raise UserError(f"{' and '.join(map(flag, stray))} ({source}) train with token labels: give --token-label "
                            "LABELS (made by `biformer label`)" + (", or leave them out" if source == "given" else ""))

    def build_model(self, config: TrainConfig, classes: Sequence[str]) -> nn.Module:
        model = built_with_model_kwargs(config, lambda: timm.create_model(
            config.model, num_classes=len(classes), drop_path_rate=config.drop_path or 0.0, **config.model_arguments()))
        if config.pretrained is not None:
            model.checkpoint_report = load_pretrained_classifier(model, config.pretrained, classes)
        return model if config.token_label is None else TokenLabelledClassifier(model, config.model)

    def training_set(self, splits: DataSplits, config: TrainConfig, model: nn.Module) -> Dataset:
        if config.token_label is None:
            return splits.train
        labels = TokenLabels(config.token_label)
        keys = image_keys(config.data, splits.train.images)
        labels.check_covers(keys, splits.classes, config.data)
        return TokenLabelledImages(splits.train, keys, labels, len(splits.classes), model.token_grid(config.img_size))

    def inference_model(self, model: nn.Module) -> nn.Module:
        return model.classifier if isinstance(model, TokenLabelledClassifier) else model

    def build_objective(self, config: TrainConfig, num_classes: int, model: nn.Module) -> Objective:
        if config.token_label is not None:
            return Objective(TokenLabelLoss(config.token_label_weight),
                             MixToken(model.token_grid(config.img_size)) if config.mixtoken else None,
                             smoothing=config.smoothing)
        if config.mixup > 0 or config.cutmix > 0:
            return Objective(SoftTargetCrossEntropy(), Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                                                             label_smoothing=config.smoothing, num_classes=num_classes))
        if config.smoothing > 0:
            return Objective(LabelSmoothingCrossEntropy(config.smoothing))
        return Objective(nn.CrossEntropyLoss())

    def prepare(self, images: Tensor, targets: Tensor | TokenTargets, objective: Objective
                ) -> tuple[Tensor, Tensor | TokenTargets, Tensor]:
        if isinstance(targets, TokenTargets):
            labels = targets.labels
            targets = TokenTargets(smoothed(labels, targets.tokens.shape[-1], objective.smoothing), targets.tokens)
            if objective.mixup is not None:
                images, targets = objective.mixup(images, targets)
            return images, targets, labels
        if objective.mixup is None:
            return images, targets, targets
        if len(images) % 2:  # mixup pairs images up
            images, targets = images[:-1], targets[:-1]
        mixed_images, mixed_targets = objective.mixup(images, targets)
        return mixed_images, mixed_targets, targets

    def loss(self, outputs: Tensor | TokenLabelOutputs, targets: Tensor | TokenTargets, objective: Objective) -> Tensor:
        if isinstance(outputs, TokenLabelOutputs):
            return objective.criterion(outputs, targets)
        return objective.criterion(outputs.float(), targets)

    def hits(self, outputs: Tensor | TokenLabelOutputs, targets: Tensor) -> tuple[float, float]:
        logits = outputs.logits if isinstance(outputs, TokenLabelOutputs) else outputs
        return (logits.argmax(1) == targets).sum().item(), len(targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, env: DistEnv, *, splits: DataSplits,
                 options: TaskOptions | None = None, amp: str = "none", desc: str = "val",
                 unreadable: UnreadableImages | None = None) -> dict[str, Any]:
        """Loss, top-1 and top-5 (percent)."""
        model.eval()

        def run(inputs: Tensor) -> Tensor:
            with autocast(env.device, amp):
                return model(inputs)

        totals = [0.0, 0.0, 0.0, 0.0]  # loss sum, top-1 hits, top-5 hits, count
        for inputs, targets in eval_batches(loader, env, desc, unreadable):
            log_probabilities = self.eval_log_probabilities(run, inputs)
            hits = log_probabilities.topk(min(5, log_probabilities.shape[1]), dim=1).indices == targets[:, None]
            totals[0] += F.nll_loss(log_probabilities, targets, reduction="sum").item()
            totals[1] += hits[:, 0].sum().item()
            totals[2] += hits.any(1).sum().item()
            totals[3] += len(targets)
        loss, top1, top5, count = all_reduce_sum(totals, env)
        if count == 0:
            raise UserError(f"no validation {self.input_noun} could be read")
        return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "count": int(count)}

    def eval_log_probabilities(self, run: Callable[[Tensor], Tensor], inputs: Tensor) -> Tensor:
        """(B, classes) float32 log-probabilities of a validation batch; run(x) gives the model's logits for x
        (under the evaluation's autocast)."""
        return run(inputs).float().log_softmax(-1)

    def metric_columns(self) -> tuple[str, ...]:
        return ("top1", "top5")

    def metadata(self, splits: DataSplits) -> dict[str, Any]:
        return {"crop_pct": splits.crop_pct}

    def summary(self, row: dict[str, Any], best: dict[str, Any], classes: list[str]) -> str:
        return f"final validation top-1: {row['val_top1']:.2f}% (best {best['val_top1']:.2f}% at {best['at']})"

    def reference_size(self, model_name: str) -> int:
        input_size = timm.models.get_pretrained_cfg_value(model_name, "input_size") or (3, 224, 224)
        return input_size[-1]

    def restored_model(self, model_name: str, metadata: dict[str, Any], img_size: int) -> nn.Module:
        return timm.create_model(model_name, num_classes=len(metadata["classes"]), **metadata.get("model_kwargs", {}))

    def restore(self, checkpoint: str | os.PathLike, metadata: dict[str, Any], model_name: str,
                img_size: int | None = None, **model_kwargs: Any) -> Restored:
        """Our .safetensors files (from `train` or `convert`) name their model, and our trainer's also carry
        classes and preprocessing; other files (e.g. an original release .pth) need `model_name`. They get
        timm's config for that model and as many classes as their classifier has (ImageNet's names for 1000).
        model_kwargs go to timm.create_model (e.g. padding)."""
        path = os.fspath(checkpoint)
        classes = metadata.get("classes")
        state_dict = read_state_dict(path)  # read once: it also gives the class count of files without metadata
        model_kwargs = {**metadata.get("model_kwargs", {}), **model_kwargs}  # as trained (--model-kwargs), then ours
        model = timm.create_model(model_name, num_classes=len(classes) if classes else _head_size(state_dict, model_name),
                                  **model_kwargs)
        try:
            load_weights(model, state_dict, path)
        except ValueError as error:
            raise UserError(f"--checkpoint {path!r} for --model {model_name}: {error}") from error
        if classes is None:
            count = model.num_classes
            classes = ImageNetInfo().label_names() if count == 1000 else [str(i) for i in range(count)]
        if "img_size" in metadata:
            size, mean, std, crop = metadata["img_size"], metadata["mean"], metadata["std"], metadata["crop_pct"]
        else:
            config = resolve_data_config({}, model=model)
            size, mean, std, crop = config["input_size"][-1], config["mean"], config["std"], config["crop_pct"]
        return Restored(self, model.eval(), model_name, list(classes), img_size or size, tuple(mean), tuple(std),
                        {**metadata, "crop_pct": crop}, classes_recorded="classes" in metadata)

    def report(self, result: dict[str, Any], restored: Restored, checkpoint: str) -> str:
        return (f"{checkpoint}: val_loss {result['loss']:.4f}  val_top1 {result['top1']:.2f}%  "
                f"val_top5 {result['top5']:.2f}%  ({result['count']} images)")

    @torch.no_grad()
    def predict(self, restored: Restored, images: Iterable[tuple[str, Any]], options: ClassificationPredictOptions,
                device: Any, outputs: dict[str, Path] | None) -> Iterator[Prediction]:
        """The top-k classes of each image with their probabilities."""
        transform = create_transform(restored.img_size, interpolation="bicubic",
                                     crop_pct=restored.metadata["crop_pct"], mean=restored.mean, std=restored.std)
        model = restored.model.to(device)
        k = min(options.topk, len(restored.classes))
        for path, image in images:
            top = model(transform(image)[None].to(device)).float().softmax(-1)[0].topk(k)
            yield Prediction(path, {"predictions": [
                {"class": restored.classes[i], "index": int(i), "probability": float(p)}
                for p, i in zip(top.values.tolist(), top.indices.tolist())]})

    def prediction_text(self, prediction: Prediction) -> str:
        return "\n".join([prediction.image] + [
            f"  {rank}. {entry['class']:<30} {100 * entry['probability']:6.2f}%"
            for rank, entry in enumerate(prediction.result["predictions"], 1)])


def built_with_model_kwargs(config: TrainConfig, build: Callable[[], nn.Module]) -> nn.Module:
    """build(), a constructor's refusal (TypeError, ValueError) of the --model-kwargs given turned into a one-line
    UserError naming them."""
    try:
        return build()
    except (TypeError, ValueError) as error:
        if not config.model_kwargs:
            raise
        raise UserError(f"--model-kwargs {' '.join(config.model_kwargs)}: {config.model} refused them: "
                        f"{str(error).splitlines()[0]}") from error


def _head_size(state_dict: dict[str, Tensor], model_name: str) -> int:
    """Output size of the classifier in a checkpoint without metadata (the model's default if absent)."""
    classifier = timm.models.get_pretrained_cfg_value(model_name, "classifier") or "head"
    default = timm.models.get_pretrained_cfg_value(model_name, "num_classes") or 1000
    head = state_dict.get(f"{classifier}.weight")
    return head.shape[0] if head is not None and head.ndim >= 1 else default
