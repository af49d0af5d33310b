"""Hub-ready folders: an image classifier's weights file as the folder timm's hub format holds (`config.json` with
the architecture, the classes and the preprocessing; `model.safetensors`; a `README.md` model card), so that

    import biformer, timm  # biformer registers its models with timm
    model = timm.create_model("local-dir:FOLDER", pretrained=True)

rebuilds the model with its weights, `timm.data.resolve_data_config(model=model)` its preprocessing, and
`huggingface_hub.upload_folder(repo_id=..., folder_path=FOLDER)` publishes it as `timm.models.push_to_hf_hub` would.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OutputError, UserError
from .files import check_writable, current_umask

HUB_FILES = ("config.json", "model.safetensors", "README.md")
DEFAULT_LICENSE = "mit"  # the project's; the weights' own licence is the trainer's to state (--license)


@dataclass(frozen=True)
class HubCard:
    """What the model card states, each figure from the weights file or computed from the model."""

    model_name: str
    classes: list[str]
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    parameters: int
    multiply_adds: int  # one image at img_size, the paper's convention (computed)
    license: str
    data: str | None  # the training data as `biformer train --data` named it (None: the file does not record it)
    metric: str | None  # e.g. "val_top1" (None: the file records no validation)
    value: float | None
    epoch: int | None
    pretrained: str | None  # the file it was fine-tuned from

    def text(self, folder_name: str) -> str:
        classes = ", ".join(self.classes[:10]) + (f", ... ({len(self.classes)} in all)" if len(self.classes) > 10 else "")
        metric = (f"{self.metric} {self.value:.2f} after epoch {self.epoch}" if self.metric and self.value is not None
                  else "not recorded in the source weights file")
        return "\n".join([
            "---",
            "tags: [image-classification, timm, biformer]",
            "library_name: timm",
            f"license: {self.license}",
            "---",
            f"# {folder_name}: {self.model_name}",
            "",
            f"A `{self.model_name}` image classifier (BiFormer: vision transformer with bi-level routing attention, "
            "CVPR 2023) trained with `biformer train`.",
            "",
            "| | |",
            "| --- | --- |",
            f"| parameters | {self.parameters / 1e6:.2f} M |",
            f"| GMACs at {self.img_size}x{self.img_size} (computed) | {self.multiply_adds / 1e9:.3f} |",
            f"| input | {self.img_size}x{self.img_size} RGB, crop_pct {self.crop_pct}, mean {list(self.mean)}, "
            f"std {list(self.std)} |",
            f"| classes | {classes} |",
            f"| training data | {self.data or 'not recorded in the source weights file'} |",
            f"| validation | {metric} |",
            *([f"| fine-tuned from | {self.pretrained} |"] if self.pretrained else []),
            f"| licence | {self.license} |",
            "",
            "## Use",
            "",
            "```python",
            "import biformer, timm  # importing biformer registers its models with timm",
            f'model = timm.create_model("local-dir:{folder_name}", pretrained=True).eval()',
            "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))",
            "```",
            "",
        ])


def hub_card(restored: Any, license: str) -> HubCard:
    """The card of a restored classifier (a `biformer.tasks.base.Restored`)."""
    from .analysis.flops import total_multiply_adds

    metadata, model = restored.metadata, restored.model
    metric = restored.task.metric if restored.task.metric in metadata else None
    pretrained = metadata.get("pretrained", {}).get("path")
    return HubCard(restored.model_name, list(restored.classes), restored.img_size, tuple(restored.mean),
                   tuple(restored.std), float(metadata.get("crop_pct", 1.0)), sum(p.numel() for p in model.parameters()),
                   total_multiply_adds(model, (restored.img_size, restored.img_size)), license, metadata.get("data"),
                   metric, metadata.get(metric) if metric else None, metadata.get("epoch"), pretrained)


def check_hub_target(folder: str | os.PathLike) -> Path:
    """The folder to write, checked before any work: OutputError if it is a file, a folder with files in it, or
    in a folder that does not exist or cannot be written."""
    target = Path(os.path.expanduser(os.fspath(folder)))
    if target.is_file():
        raise OutputError(f"output {os.fspath(folder)!r} is a file; a hub folder needs a new folder name")
    if target.is_dir() and any(target.iterdir()):
        raise OutputError(f"output {os.fspath(folder)!r} already holds files; choose a new folder or remove it")
    parent = target.absolute().parent
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"output {os.fspath(folder)!r} lies inside the file {os.fspath(parent)!r}; choose a folder")
    check_writable(target, "output")  # its folder exists and takes new files
    return target


def write_hub_folder(restored: Any, folder: str | os.PathLike, license: str = DEFAULT_LICENSE) -> HubCard:
    """Write `restored` (an image classifier) as a hub folder at `folder`, atomically: the files are written into
    a temporary folder beside it, which then takes its name. UserError for a model of another task."""
    from timm.models import save_for_hf

    if restored.task.name != "classification":
        raise UserError(f"timm's hub format holds image classifiers; {restored.model_name!r} is a "
                        f"{restored.task.name} model: export it with --format onnx, torchscript or exported")
    target = check_hub_target(folder)
    card = hub_card(restored, license)
    data_config = {"input_size": (3, card.img_size, card.img_size), "mean": card.mean, "std": card.std,
                   "crop_pct": card.crop_pct, "interpolation": "bicubic"}
    building = Path(tempfile.mkdtemp(dir=target.absolute().parent, prefix=f".tmp-{target.name}-"))
    try:
        # the tag and licence of the architecture's release weights are not these weights'
        save_for_hf(restored.model, building, model_config={"label_names": card.classes, "pretrained_cfg": {
                        "tag": "biformer-train", "license": license}},
                    model_args=restored.metadata.get("model_kwargs") or None, safe_serialization=True,
                    data_config=data_config)
        (building / "README.md").write_text(card.text(target.name), encoding="utf-8")
        umask = current_umask()  # mkdtemp's folder (and the weights file written in it) are private: make them as new
        building.chmod(0o777 & ~umask)
        for file in building.iterdir():
            file.chmod(0o666 & ~umask)
        with contextlib.suppress(FileNotFoundError):
            target.rmdir()  # empty (checked): the rename takes its place
        os.replace(building, target)
    except BaseException as error:
        shutil.rmtree(building, ignore_errors=True)
        if isinstance(error, OSError) and not isinstance(error, OutputError):
            raise OutputError(f"cannot write {os.fspath(folder)!r}: {error.strerror or error}") from error
        raise
    return card
