"""Token labelling: score maps cropped with their images, MixToken, `biformer label` (resume, errors), training
with token labels, the in1k-tl recipe."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

import biformer  # noqa: F401  (registers the models)
from biformer.checkpoints.weights import read_state_dict, save_weights
from biformer.cli import main
from biformer.data.token_labels import BoxedCrop, TokenTargets, crop_token_map, dense_map
from biformer.errors import UserError
from biformer.tasks.token_labelling import MixToken, dense_scores
from tiny_data import make_image_folder, read_metrics

COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]])  # class 0..3


def quadrant_scene(height: int, width: int, row: int, column: int) -> np.ndarray:
    """(height, width) class of every pixel: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right of the split
    at (row, column)."""
    rows, columns = np.mgrid[:height, :width]
    return (rows >= row) * 2 + (columns >= column)


@pytest.mark.parametrize("seed", range(12))
def test_each_token_gets_the_classes_of_the_pixels_it_covers(seed):
    # an 80x96 image whose quadrants (split at a cell boundary of a 4x4 map) are four classes; its map says so
    height, width, grid = 80, 96, (4, 4)
    classes = quadrant_scene(height, width, 40, 48)
    image = Image.fromarray(COLOURS[classes].astype(np.uint8))
    cells = quadrant_scene(4, 4, 2, 2)
    one_hot = torch.nn.functional.one_hot(torch.as_tensor(cells), 4).float()
    dense = dense_map(*one_hot.topk(2, dim=-1), 4)
    # nearest-neighbour resizing keeps every output pixel one class, so the output image is the oracle
    crop = BoxedCrop(RandomResizedCropAndInterpolation(64, scale=(0.08, 1.0), interpolation="nearest"), 0.5)
    torch.manual_seed(seed)
    np.random.seed(seed)
    import random
    random.seed(seed)
    out, box, flipped = crop(image)
    tokens = crop_token_map(dense, box, (height, width), grid, flipped)  # (4, 4, 4)
    pixels = np.abs(np.asarray(out)[:, :, None, :].astype(int) - COLOURS[None, None]).sum(-1).argmin(-1)
    for a in range(4):
        for b in range(4):
            block = pixels[16 * a:16 * (a + 1), 16 * b:16 * (b + 1)]
            share = np.bincount(block.ravel(), minlength=4) / block.size  # the classes of the pixels it covers
            label = tokens[a, b].numpy()
            assert np.abs(label - share).max() <= 1 / 16 + 1e-6, (seed, a, b, label, share, box, flipped)
            if share.max() == 1:
                assert label.argmax() == share.argmax() and label.max() > 0.93


def test_a_flip_mirrors_the_token_labels():
    dense = torch.rand(3, 3, 5).softmax(-1)
    box = (0.0, 0.0, 30.0, 30.0)
    plain = crop_token_map(dense, box, (30, 30), (3, 3), False)
    assert torch.allclose(plain, dense, atol=1e-6)  # the whole image on the map's own grid: the map itself
    assert torch.allclose(crop_token_map(dense, box, (30, 30), (3, 3), True), dense.flip(1), atol=1e-6)


def test_top_k_scores_become_distributions():
    scores, indices = torch.tensor([[[0.6, 0.2]]]), torch.tensor([[[3, 1]]])
    assert torch.allclose(dense_map(scores, indices, 4), torch.tensor([[[0.0, 0.25, 0.0, 0.75]]]))


def test_mixtoken_mixes_a_token_aligned_box_and_labels_by_its_area():
    np.random.seed(3)
    batch, classes, rows, columns, size = 4, 6, 4, 4, 64
    images = torch.arange(batch, dtype=torch.float32)[:, None, None, None].expand(batch, 3, size, size).clone()
    labels = torch.nn.functional.one_hot(torch.tensor([0, 2, 4, 5]), classes).float()
    tokens = torch.arange(batch, dtype=torch.float32)[:, None, None, None].expand(batch, rows, columns, classes).clone()
    mix = MixToken((rows, columns))
    seen = 0
    for _ in range(20):
        mixed, targets = mix(images, TokenTargets(labels, tokens))
        from_partner = mixed[:, 0] != images[:, 0]  # (B, H, W): the pixels that came from the reversed batch
        share = from_partner[0].float().mean().item()  # the box's area share, counted in pixels
        expected = (1 - share) * labels + share * labels.flip(0)
        assert torch.allclose(targets.labels, expected, atol=1e-6)
        # the box is aligned to the tokens, and the token labels inside it are the partner's
        top, left, bottom, right = mix.box
        pixel_box = torch.zeros(size, size, dtype=torch.bool)
        pixel_box[top * 16:bottom * 16, left * 16:right * 16] = True
        assert torch.equal(from_partner[0], pixel_box)
        token_box = torch.zeros(rows, columns, dtype=torch.bool)
        token_box[top:bottom, left:right] = True
        assert torch.equal(targets.tokens[0, :, :, 0] != tokens[0, :, :, 0], token_box)
        assert torch.equal(targets.tokens[:, token_box], tokens.flip(0)[:, token_box])
        seen += share > 0
    assert seen >= 10  # most draws cut a box


def test_the_teacher_map_means_what_its_classifier_means():
    model = timm.create_model("biformer_nano", num_classes=7).eval()
    images = torch.randn(2, 3, 64, 64)
    probabilities = dense_scores(model, images, "biformer_nano", check=True)  # (2, 2, 2, 7)
    features = model.forward_features(images)
    expected = (features.permute(0, 2, 3, 1) @ model.head.weight.T + model.head.bias).softmax(-1)
    assert probabilities.shape == (2, 2, 2, 7) and torch.allclose(probabilities, expected, atol=1e-5)
    convnext = timm.create_model("convnext_atto", num_classes=7).eval()  # norm after pooling: no dense meaning
    with pytest.raises(UserError, match="not a linear map of average-pooled features"):
        dense_scores(convnext, images, "convnext_atto", check=True)


# -- biformer label, train --token-label ---------------------------------------------------------------------

def digits_teacher(path: Path, img_size: int = 64) -> Path:
    """A (random) biformer_nano weights file for the digits, as `biformer train` writes them."""
    torch.manual_seed(0)
    model = timm.create_model("biformer_nano", num_classes=10)
    save_weights(path, model, {"model": "biformer_nano", "task": "classification", "classes": [str(i) for i in range(10)],
                               "img_size": img_size, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0})
    return path


def folder_teacher(path: Path) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("biformer_nano", num_classes=2)
    save_weights(path, model, {"model": "biformer_nano", "task": "classification", "classes": ["bright", "dark"],
                               "img_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0})
    return path


def label_command(teacher: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "biformer", "label", "--teacher", str(teacher), "--output", str(output), *extra]


@pytest.mark.slow
def test_label_resumes_after_sigint_and_writes_what_one_run_writes(tmp_path):
    teacher = digits_teacher(tmp_path / "teacher.safetensors")
    settings = ["--img-size", "128", "--shard-size", "64", "--topk", "3"]
    environment = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen(label_command(teacher, tmp_path / "cut", *settings), env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "cut" / "shard-00001.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=120)
    assert process.returncode == 130, errors
    assert "biformer label: interrupted" in errors and "Traceback" not in errors
    written = sorted(path.name for path in (tmp_path / "cut").iterdir())
    shards = [name for name in written if name.startswith("shard-")]
    assert 2 <= len(shards) < 23 and not [name for name in written if name.startswith(".tmp-")]
    resumed = subprocess.run(label_command(teacher, tmp_path / "cut", *settings), env=environment,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"labelled {1437 - 64 * len(shards)} image(s) now; 23 of 23 shard(s)" in resumed.stdout
    whole = subprocess.run(label_command(teacher, tmp_path / "whole", *settings), env=environment,
                           capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    names = sorted(path.name for path in (tmp_path / "whole").iterdir())
    assert names == sorted(path.name for path in (tmp_path / "cut").iterdir()) and len(names) == 24
    for name in names:
        if name != "labels.json":  # it names its folder's teacher path, the same here
            assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert json.loads((tmp_path / "cut" / "labels.json").read_text()) == \
        json.loads((tmp_path / "whole" / "labels.json").read_text())


@pytest.mark.slow
def test_labels_that_do_not_fit_the_data_are_refused_in_one_line(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=3)
    teacher = folder_teacher(tmp_path / "teacher.safetensors")
    labels = tmp_path / "labels"
    assert main(["label", "--teacher", str(teacher), "--data", str(data), "--output", str(labels)]) == 0
    manifest = json.loads((labels / "labels.json").read_text())
    assert manifest["keys"] == [f"{name}/{index}.png" for name in ("bright", "dark") for index in range(3)]
    train = ["train", "--data", str(data), "--model", "biformer_nano", "--img-size", "64", "--epochs", "1",
             "--batch-size", "2", "--token-label", str(labels)]

    # labels made otherwise: the same folder with other settings
    capsys.readouterr()
    assert main(["label", "--teacher", str(teacher), "--data", str(data), "--output", str(labels), "--topk", "1"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "holds labels made otherwise (topk differ)" in error

    # an image resized since it was labelled
    Image.open(data / "train" / "dark" / "1.png").resize((48, 40)).save(data / "train" / "dark" / "1.png")
    assert main([*train, "--output", str(tmp_path / "resized")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "labelled it as a 40x40 image, and 'dark/1.png' is 48x40 now" in error

    # an image the labels do not hold
    Image.new("RGB", (40, 40)).save(data / "train" / "dark" / "9.png")
    assert main([*train, "--output", str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "has no labels for 1 of the 7 training images (first 'dark/9.png')" in error
    assert not (tmp_path / "missing").exists()

    # an unfinished folder
    (labels / "shard-00000.safetensors").unlink()
    assert main([*train, "--output", str(tmp_path / "unfinished")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is incomplete: 1 of 1 shards are missing" in error

    # token-label options without labels
    assert main(["train", "--data", str(data), "--mixtoken", "--output", str(tmp_path / "stray")]) == 2
    assert "--mixtoken (given) train with token labels: give --token-label" in capsys.readouterr().err


@pytest.mark.slow
def test_training_with_token_labels_logs_both_losses_and_saves_a_plain_classifier(tmp_path):
    teacher = digits_teacher(tmp_path / "teacher.safetensors")
    assert main(["label", "--teacher", str(teacher), "--output", str(tmp_path / "labels"), "--topk", "3"]) == 0
    output = tmp_path / "run"
    assert main(["train", "--model", "biformer_nano", "--img-size", "64", "--iters", "3", "--batch-size", "16",
                 "--token-label", str(tmp_path / "labels"), "--mixtoken", "--token-label-weight", "0.25",
                 "--smoothing", "0.1", "--output", str(output)]) == 0
    row = read_metrics(output)[-1]
    # the logged loss is the class loss plus the weighted token loss (means over the same images)
    assert row["train_loss"] == pytest.approx(row["train_class_loss"] + 0.25 * row["train_token_loss"], rel=1e-5)
    weights = read_state_dict(output / "best.safetensors")
    plain = timm.create_model("biformer_nano", num_classes=10)
    plain.load_state_dict(weights)  # strict: the dense head stays out of the weights file
    assert not [key for key in weights if "token_head" in key]
    state = torch.load(output / "last.state.pt", weights_only=True)
    assert "token_head.weight" in state["model"]  # ...and in the run state, which --resume continues


@pytest.mark.slow
def test_the_in1k_tl_recipe_shows_every_setting_with_its_source(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=3)
    labels = tmp_path / "labels"
    assert main(["label", "--teacher", str(folder_teacher(tmp_path / "teacher.safetensors")), "--data", str(data),
                 "--output", str(labels)]) == 0
    run = ["train", "--model", "biformer_nano", "--recipe", "in1k-tl", "--data", str(data), "--batch-size", "2",
           "--img-size", "64", "--dry-run"]
    capsys.readouterr()
    assert main([*run, "--output", str(tmp_path / "unlabelled")]) == 2
    assert ("--mixtoken and --token-label-weight (recipe in1k-tl) train with token labels: give --token-label LABELS"
            in capsys.readouterr().err)
    assert main([*run, "--token-label", str(labels), "--output", str(tmp_path / "run")]) == 0
    table = capsys.readouterr().out
    options = json.loads((tmp_path / "run" / "config.json").read_text())["options"]
    expected = {"mixtoken": (True, "recipe in1k-tl"), "token_label_weight": (0.5, "recipe in1k-tl"),
                "mixup": (0.0, "recipe in1k-tl"), "cutmix": (0.0, "recipe in1k-tl"), "epochs": (300, "recipe in1k-tl"),
                "smoothing": (0.1, "recipe in1k-tl"), "token_label": (str(labels), "given"), "batch_size": (2, "given")}
    for name, (value, source) in expected.items():
        assert (options[name]["value"], options[name]["source"]) == (value, source), name
        assert f"--{name.replace('_', '-')} " in table
    assert all(entry["source"] for entry in options.values())


@pytest.mark.slow
def test_processes_of_a_torchrun_label_their_own_shards(tmp_path, monkeypatch):
    from biformer.tasks.labelling import label_images

    teacher = digits_teacher(tmp_path / "teacher.safetensors")
    settings = dict(teacher_model=None, shard_size=256, topk=2)
    counts = []
    for rank in (1, 0):  # the manifest comes from rank 0, whichever finishes first
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        counts.append(label_images(str(teacher), "digits", tmp_path / "shared", **settings))
    assert [count["labelled_now"] for count in counts] == [256 * 2 + 157, 256 * 3]  # shards 1, 3, 5 / 0, 2, 4
    assert [count["missing_shards"] for count in counts] == [3, 0]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    label_images(str(teacher), "digits", tmp_path / "alone", **settings)
    for path in sorted((tmp_path / "alone").glob("shard-*")):
        assert path.read_bytes() == (tmp_path / "shared" / path.name).read_bytes(), path.name


def test_mixtoken_cuts_boxes_on_a_grid_of_two_tokens():
    # lambda ~ Beta(1, 1): the box side is int(2 sqrt(1 - lambda)) tokens, at least 1 with probability 3/4
    np.random.seed(0)
    mix = MixToken((2, 2))
    areas = [(bottom - top) * (right - left) for top, left, bottom, right in (mix.sample_box() for _ in range(400))]
    assert 0.6 < np.mean([area > 0 for area in areas]) < 0.9


def test_a_folder_sample_carries_the_labels_of_its_crop_and_flip(tmp_path):
    """The whole path of a training sample: timm's folder transform (random resized crop, bicubic, flip 0.5, then
    normalisation) through TokenLabelledImages, its token labels against the classes of the pixels it shows."""
    from biformer.data.classification import build_datasets
    from biformer.data.token_labels import LabelsManifest, TokenLabelledImages, TokenLabels, write_shard
    from biformer.training.stream import seed_sample

    classes = quadrant_scene(80, 96, 40, 48)
    for part in ("train", "val"):
        (tmp_path / "data" / part / "scene").mkdir(parents=True)
        Image.fromarray(COLOURS[classes].astype(np.uint8)).save(tmp_path / "data" / part / "scene" / "0.png")
    splits = build_datasets(str(tmp_path / "data"), 64)
    labels = tmp_path / "labels"
    labels.mkdir()
    cells = torch.as_tensor(quadrant_scene(4, 4, 2, 2))
    scores = torch.stack([torch.ones(4, 4), torch.zeros(4, 4)], -1)[None]  # top 2: the cell's class, then another
    indices = torch.stack([cells, (cells + 1) % 4], -1)[None]
    write_shard(labels / "shard-00000.safetensors", scores, indices, torch.tensor([[80, 96]]))
    LabelsManifest("test", "none", 64, str(tmp_path / "data"), ["scene"], 2, (4, 4), 8, ["scene/0.png"]).write(labels)
    dataset = TokenLabelledImages(splits.train, ["scene/0.png"], TokenLabels(labels), 4, (4, 4))
    mean, std = torch.tensor(splits.mean)[:, None, None], torch.tensor(splits.std)[:, None, None]
    flips = 0
    for position in range(16):
        seed_sample(0, 1, position)
        image, targets, problem = dataset[0]
        pixels_rgb = ((image * std + mean) * 255).permute(1, 2, 0).numpy()
        pixels = np.abs(pixels_rgb[:, :, None, :] - COLOURS[None, None]).sum(-1).argmin(-1)
        flips += bool(pixels[0, 0] in (1, 3) and pixels[0, -1] in (0, 2))  # the left half shows the right classes
        for a in range(4):
            for b in range(4):
                block = pixels[16 * a:16 * (a + 1), 16 * b:16 * (b + 1)]
                share = np.bincount(block.ravel(), minlength=4) / block.size
                label = targets.tokens[a, b].numpy()
                assert np.abs(label - share).max() <= 0.15, (position, a, b, label, share)
                if share.max() > 0.95:
                    assert label.argmax() == share.argmax()
    assert 3 <= flips <= 13  # flipped about half the time, and the labels followed
