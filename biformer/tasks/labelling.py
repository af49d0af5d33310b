"""`biformer label`: a teacher's top-k scores per cell of every training image, stored in shards (see
biformer.data.token_labels) for `biformer train --token-label`."""
from __future__ import annotations

import os
import sys
from typing import NamedTuple

import timm
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms
from tqdm import tqdm

from ..data.images import UNREADABLE_ERRORS, open_rgb
from ..data.token_labels import MANIFEST, LabelsManifest, image_keys, shard_name, write_shard
from ..errors import UserError
from ..files import output_folder
from ..progress import Heartbeat, progress
from .registry import restore
from .token_labelling import dense_scores
class Teacher(NamedTuple):
    model: nn.Module
    name: str  # the model's
    classes: list[str] | None  # None: not recorded (a timm model's)
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_teacher(teacher: str, model_name: str | None, img_size: int | None) -> Teacher:
    """A classifier to label with: a weights file (ours, or a release .pth with model_name), or a timm model name
    with timm's pretrained weights (which timm downloads once)."""
    if os.path.isfile(teacher):
        restored = restore(teacher, model_name)
        if restored.task.name != "classification":
            raise UserError(f"--teacher {teacher!r} holds a {restored.task.name} model; label with a classifier")
        return Teacher(restored.model, restored.model_name, restored.classes if restored.classes_recorded else None,
                       img_size or restored.img_size, restored.mean, restored.std)
    if not timm.list_models(teacher):
        raise UserError(f"--teacher {teacher!r} is neither a weights file nor a timm model name")
    try:
        model = timm.create_model(teacher, pretrained=True)
    except Exception as error:  # timm's download: no network, no such pretrained tag, a hub error
        raise UserError(f"--teacher {teacher}: timm could not load its pretrained weights ({error}); give a weights "
                        "file instead") from error
    config = timm.data.resolve_data_config({}, model=model)
    return Teacher(model.eval(), teacher, None, img_size or config["input_size"][-1], tuple(config["mean"]),
                   tuple(config["std"]))


class _LabellingInputs(Dataset):
    """(teacher input, (height, width), problem) per image: the whole image resized to the teacher's square."""

    def __init__(self, images: list, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.images = images
        self.transform = transforms.Compose([
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(), transforms.Normalize(mean, std)])
        self.size = size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, tuple[int, int], str]:
        image = self.images[index]
        if not isinstance(image, Image.Image):
            try:
                image = open_rgb(image)
            except UNREADABLE_ERRORS as error:
                return torch.zeros(3, self.size, self.size), (0, 0), f"{self.images[index]}: {error}"
        return self.transform(image), (image.height, image.width), ""


def label_images(teacher_source: str, data: str, output: str | os.PathLike, *, teacher_model: str | None = None,
                 img_size: int | None = None, topk: int | None = None, batch_size: int = 32, shard_size: int = 1024,
                 workers: int = 0, device: str | None = None) -> dict[str, int]:
    """Run a teacher over every training image of `data` once and store its top-k scores per cell (see
    biformer.data.token_labels), shard by shard: a shard already written is skipped, so an interrupted run
    resumes; under torchrun process r of w labels shards r, r + w, ... topk: the classes kept per cell (None: 5,
    or all where there are fewer). Returns counts of images and shards."""
    from ..data.classification import build_datasets
    from ..runtime import resolve_device

    env_rank, env_world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if data == "digit-scenes":
        raise UserError("--data digit-scenes is a dense data set; label --data digits or a folder with train/<class>/*")
    splits = build_datasets(data, 32)
    teacher = load_teacher(teacher_source, teacher_model, img_size)
    if teacher.classes is not None and teacher.classes != splits.classes:
        raise UserError(f"--teacher {teacher_source!r} knows the classes {teacher.classes[:5]}..., --data {data!r} "
                        f"has {splits.classes[:5]}...: the teacher must classify the data's classes")
    count = teacher.model.get_classifier().out_features if isinstance(teacher.model.get_classifier(), nn.Linear) else 0
    if teacher.classes is None and count != len(splits.classes):
        raise UserError(f"--teacher {teacher_source!r} has {count} classes, --data {data!r} {len(splits.classes)}")
    topk = min(5, len(splits.classes)) if topk is None else topk  # LV-ViT keeps 5
    if topk > len(splits.classes):
        raise UserError(f"--topk {topk} exceeds the {len(splits.classes)} classes of --data {data!r}")
    run_device = resolve_device(device)
    model = teacher.model.to(run_device).eval()
    probe = torch.zeros(1, 3, teacher.size, teacher.size, device=run_device)
    grid = tuple(int(side) for side in dense_scores(model, probe, teacher.name, check=True).shape[1:3])
    manifest = LabelsManifest(teacher_source, teacher.name, teacher.size, data, list(splits.classes), topk, grid,
                              shard_size, image_keys(data, splits.train.images))
    folder = output_folder(output, "--output")
    if (folder / MANIFEST).exists():
        found = LabelsManifest.read(folder, "--output")
        if found != manifest:
            changed = [name for name in ("teacher", "teacher_model", "teacher_size", "data", "classes", "topk", "grid",
                                         "shard_size", "keys") if getattr(found, name) != getattr(manifest, name)]
            raise UserError(f"--output {os.fspath(output)!r} holds labels made otherwise ({', '.join(changed)} "
                            "differ); choose another folder, or rerun with the same settings to finish it")
    elif env_rank == 0:
        manifest.write(folder)
    todo = [shard for shard in range(env_rank, manifest.shard_count, env_world)
            if not (folder / shard_name(shard)).is_file()]
    inputs = _LabellingInputs(splits.train.images, teacher.size, teacher.mean, teacher.std)
    total = sum(len(manifest.shard_keys(shard)) for shard in todo)
    unreadable, checked = 0, False
    with progress(total=total, desc="labelling", unit="img", file=sys.stdout) as bar:
        heartbeat = Heartbeat()
        for shard in todo:
            rows = range(shard * shard_size, min((shard + 1) * shard_size, len(manifest.keys)))
            loader = DataLoader(Subset(inputs, rows), batch_size=batch_size, num_workers=workers)
            scores, indices, sizes = [], [], []
            for images, (heights, widths), problems in loader:
                probabilities = dense_scores(model, images.to(run_device), teacher.name, check=not checked).cpu()
                checked = True
                top = probabilities.topk(topk, dim=-1)
                readable = torch.tensor([not problem for problem in problems])
                scores.append(top.values * readable[:, None, None, None])
                indices.append(top.indices * readable[:, None, None, None])
                sizes.append(torch.stack([heights, widths], 1) * readable[:, None])
                unreadable += int((~readable).sum())
                for problem in filter(None, problems):
                    tqdm.write(f"warning: skipping unreadable image {problem}", file=sys.stderr)
                bar.update(len(problems))
                heartbeat(lambda: f"labelling: {bar.n}/{total} images")
            write_shard(folder / shard_name(shard), torch.cat(scores), torch.cat(indices), torch.cat(sizes))
    return {"images": len(manifest.keys), "shards": manifest.shard_count, "labelled_now": total,
            "unreadable": unreadable, "missing_shards": len(manifest.missing_shards(folder))}
