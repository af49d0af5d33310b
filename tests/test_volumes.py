"""Volumes: a Decathlon folder (anisotropic voxels, an oblique affine) trains, evaluates and predicts on the input's
own grid; bad volume data is refused in one line before --output exists; BRA blocks train inside a MONAI network."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

nibabel = pytest.importorskip("nibabel", reason="volumes need the medical extra: pip install 'biformer[medical]'")
pytest.importorskip("monai", reason="volumes need the medical extra: pip install 'biformer[medical]'")

from biformer.cli import main  # noqa: E402
from biformer.errors import UserError  # noqa: E402
from biformer.tasks import registry  # noqa: E402

SHAPE = (20, 24, 12)


def _oblique_affine() -> np.ndarray:
    """0.8 x 1.0 x 2.5 mm voxels, turned 20 degrees about the z axis and shifted: no axis-aligned grid."""
    angle = math.radians(20)
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 1.0, 2.5])
    affine[:3, 3] = [-12.0, 30.5, 7.0]
    return affine


def _volume(seed: int) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.uint8)
    x, y, z = (int(v) for v in generator.integers(4, 8, 3))
    label[x:x + 8, y:y + 8, z // 2:z // 2 + 5] = 1
    image = generator.normal(0.1, 0.05, SHAPE).astype(np.float32) + 0.8 * label
    return image, label


def _decathlon(root: Path, cases: int = 6, **changes) -> Path:
    """DATA/dataset.json, imagesTr, labelsTr, imagesTs in the Decathlon layout; `changes` break one thing."""
    for part in ("imagesTr", "labelsTr", "imagesTs"):
        (root / part).mkdir(parents=True)
    affine, training = _oblique_affine(), []
    for index in range(cases):
        image, label = _volume(index)
        if index == 1 and "label_shape" in changes:
            label = label[:-2]
        if index == 1 and "label_value" in changes:
            label[0, 0, 0] = 7
        if index == 1 and "flat_image" in changes:
            image = image[:, :, 0]
        name = f"case_{index}.nii.gz"
        nibabel.save(nibabel.Nifti1Image(image, affine), root / "imagesTr" / name)
        nibabel.save(nibabel.Nifti1Image(label, affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    image, _ = _volume(99)
    nibabel.save(nibabel.Nifti1Image(image, affine), root / "imagesTs" / "new_0.nii.gz")
    if "no_json" not in changes:
        described = {"labels": {"0": "background", "1": "lesion"}, "modality": {"0": "MRI"}, "training": training,
                     "test": ["./imagesTs/new_0.nii.gz"]}
        (root / "dataset.json").write_text(json.dumps(described))
    return root


def _train(tmp_path, data, *extra):
    return main(["train", "--model", "unet_biformer3d_nano", "--data", str(data), "--img-size", "64", "--epochs", "1",
                 "--batch-size", "2", "--no-tensorboard", "--output", str(tmp_path / "run"), *extra])


def test_volume_models_belong_to_their_task():
    assert registry.task_for_model("unet_biformer3d_tiny").name == "volume-segmentation"
    assert registry.task_for_model("biformer3d_tiny").name == "video"
    for monai_network in ("swinunetr-24", "swinunetr-48", "monai_unet"):
        assert registry.task_for_model(monai_network).name == "volume-segmentation"
    with pytest.raises(UserError, match="is no model of any task"):
        registry.task_for_model("swinunetr-25")  # SwinUNETR's widths are multiples of its 12 heads


def test_the_sides_a_monai_network_takes_are_the_ones_monai_runs():
    """volume_side_multiple against MONAI itself: UNet runs at a multiple of 16 that is no multiple of 32,
    SwinUNETR refuses one."""
    from biformer.dense.volumes import create_volume_model, volume_side_multiple

    assert volume_side_multiple("unet_biformer3d_nano") == 1
    assert volume_side_multiple("monai_unet") == 16 and volume_side_multiple("swinunetr-24") == 32
    with torch.no_grad():
        assert create_volume_model("monai_unet", 3).eval()(torch.zeros(1, 1, 48, 32, 16)).shape == (1, 3, 48, 32, 16)
        with pytest.raises(ValueError):
            create_volume_model("swinunetr-24", 3).eval()(torch.zeros(1, 1, 48, 32, 32))


def test_monai_networks_train_evaluate_and_export_through_the_same_commands(tmp_path, capsys):
    """MONAI's UNet takes the commands ours take (one command compares them); its file exports at its crop and is
    checked against eager PyTorch; --dynamic, and a window it cannot take, are refused in one line (it takes
    multiples of 16 only)."""
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is in the test extra")
    data = _decathlon(tmp_path / "data")
    assert main(["train", "--model", "monai_unet", "--data", str(data), "--img-size", "64", "--epochs", "1",
                 "--batch-size", "2", "--no-tensorboard", "--output", str(tmp_path / "run")]) == 0
    assert "final validation Dice" in capsys.readouterr().out
    checkpoint = str(tmp_path / "run" / "best.safetensors")
    assert main(["eval", "--checkpoint", checkpoint, "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 2
    assert main(["eval", "--checkpoint", checkpoint, "--data", str(data), "--img-size", "72"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "multiples of 16" in error and "choose e.g. 64" in error
    assert main(["export", str(tmp_path / "unet.onnx"), "--checkpoint", checkpoint]) == 0
    output = capsys.readouterr().out
    assert "input (1, 1, 64, 64, 64): max abs error" in output and "1x1x64x64x64 only" in output
    assert main(["export", str(tmp_path / "free.onnx"), "--checkpoint", checkpoint, "--dynamic"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "without --dynamic" in error and not (tmp_path / "free.onnx").exists()


@pytest.mark.parametrize("model, crop, extra, message", [
    ("swinunetr-24", "80", [], "takes only sides that are multiples of 32 (ours pad any size); choose e.g. 64"),
    ("monai_unet", "64", ["--drop-path", "0.1"], "MONAI's UNet has no stochastic depth"),
    ("monai_unet", "64", ["--pretrained", "PRETRAINED"], "MONAI's monai_unet has none of ours"),
])
def test_what_a_monai_network_cannot_take_is_refused_in_one_line(tmp_path, capsys, model, crop, extra, message):
    import timm
    from safetensors.torch import save_file

    if "PRETRAINED" in extra:
        save_file(timm.create_model("biformer_nano", num_classes=10).state_dict(), tmp_path / "nano.safetensors")
        extra = [str(tmp_path / "nano.safetensors") if item == "PRETRAINED" else item for item in extra]
    assert main(["train", "--model", model, "--data", "synthetic-volumes", "--img-size", crop, "--epochs", "1",
                 "--output", str(tmp_path / "run"), *extra]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error and not (tmp_path / "run").exists()


def test_a_decathlon_folder_trains_evaluates_and_predicts_on_the_inputs_grid(tmp_path, capsys):
    data = _decathlon(tmp_path / "data")
    assert _train(tmp_path, data) == 0
    output = capsys.readouterr()
    assert "final validation Dice" in output.out and "zero-padded to it" in output.err  # 20x24x12 voxels < 64
    checkpoint = str(tmp_path / "run" / "best.safetensors")
    assert main(["eval", "--checkpoint", checkpoint, "--data", str(data), "--json", "--overlap", "0.25"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == 2 and 0 <= result["dice"] <= 100 and len(result["class_dice"]) == 1
    assert main(["predict", str(data / "imagesTs"), "--checkpoint", checkpoint, "--output", str(tmp_path / "out")]) == 0
    written = nibabel.load(tmp_path / "out" / "new_0_labels.nii.gz")
    source = nibabel.load(data / "imagesTs" / "new_0.nii.gz")
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}
    assert (tmp_path / "out" / "new_0_slices.png").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new_0_labels.nii.gz", "new_0_slices.png"]


@pytest.mark.parametrize("change, message", [
    ("label_shape", "is (18, 24, 12) voxels but its image"),
    ("label_value", "holds value(s) [7] beyond dataset.json's labels 0..1"),
    ("no_json", "has no dataset.json"),
    ("flat_image", "3-D models take volumes"),
])
def test_bad_volume_data_is_refused_in_one_line(tmp_path, capsys, change, message):
    data = _decathlon(tmp_path / "data", **{change: True})
    assert _train(tmp_path, data) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error and not (tmp_path / "run").exists()


def test_a_crop_below_the_decoders_least_is_refused(tmp_path, capsys):
    assert main(["train", "--model", "unet_biformer3d_nano", "--data", "synthetic-volumes", "--img-size", "32",
                 "--output", str(tmp_path / "run")]) == 2
    assert "needs at least 64 voxels per side" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_volume_model_takes_any_size_and_inflates_an_image_checkpoint(tmp_path):
    import timm
    from safetensors.torch import save_file

    from biformer.dense.volumes import create_volume_model

    image_model = timm.create_model("biformer_nano", num_classes=10)
    save_file(image_model.state_dict(), tmp_path / "nano.safetensors")
    model = create_volume_model("unet_biformer3d_nano", 3, 2, backbone_checkpoint=tmp_path / "nano.safetensors")
    assert "adapted from 3 to 2 channels" in model.checkpoint_report.kind
    # the oracle: timm's rule for 2 of 3 channels (the first two, scaled by 3 / 2), then inflation over depth (a
    # 3x3x3 conv that pads depth keeps the image kernel at its centre slice, zeros elsewhere)
    stem, rgb = model.encoder.stem[0].weight, image_model.stem[0].weight  # (16, 2, 3, 3, 3), (16, 3, 3, 3)
    assert torch.allclose(stem[:, :, 1], rgb[:, :2] * 3 / 2)
    assert torch.count_nonzero(stem[:, :, 0]) == 0 and torch.count_nonzero(stem[:, :, 2]) == 0
    with torch.no_grad():
        logits = model.eval()(torch.randn(1, 2, 37, 50, 41))
    assert logits.shape == (1, 3, 37, 50, 41)


def test_a_bra_block_trains_inside_a_monai_network():
    from monai.networks.nets import BasicUNet

    from biformer.integrations.monai import BRATransformerBlock

    torch.manual_seed(0)
    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(8, 8, 16, 32, 64, 8))
    block = BRATransformerBlock(64, num_heads=4, n_win=2, topk=2)
    net.down_4 = torch.nn.Sequential(net.down_4, block)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    volumes, labels = torch.randn(2, 1, 32, 32, 32), torch.randint(0, 2, (2, 32, 32, 32))
    before = [p.detach().clone() for p in block.parameters()]
    loss = torch.nn.functional.cross_entropy(net(volumes), labels)
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item())
    assert all(not torch.equal(old, new) for old, new in zip(before, block.parameters()) if new.requires_grad)


@pytest.mark.slow
def test_bench_volumes_measures_each_case_in_a_fresh_process(tmp_path, capsys):
    csv = tmp_path / "volumes.csv"
    assert main(["bench", "volumes", "unet_biformer3d_nano", "monai_unet", "--sides", "64", "--modes", "inference",
                 "--repeats", "1", "--csv", str(csv)]) == 0
    rows = csv.read_text().splitlines()
    assert rows[0].startswith("model,side,mode,params_m") and len(rows) == 3
    for row in rows[1:]:
        model, side, mode, params, loaded, peak, rate, threads = row.split(",")
        assert side == "64" and mode == "inference" and float(peak) >= float(loaded) > 0 and float(rate) > 0
    assert main(["bench", "volumes", "no_such_model"]) == 2
    assert "unknown volume model 'no_such_model'" in capsys.readouterr().err


def test_class_scores_match_a_hand_count():
    from biformer.tasks.volumes import class_scores

    truth = torch.zeros(10, 12, 8, dtype=torch.long)
    truth[2:6, 2:6, 2:6] = 1  # a 4x4x4 cube
    truth[7:9, 7:10, 5:7] = 2
    predicted = truth.clone()
    predicted[2:6, 2:6, 2] = 0  # the cube's first slice (2 mm thick) missed
    scores = class_scores(predicted, truth, 4, (1.0, 1.0, 2.0))
    # Dice 2 * 48 / (48 + 64); HD95 2 mm (the missed slice's surface lies one 2-mm slice from the prediction's);
    # class 2 exact; class 3 absent from the truth
    assert scores[0] == (pytest.approx(96 / 112), pytest.approx(2.0)) and scores[1] == (1.0, 0.0)
    assert scores[2] == (None, None)
    # a class the prediction misses: Dice 0 and the volume's diagonal, sqrt(10^2 + 12^2 + 16^2) mm
    assert class_scores(torch.zeros_like(truth), truth, 3, (1.0, 1.0, 2.0))[0] == (0.0, pytest.approx(500 ** 0.5))


class _Threshold(torch.nn.Module):
    """Background logit 0, lesion logit the normalized intensity minus a threshold: the lesion wherever the volume
    is brighter than the threshold, whatever the window."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, volumes):
        return torch.cat([torch.zeros_like(volumes), volumes - self.threshold], 1)


def test_predictions_return_to_the_inputs_grid_voxel_for_voxel(tmp_path):
    from biformer.tasks import predict

    data = _decathlon(tmp_path / "data")
    assert _train(tmp_path, data) == 0
    restored = registry.restore(tmp_path / "run" / "best.safetensors")
    image, label = _volume(2)  # case_2: every voxel non-zero, so normalized by the whole volume's statistics
    restored.model = _Threshold((0.5 - image.mean()) / image.std())  # halfway between background and lesion
    case = data / "imagesTr" / "case_2.nii.gz"
    [prediction] = predict(restored, [case], output=tmp_path / "out")
    written = nibabel.load(tmp_path / "out" / "case_2_labels.nii.gz")
    assert np.array_equal(np.asarray(written.dataobj), label) and prediction.result["voxels"]["lesion"] == label.sum()


def test_a_perfect_model_scores_full_dice_and_no_distance(tmp_path):
    from biformer.tasks import evaluate

    data = _decathlon(tmp_path / "data")
    assert _train(tmp_path, data) == 0
    restored = registry.restore(tmp_path / "run" / "best.safetensors")
    # normalized, the background lies below 1 and a lesion near 4 in every volume: 2 separates them
    restored.model = _Threshold(2.0)
    result = evaluate(restored, str(data))
    assert result["count"] == 2 and result["class_dice"] == [pytest.approx(100)] and result["hd95_mm"] == 0
    restored.model = _Threshold(1e9)  # misses every lesion: Dice 0, HD95 each volume's diagonal
    diagonal = math.dist((0, 0, 0), (20 * 0.8, 24 * 1.0, 12 * 2.5))
    result = evaluate(restored, str(data))
    assert result["dice"] == 0 and result["hd95_mm"] == pytest.approx(diagonal, rel=1e-3)


def test_instance_norm_by_axis_is_the_definition():
    """The exported graph's instance norm against the formula (float64): per sample and channel, x minus its mean
    over every voxel, over the square root of the biased variance plus eps."""
    from biformer.layers.instance_norm import ExportableInstanceNorm, instance_norm_by_axis

    x = 10 + 0.1 * torch.randn(2, 3, 5, 6, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    axes = (2, 3, 4)
    want = (x - x.mean(axes, keepdim=True)) / torch.sqrt(x.var(axes, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(instance_norm_by_axis(x, 1e-5), want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ExportableInstanceNorm()(x), want, atol=1e-12, rtol=1e-12)  # eager: ATen's kernel


@pytest.mark.slow
def test_a_volume_model_in_onnx_runtime_equals_eager_pytorch(tmp_path, capsys):
    """`biformer export --dynamic` of a trained volume checkpoint: one ONNX file for every batch, depth, height and
    width, checked by the command at three sizes and here, in ONNX Runtime, at a fourth that the model pads on every
    axis. ONNX Runtime's InstanceNormalization had put the whole model 8e-4 (1e-4 of its outputs) from eager PyTorch;
    the decoder's norms now export as means taken axis by axis."""
    ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime is in the test extra")
    from biformer.tasks.registry import restore

    assert _train(tmp_path, _decathlon(tmp_path / "data")) == 0
    capsys.readouterr()  # the training's lines
    checkpoint = tmp_path / "run" / "best.safetensors"
    assert main(["export", str(tmp_path / "unet.onnx"), "--checkpoint", str(checkpoint), "--img-size", "40", "48",
                 "36", "--dynamic"]) == 0
    output = capsys.readouterr().out
    assert output.count(" ok") == 3 and "batch, depth, height and width free (1 modality)" in output
    session = ort.InferenceSession(str(tmp_path / "unet.onnx"), providers=["CPUExecutionProvider"])
    model = restore(checkpoint).model.eval()
    volume = torch.randn(2, 1, 35, 64, 70, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(volume).numpy()
    got = session.run(None, {session.get_inputs()[0].name: volume.numpy()})[0]
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_volume_slices_come_from_training_volumes_only(tmp_path):
    """tools/volume_slices.py (the inflated arm's 2-D data): every slice is of a training case, never of a case the
    3-D models validate on, in the class folders `biformer train --data` reads, classed by the labels it cuts."""
    import subprocess
    import sys

    from biformer.data.volumes import read_decathlon, synthetic_volumes_folder

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "tools" / "volume_slices.py"), str(tmp_path / "slices"),
                             "--every", "8"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    dataset = read_decathlon(str(synthetic_volumes_folder()))
    validating = {case.image.name.removesuffix(".nii.gz") for case in dataset.validation}
    written = list((tmp_path / "slices").glob("*/*/*.png"))
    assert {path.parts[-3] for path in written} == {"train", "val"}
    assert {path.parts[-2] for path in written} <= {"empty", "ball", "box", "ball_and_box"}
    assert not {path.name.rsplit("_", 1)[0] for path in written} & validating
    # every 8th slice of 64 + 64 + 48 per case: 8 + 8 + 6
    assert len(written) == 22 * len(dataset.training)
    some = next(path for path in written if path.parts[-2] == "ball")
    stem, place = some.name.removesuffix(".png").rsplit("_", 1)
    labels = np.asarray(nibabel.load(next(c.label for c in dataset.training if c.image.name.startswith(stem))).dataobj)
    cut = np.take(labels, int(place[1:]), axis="xyz".index(place[0]))
    assert (cut == 1).sum() >= 20 and (cut == 2).sum() < 20
