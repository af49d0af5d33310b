"""The video task: clip models train, evaluate (several views per clip) and predict clips through the commands;
bad clip data is refused in one line before --output exists."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from biformer.cli import main
from biformer.data.video import ClipSampling
from biformer.errors import UserError
from biformer.tasks import registry
from biformer.tasks.inference import evaluate
from biformer.tasks.video import VideoEvalOptions, VideoTask, create_clip_model


def _clip_folder(root: Path, classes=("left", "right"), clips=2, frames=6, side=32) -> Path:
    """DATA/{train,val}/<class>/<clip>/ of PNG frames: a bright bar moving left or right over a dark frame."""
    for split in ("train", "val"):
        for label, name in enumerate(classes):
            for index in range(clips):
                folder = root / split / name / f"clip{index}"
                folder.mkdir(parents=True)
                for t in range(frames):
                    frame = np.full((side, side, 3), 20 + 10 * index, np.uint8)
                    x = 4 + 4 * t if label == 0 else side - 8 - 4 * t
                    frame[:, x:x + 4] = 230
                    Image.fromarray(frame).save(folder / f"{t:03d}.png")
    return root


def _train(tmp_path, data, *extra):
    return main(["train", "--model", "biformer3d_nano", "--data", str(data), "--img-size", "32", "--frames", "4",
                 "--frame-stride", "1", "--epochs", "1", "--batch-size", "2", "--no-tensorboard",
                 "--output", str(tmp_path / "run"), *extra])


def test_clip_models_belong_to_the_video_task():
    for name in ("biformer3d_nano", "biformer3d_tiny", "swin3d_t", "r3d_18"):
        assert registry.task_for_model(name).name == "video"
    assert registry.task_for_model("biformer_tiny").name == "classification"


def test_a_clip_model_trains_evaluates_and_predicts_a_clip_folder(tmp_path, capsys):
    data = _clip_folder(tmp_path / "data")
    assert _train(tmp_path, data) == 0
    checkpoint = tmp_path / "run" / "best.safetensors"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--views", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == 4 and result["views"] == 3 and 0 <= result["top1"] <= 100
    assert main(["predict", str(data / "val"), "--checkpoint", str(checkpoint), "--topk", "2", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(line["image"]).name for line in lines] == ["clip0", "clip1", "clip0", "clip1"]
    for line in lines:
        probabilities = [entry["probability"] for entry in line["predictions"]]
        assert {entry["class"] for entry in line["predictions"]} == {"left", "right"}
        assert sum(probabilities) == pytest.approx(1, abs=1e-5) and probabilities[0] >= probabilities[1]


def test_an_unreadable_video_is_refused_before_the_output_exists(tmp_path, capsys):
    data = _clip_folder(tmp_path / "data")
    (data / "train" / "left" / "broken.mp4").write_bytes(b"not a video at all")
    assert _train(tmp_path, data) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "broken.mp4" in error and "cannot be read" in error
    assert not (tmp_path / "run").exists()


def test_short_clips_are_counted_and_looped_or_refused(tmp_path, capsys):
    data = _clip_folder(tmp_path / "data", frames=6)
    assert _train(tmp_path, data, "--frames", "4", "--frame-stride", "2", "--short-clips", "refuse") == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "8 of 8 clips" in error and "7 that --frames 4 x --frame-stride 2" in error
    assert not (tmp_path / "run").exists()
    for rule, done in (("loop", "looped"), ("pad", "their last frame repeated")):
        assert _train(tmp_path, data, "--frames", "4", "--frame-stride", "2", "--short-clips", rule, "--dry-run") == 0
        note = capsys.readouterr().err
        assert f"note: 8 of 8 clips of --data {data} have fewer frames" in note and f"{done} (--short-clips {rule})" in note


@pytest.mark.parametrize("model, data, message", [
    ("biformer_nano", "moving-digits", "holds clips, and image classifiers take images"),
    ("biformer_nano", "CLIPS", "holds clips, and image classifiers take images"),
    ("biformer3d_nano", "digits", "holds images; clip models train on --data moving-digits"),
])
def test_a_model_and_data_of_other_kinds_are_refused(tmp_path, capsys, model, data, message):
    if data == "CLIPS":
        data = tmp_path / "clips"
        (data / "train" / "a").mkdir(parents=True)
        (data / "train" / "a" / "x.mp4").write_bytes(b"")
    assert main(["train", "--model", model, "--data", str(data), "--output", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error and not (tmp_path / "run").exists()


def test_an_n_win_of_the_wrong_length_is_refused_in_one_line(tmp_path, capsys):
    data = _clip_folder(tmp_path / "data")
    assert _train(tmp_path, data, "--model-kwargs", "n_win=(2,2)") == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--model-kwargs n_win=(2,2)" in error and not (tmp_path / "run").exists()


def test_predict_skips_an_unreadable_clip_and_refuses_when_none_reads(tmp_path, capsys):
    data = _clip_folder(tmp_path / "data")
    assert _train(tmp_path, data) == 0
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    checkpoint = str(tmp_path / "run" / "best.safetensors")
    capsys.readouterr()
    assert main(["predict", str(broken), str(data / "val" / "left" / "clip0"), "--checkpoint", checkpoint]) == 0
    captured = capsys.readouterr()
    assert f"skipping unreadable clip {broken}" in captured.err and "1 unreadable clip(s) skipped" in captured.err
    assert main(["predict", str(broken), "--checkpoint", checkpoint]) == 2
    assert "none of the 1 clip(s) could be predicted" in capsys.readouterr().err


def test_torchvision_models_take_the_shared_stochastic_depth():
    def rates(model):
        return [module.p for module in model.modules() if type(module).__name__ == "StochasticDepth"]

    assert set(rates(create_clip_model("swin3d_t", 10))) == {0.0}
    scaled = rates(create_clip_model("swin3d_t", 10, drop_path_rate=0.2))
    assert max(scaled) == pytest.approx(0.2) and scaled == sorted(scaled) and scaled[0] == 0.0
    with pytest.raises(UserError, match="r3d_18 has no stochastic depth"):
        create_clip_model("r3d_18", 10, drop_path_rate=0.1)


def test_a_clip_checkpoint_records_its_sampling(tmp_path):
    data = _clip_folder(tmp_path / "data")
    assert _train(tmp_path, data, "--frames", "6", "--frame-stride", "1", "--short-clips", "pad") == 0
    restored = registry.restore(tmp_path / "run" / "best.safetensors")
    assert isinstance(restored.task, VideoTask)
    assert VideoTask.sampling(restored.metadata, 2) == ClipSampling(6, 1, 2, "pad")


def test_a_clip_query_view_puts_the_attention_in_the_routed_regions_of_each_time_step():
    import timm

    from biformer.analysis import visualize as vis

    torch.manual_seed(0)
    model = timm.create_model("biformer3d_nano").eval()
    layer = vis.bra_block(model, 1, -1)
    record = vis.capture_routing(model, torch.randn(1, 3, 8, 64, 64), layer)
    views = vis.clip_query_views(record, (3, 30, 20), stride=8, tubelet=2, frame_size=(64, 64))
    grid = record.routing.grid  # (T', H', W') = (4, 8, 8) tokens in 2 x 4 x 4 regions
    assert len(views) == 4 and grid.counts == (2, 4, 4) and grid.sizes == (2, 2, 2)
    # the oracle: the query token (frame 3 -> step 1, y 20 -> row 2, x 30 -> column 3) lies in region
    # (time 0, row 1, column 1) = 0 * 16 + 1 * 4 + 1
    routed = record.routing.indices[0, 5].tolist()
    assert all(view.query_region == 5 for view in views)
    for step, view in enumerate(views):
        in_step = [index for index in routed if index // 16 == step // 2]
        assert view.routed == in_step
        weight_outside = view.attention.copy()
        for index in view.routed:
            x0, y0, x1, y1 = view.boxes[index]
            weight_outside[y0:y1, x0:x1] = 0
        assert np.abs(weight_outside).max() == 0
    # a token's weight is spread evenly over its 8x8 pixels: the query's weights over all steps sum to 1
    assert sum(view.attention.sum() for view in views) == pytest.approx(1, abs=1e-5)


def test_visualize_draws_a_clip_checkpoint_and_refuses_what_does_not_fit(tmp_path, capsys):
    data = _clip_folder(tmp_path / "data", frames=6)
    assert _train(tmp_path, data) == 0
    checkpoint = str(tmp_path / "run" / "best.safetensors")
    clip = str(data / "val" / "left" / "clip0")
    output = tmp_path / "routing.png"
    common = ["visualize", "--checkpoint", checkpoint, "--block", "1.-1", "--output", str(output)]
    assert main([*common, "--clip", clip, "--query", "10", "20", "--frame", "2"]) == 0
    assert "the query routes to regions frames 0-1" in capsys.readouterr().out
    assert main([*common, "--query", "10", "20", "--frame", "2"]) == 0  # a moving digit by default
    assert "wrote" in capsys.readouterr().out
    with Image.open(output) as picture:
        assert picture.width > 4 * 128 and picture.height > 2 * 128  # 4 time steps, two rows
    output.unlink()
    for extra, message in ((["--image", "digits:0", "--query", "1", "1", "--frame", "0"], "--image is for image models"),
                           (["--clip", clip, "--query", "1", "1"], "give one --query X Y and --frame T"),
                           (["--clip", clip, "--query", "1", "1", "--frame", "4"], "--frame 4 is not one of the 4"),
                           (["--clip", "moving-digits:100000", "--query", "1", "1", "--frame", "0"], "moving-digits:N")):
        assert main([*common, *extra]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and message in error and not output.exists()


def test_a_clip_checkpoint_exports_at_the_frames_it_was_trained_on(tmp_path, capsys):
    data = _clip_folder(tmp_path / "data")
    assert _train(tmp_path, data, "--frames", "6", "--frame-stride", "1") == 0
    capsys.readouterr()
    output = tmp_path / "clip.pt2"
    assert main(["export", str(output), "--checkpoint", str(tmp_path / "run" / "best.safetensors")]) == 0
    assert "1x3x6x32x32 only" in capsys.readouterr().out and output.is_file()


class _FirstFrameBrightness(torch.nn.Module):
    """Logits (3 x the first frame's mean input, 0): a clip's prediction depends on where its view starts."""

    def forward(self, clips):  # (B, 3, T, H, W)
        first = clips[:, :, 0].mean((1, 2, 3))
        return torch.stack([3 * first, torch.zeros_like(first)], 1)


def test_views_start_evenly_and_their_probabilities_are_averaged(tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val"):
        for label, name in enumerate(("a_dim", "b_bright")):  # class folders are sorted by name: 0, 1
            folder = data / split / name / "clip"
            folder.mkdir(parents=True)
            for t in range(9):  # frame t is uniformly 20 + 25 t (+ 5 for the second class)
                Image.fromarray(np.full((32, 32, 3), 20 + 25 * t + 5 * label, np.uint8)).save(folder / f"{t}.png")
    assert _train(tmp_path, data) == 0
    restored = registry.restore(tmp_path / "run" / "best.safetensors")
    restored.model = _FirstFrameBrightness()
    mean, std = np.array(restored.mean), np.array(restored.std)
    # the oracle: 9 frames, views of 4 frames 1 apart (the training's sampling): 5 frames of room, so 3 views start
    # at frames 0, 2 (round(2.5), to even) and 5
    expected_loss = 0.0
    for label in (0, 1):
        probabilities = []
        for start in (0, 2, 5):
            brightness = float(np.mean(((20 + 25 * start + 5 * label) / 255 - mean) / std))
            probabilities.append(torch.tensor([3 * brightness, 0.0]).softmax(0))
        expected_loss -= math.log(float(sum(probabilities)[label] / 3)) / 2
    result = evaluate(restored, str(data), VideoEvalOptions(views=3))
    assert result["views"] == 3 and result["loss"] == pytest.approx(expected_loss, rel=1e-5)
