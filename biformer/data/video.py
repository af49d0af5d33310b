"""Clips for video classification: class folders of clips, each a video file (decoded with PyAV, whose wheels carry
FFmpeg) or a folder of frames; clip sampling; augmentation drawn once per clip and applied alike to its frames; and
the embedded moving digits.

Layout of a clip data set: DATA/{train,val}/<class>/<clip>, where <clip> is a video file (VIDEO_EXTENSIONS) or a
folder of frame images (sorted by name). Shape legend: T frames, H/W frame height/width.
"""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from ..errors import UserError
from .cache import cached_folder
from .classification import scan_class_folders
from .images import IMAGE_EXTENSIONS, UNREADABLE_ERRORS, open_rgb

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".mpg", ".mpeg")
SHORT_CLIPS = ("loop", "pad")  # what a clip with fewer frames than the sampling spans gets
SHORT_CLIP_RULES = (*SHORT_CLIPS, "refuse")  # `--short-clips`: refuse stops before training when any clip is short


class UnreadableClip(Exception):
    """A clip that cannot be decoded: the message says which file and why."""


class ShortClip(UnreadableClip):
    """A video that ends before a frame its header counted."""


def _pyav():
    try:
        import av
    except ImportError as error:
        raise UserError("video files need PyAV: pip install 'biformer[video]' (or av), or give folders of "
                        "frames") from error
    return av


def is_clip(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS or (path.is_dir() and any(
        child.suffix.lower() in IMAGE_EXTENSIONS for child in path.iterdir()))


def holds_clips(data: str) -> bool:
    """Whether folder `data` looks like a clip data set: its first class folder (of train/, else val/) holds a video
    file and no image."""
    for split in ("train", "val"):
        folder = Path(data) / split
        classes = sorted(child for child in folder.iterdir() if child.is_dir()) if folder.is_dir() else []
        if classes:
            kinds = {child.suffix.lower() for child in classes[0].iterdir()}
            return bool(kinds & set(VIDEO_EXTENSIONS)) and not kinds & set(IMAGE_EXTENSIONS)
    return False


def read_frames(path: str | os.PathLike, indices: Sequence[int] | None = None) -> list[Image.Image]:
    """The frames at `indices` (repeats allowed; None: every frame) of a video file or a folder of frame images,
    as RGB images. A video is decoded only up to the last index, and only those frames are converted, so that a
    long video costs what its sampled frames do. UnreadableClip if it cannot be decoded, holds no frame, or ends
    before an index (a header that counted more frames than the file holds)."""
    path = Path(path)
    wanted = None if indices is None else set(indices)
    if path.is_dir():
        files = sorted(child for child in path.iterdir() if child.suffix.lower() in IMAGE_EXTENSIONS)
        try:
            found = {index: open_rgb(file) for index, file in enumerate(files) if wanted is None or index in wanted}
        except UNREADABLE_ERRORS as error:
            raise UnreadableClip(f"{path}: a frame cannot be read: {error}") from error
    else:
        found = _decoded_frames(path, wanted)
    if not found:
        raise UnreadableClip(f"{path}: no frames")
    if indices is None:
        return list(found.values())
    missing = sorted(set(indices) - set(found))
    if missing:
        raise ShortClip(f"{path}: ends after {len(found) and max(found) + 1} frames, before frame {missing[0]}")
    return [found[index] for index in indices]


def _decoded_frames(path: Path, wanted: set[int] | None) -> dict[int, Image.Image]:
    """{index: RGB frame} of a video file for the `wanted` indices (None: all), decoding no further than needed."""
    av = _pyav()  # only for video files: a folder of frames needs no decoder
    found: dict[int, Image.Image] = {}
    try:
        with av.open(os.fspath(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if wanted is not None and index > max(wanted, default=-1):
                    break
                if wanted is None or index in wanted:
                    found[index] = frame.to_image().convert("RGB")
    except (av.FFmpegError, OSError, IndexError, ValueError) as error:  # IndexError: no video stream
        raise UnreadableClip(f"{path}: {error}") from error
    return found


def count_frames(path: str | os.PathLike) -> int:
    """The number of frames of a clip, without decoding a folder's images or (where the container records it) a
    video's frames: the header check that finds unreadable files before a run starts. UnreadableClip if the file
    cannot be opened, has no video stream or no frames."""
    path = Path(path)
    if path.is_dir():
        count = sum(child.suffix.lower() in IMAGE_EXTENSIONS for child in path.iterdir())
    else:
        av = _pyav()
        try:
            with av.open(os.fspath(path)) as container:
                if not container.streams.video:
                    raise UnreadableClip(f"{path}: no video stream")
                stream = container.streams.video[0]
                # some containers (webm, mkv) record no frame count: then the packets are counted, still undecoded
                count = stream.frames or sum(packet.size > 0 for packet in container.demux(stream))
        except (av.FFmpegError, OSError, ValueError) as error:
            raise UnreadableClip(f"{path}: {error}") from error
    if count == 0:
        raise UnreadableClip(f"{path}: no frames")
    return count


@dataclass(frozen=True)
class ClipSampling:
    """Which frames of a clip a model sees: `frames` frames `stride` apart, from a random start (training) or
    from `views` starts spread evenly over the clip (evaluation: the views' scores are averaged). A clip shorter
    than the span (frames - 1) x stride + 1 is looped ("loop": the sampled positions wrap around) or its last
    frame repeated ("pad"); the data set counts such clips."""

    frames: int = 16
    stride: int = 2
    views: int = 1
    short: str = "loop"

    def __post_init__(self) -> None:
        if min(self.frames, self.stride, self.views) < 1:
            raise UserError(f"clip sampling needs positive frames, stride and views, got {self}")
        if self.short not in SHORT_CLIPS:
            raise UserError(f"short clips are handled by one of {', '.join(SHORT_CLIPS)}, got {self.short!r}")

    @property
    def span(self) -> int:
        return (self.frames - 1) * self.stride + 1

    def indices(self, length: int, start: int) -> list[int]:
        """The frame indices from `start` (positions past the end looped or clamped)."""
        positions = [start + index * self.stride for index in range(self.frames)]
        return [p % length for p in positions] if self.short == "loop" else [min(p, length - 1) for p in positions]

    def random_start(self, length: int) -> int:
        return random.randint(0, max(length - self.span, 0))

    def view_starts(self, length: int) -> list[int]:
        """Evenly spread starts of the evaluation views (the centre one for a single view)."""
        room = max(length - self.span, 0)
        if self.views == 1:
            return [room // 2]
        return [round(room * view / (self.views - 1)) for view in range(self.views)]


@dataclass(frozen=True)
class ClipTransform:
    """A clip's frames to a (3, T, H, W) tensor. Training: one random resized crop (scale, ratio) and one flip
    (probability `flip`) drawn per clip and applied to every frame; evaluation: resize the shorter side to
    size / crop_pct, centre crop."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    training: bool
    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.0
    crop_pct: float = 1.0

    def __call__(self, frames: Sequence[Image.Image]) -> Tensor:
        if self.training:
            from torchvision.transforms import RandomResizedCrop

            top, left, height, width = RandomResizedCrop.get_params(frames[0], list(self.scale), list(self.ratio))
            flipped = random.random() < self.flip
            frames = [F.resized_crop(frame, top, left, height, width, [self.size, self.size],
                                     InterpolationMode.BILINEAR, antialias=True) for frame in frames]
            frames = [F.hflip(frame) if flipped else frame for frame in frames]
        else:
            resize = int(round(self.size / self.crop_pct))
            frames = [F.center_crop(F.resize(frame, resize, InterpolationMode.BILINEAR, antialias=True), self.size)
                      for frame in frames]
        clip = torch.stack([F.to_tensor(frame) for frame in frames], dim=1)  # (3, T, H, W)
        mean, std = torch.tensor(self.mean)[:, None, None, None], torch.tensor(self.std)[:, None, None, None]
        return (clip - mean) / std


class ClipDataset(Dataset):
    """(clip (3, T, H, W) or views (V, 3, T, H, W), label, problem) per clip; problem "path: reason" (and clip
    None) for one that cannot be decoded (a file whose header read well but whose frames do not)."""

    def __init__(self, clips: list[Path], labels: list[int], sampling: ClipSampling, transform: ClipTransform) -> None:
        self.clips, self.labels, self.sampling, self.transform = clips, labels, sampling, transform

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int, str]:
        clip = self.clips[index]
        try:
            try:  # the header's count: then only the sampled frames are decoded
                frames = self._sampled(clip, count_frames(clip), read_frames)
            except ShortClip:  # the header counted frames the file lacks: sample from those it holds
                every = read_frames(clip)
                frames = self._sampled(clip, len(every), lambda _, indices: [every[i] for i in indices])
        except UnreadableClip as error:
            return None, self.labels[index], str(error)
        views = [self.transform(frames[start:start + self.sampling.frames])
                 for start in range(0, len(frames), self.sampling.frames)]
        return (views[0] if self.transform.training else torch.stack(views)), self.labels[index], ""

    def _sampled(self, clip: Path, length: int, read: Callable[[Path, list[int]], list[Image.Image]]
                 ) -> list[Image.Image]:
        """The frames of every view (one random view in training), view after view, read by `read`."""
        starts = [self.sampling.random_start(length)] if self.transform.training else self.sampling.view_starts(length)
        return read(clip, [position for start in starts for position in self.sampling.indices(length, start)])


@dataclass
class ClipSplits:
    """A clip data set's splits, what its clips are normalized with, and how they are sampled."""

    train: ClipDataset
    val: ClipDataset
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    sampling: ClipSampling


def check_clips(clips: list[Path], sampling: ClipSampling, short_rule: str, data: str) -> str | None:
    """Read every clip's header before a run starts: UserError naming the unreadable ones, or (short_rule
    "refuse") the clips shorter than the sampling's span; otherwise a note counting the short clips (None if
    there are none), which are then looped or padded as the rule says."""
    from tqdm import tqdm

    lengths, unreadable = {}, []
    for clip in tqdm(clips, desc="checking clips", leave=False, disable=None if len(clips) > 2000 else True):
        try:
            lengths[clip] = count_frames(clip)
        except UnreadableClip as error:
            unreadable.append(str(error))
    if unreadable:
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        raise UserError(f"--data {data}: clip {unreadable[0]}{more} cannot be read; remove or re-encode it")
    short = [(clip, length) for clip, length in lengths.items() if length < sampling.span]
    if not short:
        return None
    what = (f"{len(short)} of {len(clips)} clips of --data {data} have fewer frames than the {sampling.span} that "
            f"--frames {sampling.frames} x --frame-stride {sampling.stride} span (e.g. {short[0][0]}, "
            f"{short[0][1]} frames)")
    if short_rule == "refuse":
        raise UserError(f"{what}: lower --frames or --frame-stride, or let --short-clips loop or pad them")
    return f"{what}: {'looped' if short_rule == 'loop' else 'their last frame repeated'} (--short-clips {short_rule})"


def build_clip_datasets(data: str, img_size: int, sampling: ClipSampling, *, eval_only: bool = False,
                        normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                        short_rule: str = "loop") -> ClipSplits:
    """Train/val clip data sets of `data` = "moving-digits" or a folder DATA/{train,val}/<class>/<clip>, every clip
    checked first (`check_clips`; its note is printed). Training: one random resized crop (moving digits: of at
    least 80% of the frame, and no flip, which would reverse the direction that is half of their class; folders:
    a flip half the time) per clip. normalization: (mean, std) of the model's inputs (None: the data set's own,
    0.5 for the moving digits, else ImageNet's)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if short_rule not in SHORT_CLIP_RULES:
        raise UserError(f"--short-clips must be one of {', '.join(SHORT_CLIP_RULES)}, got {short_rule!r}")
    if data == MOVING_DIGITS_NAME:
        root, own, crop = moving_digits_folder(), ((0.5,) * 3, (0.5,) * 3), {"scale": (0.8, 1.0), "flip": 0.0}
    else:
        root, own, crop = Path(data), (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), {"flip": 0.5}
        if data in ("digits", "digit-scenes"):
            raise UserError(f"--data {data} holds images; clip models train on --data {MOVING_DIGITS_NAME} or a folder "
                            "with train/<class>/<clip> and val/<class>/<clip> (video files or folders of frames)")
        if not root.is_dir():
            raise UserError(f"--data {data!r} is neither {MOVING_DIGITS_NAME!r} nor an existing folder")
        for part in ("val",) if eval_only else ("train", "val"):
            if not (root / part).is_dir():
                raise UserError(f"data folder {data!r} has no {part}/ sub-folder (expected {data}/{part}/<class>/<clip>)")
    mean, std = normalization or own
    classes, train_clips, train_labels = (None, [], []) if eval_only else scan_clip_folders(root / "train")
    classes, val_clips, val_labels = scan_clip_folders(root / "val", classes)
    if short_rule != "refuse":
        sampling = ClipSampling(sampling.frames, sampling.stride, sampling.views, short_rule)
    note = check_clips(train_clips + val_clips, sampling, short_rule, data)
    if note:
        print(f"note: {note}", file=sys.stderr, flush=True)
    train = ClipTransform(img_size, tuple(mean), tuple(std), training=True, **crop)
    val = ClipTransform(img_size, tuple(mean), tuple(std), training=False)
    return ClipSplits(ClipDataset(train_clips, train_labels, sampling, train),
                      ClipDataset(val_clips, val_labels, sampling, val), classes, tuple(mean), tuple(std),
                      val.crop_pct, sampling)


def scan_clip_folders(root: Path, classes: list[str] | None = None) -> tuple[list[str], list[Path], list[int]]:
    """(classes, clips, labels) of root/<class>/<clip> (see `scan_class_folders` for the errors)."""
    return scan_class_folders(root, classes, lambda folder: sorted(child for child in folder.iterdir() if is_clip(child)),
                              f"clips (video files {', '.join(VIDEO_EXTENSIONS)}, or folders of frames)", item="clip")


# -- the embedded moving digits ---------------------------------------------------------------------------------

MOVING_DIGITS = "moving-digits-v1"  # the cache folder
MOVING_DIGITS_NAME = "moving-digits"  # what --data calls them
MOVING_DIGIT_CLASSES = [f"{digit}-{direction}" for digit in range(5) for direction in ("left", "right")]
MOVING_DIGITS_FRAMES, MOVING_DIGITS_SIZE = 16, 64
MOVING_DIGITS_CLIPS = {"train": 40, "val": 10}  # per class


def _moving_digit_clip(digit: np.ndarray, rightward: bool, generator: np.random.Generator) -> np.ndarray:
    """(T, S, S, 3) uint8: `digit` (an 8x8 image, 0..255) scaled up and moving across a noisy gradient, left to
    right or right to left, at a random height and speed: one frame shows a digit, only time shows where it
    goes."""
    size, frames = MOVING_DIGITS_SIZE, MOVING_DIGITS_FRAMES
    side = int(generator.integers(20, 29))
    glyph = np.asarray(Image.fromarray(digit).resize((side, side), Image.BILINEAR), dtype=np.float32) / 255
    colour = generator.uniform(0.6, 1.0, 3)
    background = np.linspace(generator.uniform(0, 0.3, 3), generator.uniform(0, 0.3, 3), size)[None].repeat(size, 0)
    top = int(generator.integers(0, size - side + 1))
    travel = size - side
    start = generator.uniform(0, travel * 0.25)
    speed = generator.uniform(0.6, 1.0) * (travel - start) / (frames - 1)
    clip = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        left = int(round(start + speed * t))
        left = left if rightward else travel - left
        frame = background + generator.normal(0, 0.03, (size, size, 3))
        window = frame[top:top + side, left:left + side]
        window[:] = window * (1 - glyph[..., None]) + colour * glyph[..., None]
        clip[t] = np.clip(frame * 255, 0, 255).astype(np.uint8)
    return clip


def _write_video(clip: np.ndarray, path: Path) -> None:
    av = _pyav()
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = clip.shape[2], clip.shape[1], "yuv420p"
        stream.options = {"crf": "12"}  # nearly lossless: the digits stay legible
        for frame in clip:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_moving_digits(folder: Path) -> None:
    from .digits import load_digits_split

    train_images, train_labels, val_images, val_labels = load_digits_split()
    generator = np.random.default_rng(0)
    for split, (images, labels) in {"train": (train_images, train_labels), "val": (val_images, val_labels)}.items():
        by_digit = {digit: [np.asarray(image.convert("L")) for image, label in zip(images, labels) if label == digit]
                    for digit in range(5)}
        for name in MOVING_DIGIT_CLASSES:
            digit, direction = int(name.split("-")[0]), name.split("-")[1]
            (folder / split / name).mkdir(parents=True)
            for index in range(MOVING_DIGITS_CLIPS[split]):
                glyphs = by_digit[digit]
                glyph = glyphs[int(generator.integers(len(glyphs)))]
                clip = _moving_digit_clip(glyph, direction == "right", generator)
                _write_video(clip, folder / split / name / f"{index:03d}.mp4")


def moving_digits_folder() -> Path:
    """The moving digits: 5 digits x 2 directions = 10 classes of 16-frame 64x64 clips (H.264 files), 40 per class
    for training and 10 for validation, the digits drawn from the bundled digits' own splits; generated once (a
    few seconds) into the cache."""
    return cached_folder(MOVING_DIGITS, _write_moving_digits)
