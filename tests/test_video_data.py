"""Clips: the embedded moving digits, video files and frame folders, clip sampling, augmentation drawn once per
clip, unreadable and short clips."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from biformer.data.video import (
    MOVING_DIGIT_CLASSES,
    ClipDataset,
    ShortClip,
    ClipSampling,
    ClipTransform,
    moving_digits_folder,
    read_frames,
    scan_clip_folders,
)
from biformer.errors import UserError


@pytest.fixture(scope="module")
def moving_digits():
    return moving_digits_folder()  # generated once into the cache (BIFORMER_CACHE or ~/.cache/biformer)


def _centre_x(frame: Image.Image) -> float:
    """The column centre of the frame's brightest pixels (the digit)."""
    grey = np.asarray(frame.convert("L"), dtype=np.float64)
    columns = np.nonzero(grey > grey.mean() + 2 * grey.std())[1]
    return float(columns.mean())


def test_moving_digits_move_the_way_their_class_says(moving_digits):
    for split, per_class in (("train", 40), ("val", 10)):
        classes, clips, labels = scan_clip_folders(moving_digits / split)
        assert classes == sorted(MOVING_DIGIT_CLASSES) and len(clips) == 10 * per_class
    classes, clips, labels = scan_clip_folders(moving_digits / "val")
    for clip, label in zip(clips[::7], labels[::7]):
        frames = read_frames(clip)
        assert len(frames) == 16 and frames[0].size == (64, 64)
        moved = _centre_x(frames[-1]) - _centre_x(frames[0])
        assert (moved > 8) if classes[label].endswith("right") else (moved < -8), (clip, moved)


def test_a_folder_of_frames_reads_as_its_video(moving_digits, tmp_path):
    video = sorted((moving_digits / "val" / "3-left").iterdir())[0]
    frames = read_frames(video)
    folder = tmp_path / "clip"
    folder.mkdir()
    for index, frame in enumerate(frames):
        frame.save(folder / f"{index:04d}.png")
    assert [np.asarray(a).tolist() == np.asarray(b).tolist() for a, b in zip(read_frames(folder), frames)] == \
        [True] * 16


def _pixels(frames) -> list:
    return [np.asarray(frame).tolist() for frame in frames]


@pytest.mark.parametrize("kind", ["video", "folder"])
def test_only_the_sampled_frames_are_read(moving_digits, tmp_path, kind):
    """Frames at given indices (repeats, any order) are the full decode's frames there; an index past the end is
    a ShortClip naming the frame."""
    clip = sorted((moving_digits / "val" / "2-right").iterdir())[0]
    every = read_frames(clip)
    if kind == "folder":
        clip = tmp_path / "clip"
        clip.mkdir()
        for index, frame in enumerate(every):
            frame.save(clip / f"{index:04d}.png")
    indices = [15, 0, 3, 3, 8]
    assert _pixels(read_frames(clip, indices)) == _pixels([every[i] for i in indices])
    with pytest.raises(ShortClip, match="before frame 16"):
        read_frames(clip, [2, 16])


def test_a_clip_item_is_its_views_of_the_whole_decode(moving_digits, monkeypatch):
    """The data set's views equal the transform of the frames sampled from every decoded frame; a header that
    counts more frames than the file holds falls back to the frames the file has."""
    clip = sorted((moving_digits / "val" / "4-left").iterdir())[0]
    every = read_frames(clip)
    sampling = ClipSampling(frames=4, stride=3, views=3)
    transform = ClipTransform(32, (0.5,) * 3, (0.5,) * 3, training=False)
    expected = torch.stack([transform([every[i] for i in sampling.indices(16, start)])
                            for start in sampling.view_starts(16)])
    dataset = ClipDataset([clip], [0], sampling, transform)
    views, label, problem = dataset[0]
    assert problem == "" and torch.equal(views, expected)
    monkeypatch.setattr("biformer.data.video.count_frames", lambda path: 40)  # a header that overcounts
    views, _, problem = dataset[0]
    assert problem == "" and torch.equal(views, expected)


@pytest.mark.parametrize("short, expected", [("loop", [8, 11, 14, 1, 4]), ("pad", [8, 11, 14, 15, 15])])
def test_sampled_positions_past_the_end_loop_or_repeat_the_last_frame(short, expected):
    sampling = ClipSampling(frames=5, stride=3, short=short)
    assert sampling.span == 13 and sampling.indices(16, 8) == expected


def test_evaluation_views_spread_over_the_clip():
    assert ClipSampling(frames=4, stride=2, views=3).view_starts(31) == [0, 12, 24]  # span 7: starts 0..24
    assert ClipSampling(frames=4, stride=2).view_starts(31) == [12]
    assert ClipSampling(frames=8, stride=4).view_starts(10) == [0]  # shorter than the span


def test_one_crop_and_flip_per_clip():
    frame = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    transform = ClipTransform(32, (0.5,) * 3, (0.5,) * 3, training=True, scale=(0.2, 0.5), flip=0.5)
    for seed in range(8):
        random.seed(seed)
        torch.manual_seed(seed)
        clip = transform([frame] * 6)  # identical frames: identical outputs only if each frame got the same crop
        assert clip.shape == (3, 6, 32, 32) and all(torch.equal(clip[:, t], clip[:, 0]) for t in range(6))
    random.seed(1)
    torch.manual_seed(1)
    plain = ClipTransform(32, (0.5,) * 3, (0.5,) * 3, training=True, scale=(0.2, 0.5), flip=0.0)([frame] * 2)
    random.seed(1)
    torch.manual_seed(1)
    mirrored = ClipTransform(32, (0.5,) * 3, (0.5,) * 3, training=True, scale=(0.2, 0.5), flip=1.0)([frame] * 2)
    assert torch.equal(mirrored, plain.flip(-1))


def test_unreadable_and_short_clips_are_reported(moving_digits, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    good = sorted((moving_digits / "val" / "0-left").iterdir())[0]
    sampling = ClipSampling(frames=12, stride=2)  # spans 23 of the 16 frames: looped
    dataset = ClipDataset([broken, good], [0, 1], sampling, ClipTransform(32, (0.5,) * 3, (0.5,) * 3, training=False))
    clip, label, problem = dataset[0]
    assert clip is None and label == 0 and problem.startswith(f"{broken}: ")
    views, label, problem = dataset[1]
    assert views.shape == (1, 3, 12, 32, 32) and problem == ""


def test_a_clip_folder_without_clips_is_refused(tmp_path):
    (tmp_path / "train" / "empty").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no clips"):
        scan_clip_folders(tmp_path / "train")
