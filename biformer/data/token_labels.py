"""Token labels (LV-ViT's token labelling, "All Tokens Matter", NeurIPS 2021): a teacher's score map of every
training image, stored compactly, and cropped and flipped with the image so that each of the student's final
tokens is supervised with the teacher's classes of the pixels it covers.

A labels folder (written by `biformer label`, read by `biformer train --token-label`):

    labels.json              what the labels are: teacher, data, classes, top-k, grid, shard size, image keys
    shard-00000.safetensors  the images of one shard, in key order:
        scores   (n, G, G, k) float16  the teacher's k most probable classes' probabilities in each cell
        indices  (n, G, G, k) int32    those classes
        sizes    (n, 2) int32          the image's (height, width) when it was labelled; (0, 0): it was unreadable

Cell (i, j) of the G x G map covers rows [i H / G, (i + 1) H / G) and columns [j W / G, (j + 1) W / G) of the
whole H x W image: the teacher sees the whole image resized to a square, nothing cropped away.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms

from ..errors import UserError
from ..files import atomic_output, read_json
from .classification import ImageListDataset
from .images import readable_image

MANIFEST = "labels.json"
FORMAT = "biformer-token-labels"
VERSION = 1


def image_keys(data: str, images: Sequence[Any]) -> list[str]:
    """A name for each training image that outlives the process: "digits/<index>" for the bundled digits, else
    the image file's path under <data>/train, with "/" separators."""
    if data == "digits":
        return [f"digits/{index}" for index in range(len(images))]
    root = Path(data) / "train"
    return [Path(image).relative_to(root).as_posix() for image in images]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@dataclass(frozen=True)
class LabelsManifest:
    """labels.json: what a labels folder holds."""

    teacher: str  # the checkpoint or timm name given to `biformer label`
    teacher_model: str
    teacher_size: int  # the side of the square the teacher saw each image resized to
    data: str
    classes: list[str]
    topk: int
    grid: tuple[int, int]  # (G rows, G columns) of every score map
    shard_size: int
    keys: list[str]  # every training image, in the data set's order

    @property
    def shard_count(self) -> int:
        return -(-len(self.keys) // self.shard_size)

    def shard_keys(self, shard: int) -> list[str]:
        return self.keys[shard * self.shard_size:(shard + 1) * self.shard_size]

    def as_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self), "grid": list(self.grid)}

    def write(self, folder: Path) -> None:
        with atomic_output(folder / MANIFEST) as temp:
            temp.write_text(json.dumps(self.as_json(), indent=1))

    @classmethod
    def read(cls, folder: str | os.PathLike, option: str) -> LabelsManifest:
        path = Path(folder) / MANIFEST
        if not Path(folder).is_dir():
            raise UserError(f"{option} {os.fspath(folder)!r} is no folder; make the labels with `biformer label`")
        value = read_json(path, "token labels manifest", "the labels.json that `biformer label` writes")
        if not isinstance(value, dict) or value.get("format") != FORMAT:
            raise UserError(f"{option} {os.fspath(folder)!r}: {path} is not a token labels manifest")
        if value.get("version") != VERSION:
            raise UserError(f"{option} {os.fspath(folder)!r}: labels version {value.get('version')} is not "
                            f"{VERSION}; label the data again with this version's `biformer label`")
        missing = [key for key in cls.__dataclass_fields__ if key not in value]
        if missing:
            raise UserError(f"{option} {os.fspath(folder)!r}: {path} lacks {', '.join(missing)}; label the data again")
        fields = {key: value[key] for key in cls.__dataclass_fields__}
        return cls(**{**fields, "grid": tuple(fields["grid"])})

    def missing_shards(self, folder: Path) -> list[int]:
        return [shard for shard in range(self.shard_count) if not (folder / shard_name(shard)).is_file()]


def write_shard(path: Path, scores: Tensor, indices: Tensor, sizes: Tensor) -> None:
    """One shard, atomically: a shard is either whole or absent, so an interrupted run resumes at a shard."""
    with atomic_output(path) as temp:
        save_file({"scores": scores.to(torch.float16).contiguous(), "indices": indices.to(torch.int32).contiguous(),
                   "sizes": sizes.to(torch.int32).contiguous()}, temp)


class TokenLabels:
    """The labels of a folder, read image by image (each process opens the shards it reads, memory-mapped)."""

    def __init__(self, folder: str | os.PathLike, option: str = "--token-label") -> None:
        self.folder, self.option = Path(folder), option
        self.manifest = LabelsManifest.read(folder, option)
        missing = self.manifest.missing_shards(self.folder)
        if missing:
            raise UserError(f"{option} {os.fspath(folder)!r} is incomplete: {len(missing)} of "
                            f"{self.manifest.shard_count} shards are missing (first {shard_name(missing[0])}); run "
                            "the same `biformer label` command again to finish it")
        self.rows = {key: (index // self.manifest.shard_size, index % self.manifest.shard_size)
                     for index, key in enumerate(self.manifest.keys)}
        self._open: dict[int, Any] = {}
        self._pid = os.getpid()

    def check_covers(self, keys: Sequence[str], classes: Sequence[str], data: str) -> None:
        """UserError unless the labels hold every one of `keys` for these classes."""
        where = f"{self.option} {os.fspath(self.folder)!r}"
        if list(classes) != list(self.manifest.classes):
            raise UserError(f"{where} labels the classes {self.manifest.classes[:5]}... of --data "
                            f"{self.manifest.data!r}, not --data {data!r}'s {list(classes)[:5]}...; label this data "
                            "set with `biformer label`")
        missing = [key for key in keys if key not in self.rows]
        if missing:
            raise UserError(f"{where} has no labels for {len(missing)} of the {len(keys)} training images (first "
                            f"{missing[0]!r}); label --data {data!r} again with `biformer label`")

    def _shard(self, shard: int) -> Any:
        if self._pid != os.getpid():  # a DataLoader worker: handles do not cross a fork
            self._open, self._pid = {}, os.getpid()
        if shard not in self._open:
            path = self.folder / shard_name(shard)
            try:
                self._open[shard] = safe_open(os.fspath(path), "pt")
            except (SafetensorError, OSError) as error:
                raise UserError(f"{self.option}: cannot read {path}: {error}; delete it and run `biformer label` "
                                "again to remake it") from error
        return self._open[shard]

    def read(self, key: str) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """(scores (G, G, k), indices (G, G, k), (height, width)) of one image."""
        shard, row = self.rows[key]
        file = self._shard(shard)
        size = file.get_slice("sizes")[row:row + 1][0].tolist()
        return (file.get_slice("scores")[row:row + 1][0].float(), file.get_slice("indices")[row:row + 1][0].long(),
                (int(size[0]), int(size[1])))


def dense_map(scores: Tensor, indices: Tensor, num_classes: int) -> Tensor:
    """(G, G, C) class distributions from top-k ones: the k classes' probabilities, renormalized to sum to 1 (the
    classes outside the top k get 0)."""
    dense = torch.zeros(*scores.shape[:-1], num_classes).scatter_(-1, indices, scores)
    return dense / dense.sum(-1, keepdim=True).clamp_min(1e-12)


def overlap_weights(start: float, length: float, tokens: int, extent: float, cells: int) -> Tensor:
    """(tokens, cells): the share of token t's interval that lies in cell c, where the interval [start, start +
    length) of an axis of `extent` pixels is split evenly into `tokens` and the axis evenly into `cells`."""
    token_edges = start + length * torch.arange(tokens + 1, dtype=torch.float64) / tokens
    cell_edges = extent * torch.arange(cells + 1, dtype=torch.float64) / cells
    low = torch.maximum(token_edges[:-1, None], cell_edges[None, :-1])
    high = torch.minimum(token_edges[1:, None], cell_edges[None, 1:])
    return ((high - low).clamp_min(0) / (length / tokens)).float()


def crop_token_map(dense: Tensor, box: tuple[float, float, float, float], size: tuple[int, int],
                   grid: tuple[int, int], flipped: bool) -> Tensor:
    """The (gh, gw, C) token labels of a crop: dense is the whole image's (G, G, C) map, box the crop's (top,
    left, height, width) in pixels of the size (H, W) image, grid the student's final token grid; each token
    gets the area-weighted mean of the cells its part of the crop covers (then mirrored if the crop was)."""
    top, left, height, width = box
    rows = overlap_weights(top, height, grid[0], size[0], dense.shape[0])
    columns = overlap_weights(left, width, grid[1], size[1], dense.shape[1])
    tokens = torch.einsum("ai,ijc,bj->abc", rows, dense, columns)
    return tokens.flip(1) if flipped else tokens


class BoxedCrop:
    """timm's random resized crop and horizontal flip, telling where the crop came from: (image, box, flipped)."""

    def __init__(self, crop: Any, flip_probability: float) -> None:
        self.crop, self.flip_probability = crop, flip_probability

    def __call__(self, image: Image.Image) -> tuple[Image.Image, tuple[float, float, float, float], bool]:
        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        image = transforms.functional.resized_crop(image, top, left, height, width, list(self.crop.size),
                                                   self.crop.interpolation)
        flipped = bool(torch.rand(1).item() < self.flip_probability)
        return (image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else image,
                (float(top), float(left), float(height), float(width)), flipped)

    @classmethod
    def split(cls, transform: transforms.Compose) -> tuple[BoxedCrop, transforms.Compose]:
        """A training transform (timm's: random resized crop, optional flip, then the rest) as (the crop and flip,
        the rest)."""
        steps = list(transform.transforms)
        if not steps or not hasattr(steps[0], "get_params") or not hasattr(steps[0], "scale"):
            raise ValueError(f"token labels need a training transform that starts with a random resized crop, got "
                             f"{steps[:1]}")
        crop, rest = steps[0], steps[1:]
        flip = 0.0
        if rest and isinstance(rest[0], transforms.RandomHorizontalFlip):
            flip, rest = rest[0].p, rest[1:]
        return cls(crop, flip), transforms.Compose(rest)


class TokenTargets(NamedTuple):
    """A batch's targets with token labels: class labels (B,) (or, once smoothed or mixed, distributions (B, C))
    and token labels (B, gh, gw, C)."""

    labels: Tensor
    tokens: Tensor

    def to(self, device: Any) -> TokenTargets:
        return TokenTargets(self.labels.to(device), self.tokens.to(device))


class TokenLabelledImages(Dataset):
    """A training split whose samples are (image, TokenTargets(label, tokens), problem): the image cropped and
    flipped as the split's transform does, and the labels' map cropped and flipped the same way."""

    def __init__(self, split: ImageListDataset, keys: list[str], labels: TokenLabels, num_classes: int,
                 grid: tuple[int, int]) -> None:
        self.split, self.keys, self.labels, self.num_classes, self.grid = split, keys, labels, num_classes, grid
        self.crop, self.rest = BoxedCrop.split(split.transform)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[Tensor | None, TokenTargets | None, str]:
        image, problem = readable_image(self.split.images[index])
        if image is None:
            return None, None, problem
        label = self.split.labels[index]
        scores, indices, size = self.labels.read(self.keys[index])
        if size != (image.height, image.width):
            then = "could not read it" if size == (0, 0) else f"labelled it as a {size[1]}x{size[0]} image"
            raise UserError(f"{self.labels.option} {os.fspath(self.labels.folder)!r} {then}, and "
                            f"{self.keys[index]!r} is {image.width}x{image.height} now: the data changed since it was "
                            "labelled; run `biformer label` into a new folder")
        cropped, box, flipped = self.crop(image)
        tokens = crop_token_map(dense_map(scores, indices, self.num_classes), box, size, self.grid, flipped)
        return self.rest(cropped), TokenTargets(torch.tensor(label), tokens), ""
