"""Video classification: clip models (biformer3d_*, torchvision's video classifiers such as swin3d_t and r3d_18)
on the moving digits or class folders of clips; top-1/top-5 over one or several views per clip.

Shape legend: B clips, V views per clip, T frames, H/W frame height/width. Training batches are (B, 3, T, H, W);
evaluation batches (B, V, 3, T, H, W), each clip's class probabilities averaged over its views.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import timm
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..config import TaskOptions, TrainConfig, option
from ..data.video import (
    MOVING_DIGITS_NAME,
    VIDEO_EXTENSIONS,
    ClipSampling,
    ClipSplits,
    ClipTransform,
    UnreadableClip,
    build_clip_datasets,
    is_clip,
    read_frames,
)
from ..data.images import list_inputs
from ..errors import UserError
from ..models.biformer import CLIP_FRAMES
from ..runtime import DistEnv
from .base import Prediction, Restored, Task, UnreadableImages, UnreadableInput
from .classification import ClassificationPredictOptions, ClassificationTask, built_with_model_kwargs

CLIP_MODEL_PREFIX = "biformer3d_"
VIEWS_HELP = "clips sampled per video, their starts spread evenly over it; the class probabilities are averaged"


@cache
def torchvision_video_models() -> tuple[str, ...]:
    """torchvision's video classifiers (swin3d_t, r3d_18, mvit_v2_s, ...)."""
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models.video))


def is_clip_model_name(model_name: str) -> bool:
    """Whether `model_name` is a clip model: one of ours (biformer3d_*) or a torchvision video classifier."""
    return (model_name.startswith(CLIP_MODEL_PREFIX) and timm.is_model(model_name)) or \
        model_name in torchvision_video_models()


def create_clip_model(model_name: str, num_classes: int, drop_path_rate: float = 0.0, **kwargs: Any) -> nn.Module:
    """A clip model with random weights: ours from timm, torchvision's from its builders (with stochastic depth
    `drop_path_rate` where the architecture has it; UserError for a rate or keyword arguments it cannot take)."""
    if model_name.startswith(CLIP_MODEL_PREFIX):
        return timm.create_model(model_name, num_classes=num_classes, drop_path_rate=drop_path_rate, **kwargs)
    import torchvision

    from torchvision.ops import StochasticDepth

    if kwargs:
        raise UserError(f"--model-kwargs are for biformer3d_* models; {model_name} is built as torchvision defines it")
    model = torchvision.models.get_model(model_name, num_classes=num_classes)
    # the builders fix a stochastic depth of their own (swin3d_t: 0.1 at the last block, rising linearly to it):
    # rescaled so that the last block drops paths at drop_path_rate, as timm's models do
    depths = [module for module in model.modules() if isinstance(module, StochasticDepth)]
    if drop_path_rate and not depths:
        raise UserError(f"--drop-path: {model_name} has no stochastic depth; leave it out")
    deepest = max((module.p for module in depths), default=0.0)
    for module in depths:
        module.p = module.p * drop_path_rate / deepest if deepest else 0.0
    return model


@dataclass(frozen=True)
class VideoEvalOptions(TaskOptions):
    views: int = option(1, VIEWS_HELP, least=1)


@dataclass(frozen=True)
class VideoPredictOptions(ClassificationPredictOptions):
    views: int = option(1, VIEWS_HELP, least=1)


class VideoTask(ClassificationTask):
    """Classification of clips: the loss, training accuracy and top-k text are classification's; the data, the
    models and the multi-view evaluation are the clips' own."""

    name = "video"
    default_data = MOVING_DIGITS_NAME
    reference_classes = 400  # Kinetics-400
    train_options = frozenset({"frames", "frame_stride", "short_clips", "smoothing", "model_kwargs", "mean", "std"})
    EvalOptions = VideoEvalOptions
    PredictOptions = VideoPredictOptions
    input_noun = "clip"

    @classmethod
    def claims(cls, model_name: str) -> bool:
        return is_clip_model_name(model_name)

    @classmethod
    def model_forms(cls) -> str:
        return f"biformer3d_* or torchvision's video classifiers ({', '.join(torchvision_video_models())})"

    def build_datasets(self, data: str, img_size: int, *, auto_augment: str | None = None,
                       random_erasing: float = 0.0, eval_only: bool = False,
                       normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> ClipSplits:
        """The clip splits with the default sampling (`training_splits` and `evaluation_splits` pass their own)."""
        return build_clip_datasets(data, img_size, ClipSampling(), eval_only=eval_only, normalization=normalization)

    def training_splits(self, config: TrainConfig, normalization: tuple[tuple[float, ...], tuple[float, ...]] | None
                        ) -> ClipSplits:
        return build_clip_datasets(config.data, config.img_size, ClipSampling(config.frames, config.frame_stride),
                                   normalization=normalization, short_rule=config.short_clips)

    def evaluation_splits(self, data: str, restored: Restored, options: VideoEvalOptions,
                          normalization: tuple[tuple[float, ...], tuple[float, ...]] | None) -> ClipSplits:
        return build_clip_datasets(data, restored.img_size, self.sampling(restored.metadata, options.views),
                                   eval_only=True, normalization=normalization,
                                   short_rule=restored.metadata["short_clips"])

    @staticmethod
    def sampling(metadata: dict[str, Any], views: int) -> ClipSampling:
        """The training's sampling, as a weights file records it, with `views` views per clip."""
        short = metadata["short_clips"] if metadata["short_clips"] != "refuse" else "loop"
        return ClipSampling(metadata["frames"], metadata["frame_stride"], views, short)

    def build_model(self, config: TrainConfig, classes: Sequence[str]) -> nn.Module:
        from ..checkpoints.loading import load_pretrained_classifier

        model = built_with_model_kwargs(config, lambda: create_clip_model(
            config.model, len(classes), config.drop_path or 0.0, **config.model_arguments()))
        if config.pretrained is not None:
            if not config.model.startswith(CLIP_MODEL_PREFIX):
                raise UserError(f"--pretrained starts biformer3d_* models (from a clip model's or an image "
                                f"classifier's weights, inflated); {config.model} trains from scratch here")
            model.checkpoint_report = load_pretrained_classifier(model, config.pretrained, classes)
        return model

    def evaluate(self, model: nn.Module, loader: DataLoader, env: DistEnv, *, splits: ClipSplits,
                 options: TaskOptions | None = None, amp: str = "none", desc: str = "val",
                 unreadable: UnreadableImages | None = None) -> dict[str, Any]:
        """Loss (of the views' mean probabilities), top-1 and top-5 (percent), and the views per clip."""
        return {**super().evaluate(model, loader, env, splits=splits, options=options, amp=amp, desc=desc,
                                   unreadable=unreadable), "views": splits.sampling.views}

    def eval_log_probabilities(self, run: Callable[[Tensor], Tensor], views: Tensor) -> Tensor:
        """The log of each clip's class probabilities averaged over its views (B, V, 3, T, H, W)."""
        probabilities = run(views.flatten(0, 1)).float().softmax(-1).unflatten(0, views.shape[:2]).mean(1)
        return probabilities.clamp_min(1e-12).log()

    def metadata(self, splits: ClipSplits) -> dict[str, Any]:
        return {"crop_pct": splits.crop_pct, "frames": splits.sampling.frames, "frame_stride": splits.sampling.stride,
                "short_clips": splits.sampling.short}

    def reference_size(self, model_name: str) -> int:
        return super().reference_size(model_name) if model_name.startswith(CLIP_MODEL_PREFIX) else 224

    def reference_frames(self, model_name: str) -> int:
        """The frames of the clips a model is measured on without a count given."""
        return CLIP_FRAMES.get(model_name, 16)

    def input_size(self, model: nn.Module, model_name: str, size: tuple[int, int], frames: int | None
                   ) -> tuple[int, tuple[int, ...]]:
        return 3, (frames or self.reference_frames(model_name), *size)

    def restored_model(self, model_name: str, metadata: dict[str, Any], img_size: int) -> nn.Module:
        return create_clip_model(model_name, len(metadata["classes"]), **metadata.get("model_kwargs", {}))

    def restore(self, checkpoint: str | os.PathLike, metadata: dict[str, Any], model_name: str,
                img_size: int | None = None, **model_kwargs: Any) -> Restored:
        if model_kwargs:
            metadata = {**metadata, "model_kwargs": {**metadata.get("model_kwargs", {}), **model_kwargs}}
        if "frames" not in metadata:
            raise UserError(f"--checkpoint {os.fspath(checkpoint)!r} records no clip sampling: video models are "
                            "restored from the .safetensors files that `biformer train` writes")
        return Task.restore(self, checkpoint, metadata, model_name, img_size)

    def report(self, result: dict[str, Any], restored: Restored, checkpoint: str) -> str:
        return (f"{checkpoint}: val_loss {result['loss']:.4f}  val_top1 {result['top1']:.2f}%  "
                f"val_top5 {result['top5']:.2f}%  ({result['count']} clips, {result['views']} view(s) each)")

    def list_inputs(self, inputs: list[str]) -> list[str]:
        """Video files and folders of frames, named or found in the folders named (a folder that holds frames
        is one clip)."""
        return list_inputs(inputs, lambda path: path.suffix.lower() in VIDEO_EXTENSIONS or (path.is_dir() and is_clip(path)),
                           f"a video file ({', '.join(VIDEO_EXTENSIONS)})", "clips (video files or folders of frames)",
                           named=is_clip)

    def read_input(self, path: str) -> Any:
        try:
            return read_frames(path)
        except UnreadableClip as error:
            raise UnreadableInput(str(error).removeprefix(f"{path}: ")) from error

    @torch.no_grad()
    def predict(self, restored: Restored, images: Iterable[tuple[str, Any]], options: VideoPredictOptions,
                device: Any, outputs: dict[str, Path] | None) -> Iterator[Prediction]:
        """The top-k classes of each clip with their probabilities (averaged over `options.views` views)."""
        sampling = self.sampling(restored.metadata, options.views)
        transform = ClipTransform(restored.img_size, restored.mean, restored.std, training=False,
                                  crop_pct=restored.metadata["crop_pct"])
        model = restored.model.to(device)
        k = min(options.topk, len(restored.classes))
        for path, frames in images:
            views = torch.stack([transform([frames[i] for i in sampling.indices(len(frames), start)])
                                 for start in sampling.view_starts(len(frames))])  # (V, 3, T, H, W)
            top = model(views.to(device)).float().softmax(-1).mean(0).topk(k)
            yield Prediction(path, {"predictions": [
                {"class": restored.classes[i], "index": int(i), "probability": float(p)}
                for p, i in zip(top.values.tolist(), top.indices.tolist())], "views": len(views)})
