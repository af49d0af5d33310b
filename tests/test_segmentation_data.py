"""Segmentation data: the generated digit scenes, generic folders, ADE20K, the checks on bad input, batching."""
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from biformer.data import scenes as sd
from biformer.data.segmentation import (
    IGNORE_INDEX,
    MaskBatch,
    TrainTransform,
    build_segmentation_datasets,
    collate_segmentation,
    digit_scenes_folder,
)
from biformer.errors import UserError

W, H = 48, 40  # the generic test folder's image size (width, height)
COLOURS = {0: (230, 30, 30), 1: (30, 230, 30), 2: (30, 30, 230), IGNORE_INDEX: (128, 128, 128)}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """The full digit-scenes folder, generated once for the module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BIFORMER_CACHE", str(tmp_path_factory.mktemp("cache")))
        return digit_scenes_folder()


@pytest.fixture
def small_scenes(monkeypatch):
    """Generate few scenes (the same generator, so the same first scenes) where a test needs several generations."""
    monkeypatch.setattr(sd, "DIGIT_SCENES_TRAIN", 6)
    monkeypatch.setattr(sd, "DIGIT_SCENES_VAL", 3)


def generate_into(cache, monkeypatch):
    monkeypatch.setenv("BIFORMER_CACHE", str(cache))
    return digit_scenes_folder()


def known_mask() -> np.ndarray:
    """Thirds of the width are classes 0, 1, 2; the top 5 rows are ignored."""
    mask = np.repeat((np.arange(W) * 3 // W)[None, :], H, axis=0).astype(np.uint8)
    mask[:5] = IGNORE_INDEX
    return mask


def make_folder(root, splits=("train", "val"), count=3, classes="a\nb\nc\n"):
    """A generic segmentation folder whose images are coloured by their masks' classes."""
    if classes is not None:
        (root / "classes.txt").write_text(classes)
    mask = known_mask()
    image = np.zeros((H, W, 3), np.uint8)
    for value, colour in COLOURS.items():
        image[mask == value] = colour
    for split in splits:
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(image).save(root / "images" / split / f"img{i}.png")
            Image.fromarray(mask).save(root / "masks" / split / f"img{i}.png")
    return root


def make_ade20k(root, values=(0, 1, 150)):
    ade = root / "ADEChallengeData2016"
    annotation = np.zeros((H, W), np.uint8)
    for i, value in enumerate(values):
        annotation[:, i * W // len(values):] = value
    for split in ("training", "validation"):
        (ade / "images" / split).mkdir(parents=True)
        (ade / "annotations" / split).mkdir(parents=True)
        Image.new("RGB", (W, H), (90, 120, 30)).save(ade / "images" / split / f"ADE_{split}_1.jpg")
        Image.fromarray(annotation).save(ade / "annotations" / split / f"ADE_{split}_1.png")
    return ade


# --- the digit scenes -------------------------------------------------------------------------------------


def test_digit_scenes_layout_and_masks(scenes):
    assert (scenes / "classes.txt").read_text().split() == ["background", *"0123456789"]
    for split, count in (("train", sd.DIGIT_SCENES_TRAIN), ("val", sd.DIGIT_SCENES_VAL)):
        names = sorted(p.name for p in (scenes / "images" / split).iterdir())
        assert names == sorted(p.name for p in (scenes / "masks" / split).iterdir())
        assert len(names) == count == {"train": 480, "val": 120}[split]
        backgrounds = []
        for name in names[:: 4 if split == "train" else 1]:
            mask = np.asarray(Image.open(scenes / "masks" / split / name))
            image = np.asarray(Image.open(scenes / "images" / split / name), dtype=np.float32).mean(axis=2)
            assert mask.shape == image.shape == (128, 128)
            assert mask.max() <= 10
            assert np.count_nonzero(np.unique(mask)) >= 2, name  # at least two digit classes visible
            backgrounds.append(np.mean(mask == 0))
            assert 0.5 < backgrounds[-1] < 0.995, name
            # digits are tinted brightly on a dark background: the mask marks where they are
            assert image[mask > 0].mean() > image[mask == 0].mean() + 40, name
        assert 0.8 < np.mean(backgrounds) < 0.95  # thin strokes on 2-5 digits of 20-56 px cover about a tenth
    assert not list(scenes.parent.glob(".digit-scenes*"))  # no temporary folder left


def test_digit_scenes_are_deterministic_and_generated_once(scenes, small_scenes, tmp_path, monkeypatch):
    first = generate_into(tmp_path / "a", monkeypatch)
    second = generate_into(tmp_path / "b", monkeypatch)
    for split, count in (("train", 6), ("val", 3)):
        for i in range(count):
            for part in ("images", "masks"):
                name = f"{part}/{split}/{i:04d}.png"
                assert (first / name).read_bytes() == (second / name).read_bytes(), name
    for i in range(6):  # fewer scenes: the same first training scenes as the full generation
        assert (first / f"masks/train/{i:04d}.png").read_bytes() == (scenes / f"masks/train/{i:04d}.png").read_bytes()
    stamp = (first.stat().st_mtime_ns, (first / "masks/val/0000.png").stat().st_mtime_ns)
    monkeypatch.setattr(sd, "_write_digit_scenes", lambda folder: pytest.fail("generated again"))
    assert generate_into(tmp_path / "a", monkeypatch) == first
    assert (first.stat().st_mtime_ns, (first / "masks/val/0000.png").stat().st_mtime_ns) == stamp


def test_an_interrupted_generation_does_not_count(small_scenes, tmp_path, monkeypatch):
    calls, compose = [], sd._digit_scene

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return compose(*args)

    monkeypatch.setattr(sd, "_digit_scene", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_into(tmp_path, monkeypatch)
    assert list(tmp_path.iterdir()) == []  # neither a final folder nor the temporary one
    # a process killed outright leaves its temporary folder: it must not pass for the data set
    leftover = tmp_path / ".digit-scenes-v2-killed"
    (leftover / "images" / "train").mkdir(parents=True)
    monkeypatch.setattr(sd, "_digit_scene", compose)
    folder = generate_into(tmp_path, monkeypatch)
    assert folder == tmp_path / "digit-scenes-v2"
    assert len(list((folder / "masks" / "val").iterdir())) == 3 and (folder / "classes.txt").is_file()


def test_the_loser_of_a_generation_race_uses_the_winners_folder(small_scenes, tmp_path, monkeypatch):
    write = sd._write_digit_scenes

    def racing(folder):
        write(folder)
        write(tmp_path / "digit-scenes-v2")  # another process finishes first
        (tmp_path / "digit-scenes-v2" / "winner").touch()

    monkeypatch.setattr(sd, "_write_digit_scenes", racing)
    folder = generate_into(tmp_path, monkeypatch)
    assert (folder / "winner").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digit-scenes-v2"]


def test_an_unwritable_cache_is_a_user_error(tmp_path, monkeypatch):
    (tmp_path / "file").touch()
    with pytest.raises(UserError, match="BIFORMER_CACHE"):
        generate_into(tmp_path / "file", monkeypatch)


def test_digit_scenes_data_sets(scenes, monkeypatch):
    monkeypatch.setenv("BIFORMER_CACHE", str(scenes.parent))
    splits = build_segmentation_datasets("digit-scenes", 64)
    assert (splits.layout, splits.flip, splits.mean, splits.std) == ("digit-scenes", False, (0.5,) * 3, (0.5,) * 3)
    assert splits.classes == ["background", *"0123456789"] and (len(splits.train), len(splits.val)) == (480, 120)
    image, mask, problem = splits.val[0]
    assert image.shape == (3, 64, 64) and mask.shape == (128, 128) and problem == ""
    assert torch.equal(mask, torch.from_numpy(np.array(Image.open(scenes / "masks/val/0000.png"))).long())
    image, mask, _ = splits.train[0]
    assert image.shape == (3, 64, 64) and mask.shape == (64, 64) and mask.dtype == torch.int64


# --- generic folders and ADE20K ----------------------------------------------------------------------------


def test_folder_val_items_keep_the_mask_as_it_is(tmp_path):
    splits = build_segmentation_datasets(str(make_folder(tmp_path)), 32)
    assert (splits.layout, splits.flip, splits.classes) == ("folder", True, ["a", "b", "c"])
    assert (splits.mean, splits.std) == (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    image, mask, problem = splits.val[1]
    assert image.shape == (3, 32, 38) and problem == ""  # shorter side 40 -> 32, aspect kept
    assert mask.dtype == torch.int64 and torch.equal(mask, torch.from_numpy(known_mask()).long())
    image, _, _ = build_segmentation_datasets(str(tmp_path), H).val[0]  # already at size: only normalized
    expected = np.asarray(Image.open(tmp_path / "images/val/img0.png"), np.float32) / 255
    expected = (expected - np.array(IMAGENET_DEFAULT_MEAN)) / np.array(IMAGENET_DEFAULT_STD)
    assert torch.allclose(image, torch.from_numpy(expected.transpose(2, 0, 1)).float(), atol=1e-5)


def test_folder_train_items_are_aligned_crops(tmp_path):
    train = build_segmentation_datasets(str(make_folder(tmp_path)), 32).train
    random.seed(0), torch.manual_seed(0)
    orientations = set()
    for _ in range(30):
        image, mask, _ = train[0]
        assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
        assert set(mask.unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}
        red, blue = (mask == 0), (mask == 2)
        if red.sum() > 20 and blue.sum() > 20:  # image and mask moved together: red where class 0 is
            assert image[0][red].mean() > image[0][blue].mean() and image[2][blue].mean() > image[2][red].mean()
            columns = torch.arange(32).expand(32, 32)
            orientations.add(bool(columns[red].float().mean() < columns[blue].float().mean()))
    assert orientations == {True, False}  # flipped sometimes
    random.seed(1), torch.manual_seed(1)
    again = train[0]
    random.seed(1), torch.manual_seed(1)
    assert all(torch.equal(a, b) for a, b in zip(again[:2], train[0][:2]))  # the global generators decide


def test_train_transform_pads_small_images_and_does_not_flip_digits(monkeypatch):
    transform = TrainTransform(64, (0.5,) * 3, (0.5,) * 3, flip=False)
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    mask = Image.fromarray(np.repeat(np.arange(40, dtype=np.uint8)[None, :], 20, axis=0))
    monkeypatch.setattr(random, "uniform", lambda low, high: 0.5)  # 40x20 -> 64x32: lower than the crop
    for _ in range(5):
        out_image, out_mask = transform(image, mask)
        assert out_image.shape == (3, 64, 64) and torch.all(out_image[:, 32:] == 0) and torch.all(out_image[:, :32] > 0)
        assert torch.all(out_mask[32:] == IGNORE_INDEX) and torch.all(out_mask[:32, 0] < out_mask[:32, 60])  # unflipped


def test_ade20k_layout_shifts_classes(tmp_path):
    ade = make_ade20k(tmp_path)
    for data in (tmp_path, ade):
        splits = build_segmentation_datasets(str(data), 32)
        assert (splits.layout, len(splits.classes)) == ("ade20k", 150)
        assert splits.classes[:3] == ["wall", "building", "sky"] and len(set(splits.classes)) == 150
        _, mask, _ = splits.val[0]
        assert mask[0].unique().tolist() == [0, 149, IGNORE_INDEX]  # from 1, 150 and 0
        assert mask[0, 0] == IGNORE_INDEX and mask[0, W // 3] == 0 and mask[0, -1] == 149


def test_ade20k_values_above_150_are_errors(tmp_path):
    train = build_segmentation_datasets(str(make_ade20k(tmp_path, values=(1, 151))), 32).train
    with pytest.raises(UserError, match=r"ADE_training_1\.png.*\[151\]"):
        train[0]


# --- bad input ---------------------------------------------------------------------------------------------


def raises(data, pattern, **kwargs):
    with pytest.raises(UserError, match=pattern):
        build_segmentation_datasets(str(data), 32, **kwargs)


def test_bad_data_arguments(tmp_path):
    raises(tmp_path / "nope", "nope.*neither 'digit-scenes' nor an existing folder")
    (tmp_path / "readme.txt").touch()
    raises(tmp_path, "neither the generic layout.*classes.txt.*nor the ADE20K one")


def test_missing_splits(tmp_path):
    make_folder(tmp_path, splits=("val",))
    raises(tmp_path, re.escape(str(tmp_path / "images" / "train")) + r".* does not exist \(expected images/")
    assert len(build_segmentation_datasets(str(tmp_path), 32, eval_only=True).val) == 3
    ade = make_ade20k(tmp_path / "ade")
    for path in (ade / "annotations" / "validation").iterdir():
        path.unlink()
    (ade / "annotations" / "validation").rmdir()
    raises(ade, re.escape(str(ade / "annotations" / "validation")), eval_only=True)


@pytest.mark.parametrize("classes, pattern", [
    (None, "no classes.txt"),
    ("", "classes.txt' is empty"),
    ("a\n\nb\n", r"classes.txt' has blank line\(s\) \[2\]"),
    ("".join(f"c{i}\n" for i in range(256)), "256 classes"),
])
def test_bad_classes_txt(tmp_path, classes, pattern):
    raises(make_folder(tmp_path, classes=classes), pattern)


def test_images_and_masks_must_pair(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "masks/train/img1.png").unlink()
    raises(tmp_path, re.escape(f"image '{tmp_path / 'images/train/img1.png'}' has no mask: expected "
                               f"{tmp_path / 'masks/train/img1.png'}"))
    (tmp_path / "images/train/img1.png").unlink()
    Image.new("L", (W, H)).save(tmp_path / "masks/val/extra.png")
    raises(tmp_path, re.escape(f"mask '{tmp_path / 'masks/val/extra.png'}' has no image: expected "
                               f"{tmp_path / 'images/val/extra'}.<jpg|"))
    (tmp_path / "masks/val/extra.png").unlink()
    Image.new("RGB", (W, H)).save(tmp_path / "images/val/img0.jpg")
    raises(tmp_path, r"images .*img0\.jpg' and .*img0\.png' share a name")


@pytest.mark.parametrize("bad_mask, pattern", [
    (np.zeros((W, H), np.uint8), r"mask '.*img0\.png' is 40x48 but its image '.*img0\.png' is 48x40"),
    (np.full((H, W), 7, np.uint8), r"mask '.*img0\.png' has value\(s\) \[7\] that are neither a class index \(0\.\.2"),
    (np.zeros((H, W, 3), np.uint8), r"mask '.*img0\.png' has image mode RGB"),
])
def test_masks_that_do_not_fit_are_errors(tmp_path, bad_mask, pattern):
    make_folder(tmp_path)
    Image.fromarray(bad_mask).save(tmp_path / "masks/val/img0.png")
    val = build_segmentation_datasets(str(tmp_path), 32).val
    with pytest.raises(UserError, match=pattern):
        val[0]
    assert val[1][2] == ""


def test_undecodable_files_are_skipped_and_reported(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "images/val/img0.png").write_bytes(b"not a png")
    (tmp_path / "masks/val/img2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    val = build_segmentation_datasets(str(tmp_path), 32).val
    samples = [val[i] for i in range(3)]
    assert samples[0][:2] == (None, None) and samples[0][2].startswith(f"{tmp_path / 'images/val/img0.png'}: ")
    assert samples[2][:2] == (None, None) and samples[2][2].startswith(f"{tmp_path / 'masks/val/img2.png'}: ")
    images, masks, problems = collate_segmentation(samples)
    assert images.shape == (1, 3, 32, 64) and len(masks) == 1 and problems == [samples[0][2], samples[2][2]]
    assert collate_segmentation([samples[0]]) == (None, None, [samples[0][2]])


# --- batching ---------------------------------------------------------------------------------------------


def test_collate_pads_to_multiples_of_32():
    first = (torch.ones(3, 40, 48), torch.zeros(40, 48, dtype=torch.int64), "")
    second = (torch.ones(3, 70, 33), torch.ones(50, 20, dtype=torch.int64), "")
    images, masks, problems = collate_segmentation([first, second])
    assert images.shape == (2, 3, 96, 64) and problems == []
    assert masks.image_sizes == [(40, 48), (70, 33)] and masks.mask_sizes == [(40, 48), (50, 20)] and len(masks) == 2
    assert images[0, :, :40, :48].eq(1).all() and images[0, :, 40:].eq(0).all() and images[0, :, :, 48:].eq(0).all()
    assert images[1, :, :70, :33].eq(1).all() and images[1, :, 70:].eq(0).all() and images[1, :, :, 33:].eq(0).all()
    assert masks.masks.shape == (2, 50, 48) and masks.masks.dtype == torch.int64
    assert masks.masks[0, :40].eq(0).all() and masks.masks[0, 40:].eq(IGNORE_INDEX).all()
    assert masks.masks[1, :, :20].eq(1).all() and masks.masks[1, :, 20:].eq(IGNORE_INDEX).all()
    moved = masks.to("cpu")
    assert isinstance(moved, MaskBatch) and torch.equal(moved.masks, masks.masks)
    assert moved.image_sizes == masks.image_sizes and moved.mask_sizes == masks.mask_sizes
