"""`biformer label`: a teacher's top-k scores per cell of every training image, stored in shards (see
biformer.data.token_labels) for `biformer train --token-label`."""
from __future__ import annotations

import os
import sys
from dataclasses import fields
from typing import NamedTuple

import timm
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from ..data.images import readable_image
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
    if not timm.is_model(timm.models.split_model_name_tag(teacher)[0]):  # a name, or a name.pretrained_tag
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
        image, problem = readable_image(self.images[index])
        if image is None:
            return torch.zeros(3, self.size, self.size), (0, 0), problem
        return self.transform(image), (image.height, image.width), ""


def label_images(teacher_source: str, data: str, output: str | os.PathLike, *, teacher_model: str | None = None,
                 img_size: int | None = None, topk: int | None = None, batch_size: int = 32, shard_size: int = 1024,
                 workers: int = 0, device: str | None = None) -> dict[str, int]:
    """Run a teacher over every training image of `data` once and store its top-k scores per cell (see
    biformer.data.token_labels), shard by shard: a shard already written is skipped, so an interrupted run
    resumes; under torchrun process r of w labels shards r, r + w, ... on its own GPU. topk: the classes kept per
    cell (None: 5, or all where there are fewer). Returns counts of images and shards."""
    from ..data.classification import build_datasets
    from ..runtime import resolve_device

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if data == "digit-scenes":
        raise UserError("--data digit-scenes is a dense data set; label --data digits or a folder with train/<class>/*")
    splits = build_datasets(data, 32)
    teacher = load_teacher(teacher_source, teacher_model, img_size)
    if teacher.classes is not None and teacher.classes != splits.classes:
        raise UserError(f"--teacher {teacher_source!r} knows the classes {teacher.classes[:5]}..., --data {data!r} "
                        f"has {splits.classes[:5]}...: the teacher must classify the data's classes")
    run_device = resolve_device(device, int(os.environ.get("LOCAL_RANK", 0)))
    model = teacher.model.to(run_device).eval()
    probe = dense_scores(model, torch.zeros(1, 3, teacher.size, teacher.size, device=run_device), teacher.name,
                         check=True)  # (1, G, G, C); refuses a head without a per-cell meaning
    grid, count = tuple(int(side) for side in probe.shape[1:3]), probe.shape[-1]
    if teacher.classes is None and count != len(splits.classes):
        raise UserError(f"--teacher {teacher_source!r} has {count} classes, --data {data!r} {len(splits.classes)}")
    stride = (getattr(model, "feature_info", None) or [{}])[-1].get("reduction")
    if stride and teacher.size % stride:  # cells then cover unequal parts of the image (the last one padding)
        raise UserError(f"--img-size {teacher.size} is not a multiple of {teacher.name}'s stride {stride}: its map's "
                        f"cells would not cover equal parts of the image; give a multiple of {stride}")
    topk = min(5, len(splits.classes)) if topk is None else topk  # LV-ViT keeps 5
    if topk > len(splits.classes):
        raise UserError(f"--topk {topk} exceeds the {len(splits.classes)} classes of --data {data!r}")
    manifest = LabelsManifest(teacher_source, teacher.name, teacher.size, data, list(splits.classes), topk, grid,
                              shard_size, image_keys(data, splits.train.images))
    folder = output_folder(output, "--output")
    if (folder / MANIFEST).exists():
        found = LabelsManifest.read(folder, "--output")
        if found != manifest:
            changed = [spec.name for spec in fields(manifest) if getattr(found, spec.name) != getattr(manifest, spec.name)]
            raise UserError(f"--output {os.fspath(output)!r} holds labels made otherwise ({', '.join(changed)} "
                            "differ); choose another folder, or rerun with the same settings to finish it")
    elif rank == 0:
        manifest.write(folder)
    todo = [shard for shard in range(rank, manifest.shard_count, world) if not (folder / shard_name(shard)).is_file()]
    # one loader over every shard to do (its workers start once), in batches that never cross a shard, so that a
    # shard's numbers do not depend on which shards were done before
    batches = [list(rows[start:start + batch_size]) for shard in todo
               for rows in [range(shard * shard_size, min((shard + 1) * shard_size, len(manifest.keys)))]
               for start in range(0, len(rows), batch_size)]
    loader = DataLoader(_LabellingInputs(splits.train.images, teacher.size, teacher.mean, teacher.std),
                        batch_sampler=batches, num_workers=workers)
    total = sum(len(batch) for batch in batches)
    parts: dict[str, list[Tensor]] = {"scores": [], "indices": [], "sizes": []}
    unreadable, done = 0, 0
    with progress(total=total, desc="labelling", unit="img", file=sys.stdout) as bar:
        heartbeat = Heartbeat()
        for batch, (images, (heights, widths), problems) in zip(batches, loader):
            top = dense_scores(model, images.to(run_device), teacher.name).topk(topk, dim=-1)
            readable = torch.tensor([not problem for problem in problems])
            parts["scores"].append(top.values.cpu() * readable[:, None, None, None])
            parts["indices"].append(top.indices.cpu() * readable[:, None, None, None])
            parts["sizes"].append(torch.stack([heights, widths], 1) * readable[:, None])
            unreadable += int((~readable).sum())
            for problem in filter(None, problems):
                tqdm.write(f"warning: skipping unreadable image {problem}", file=sys.stderr)
            done += len(batch)
            shard = batch[0] // shard_size
            if batch[-1] + 1 == min((shard + 1) * shard_size, len(manifest.keys)):  # the shard's last batch
                write_shard(folder / shard_name(shard), *(torch.cat(parts[name]) for name in parts))
                parts = {name: [] for name in parts}
            bar.update(len(batch))
            heartbeat(lambda: f"labelling: {done}/{total} images")
    return {"images": len(manifest.keys), "shards": manifest.shard_count, "labelled_now": total,
            "unreadable": unreadable, "missing_shards": len(manifest.missing_shards(folder))}
