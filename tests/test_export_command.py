"""`biformer export`: a checkpoint or a bare model written as a checked file; bad input gets a one-line error and
leaves no file behind; a file that differs from eager PyTorch is never written."""
from __future__ import annotations

import os

import pytest
import timm
import torch
from test_user_mistakes import assert_one_line_error, cli

import biformer.models  # noqa: F401  (registers the models with timm)
from biformer.checkpoints import save_weights
from biformer.export import ExportMismatchError, ExportSettings, export, openvino_core

pytest.importorskip("onnxruntime", reason="ONNX EXTRA NOT INSTALLED: export not checked")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A classifier checkpoint as `biformer train` writes it (trained at 48 px)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("checkpoint") / "best.safetensors"
    save_weights(path, timm.create_model("biformer_nano", num_classes=10),
                 {"model": "biformer_nano", "classes": [str(i) for i in range(10)], "epoch": 1, "img_size": 48,
                  "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0})
    return path


def _files(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_a_checkpoint_at_its_training_size(checkpoint, tmp_path, capsys):
    rc, out, err = cli(capsys, "export", tmp_path / "nano.pt", "--checkpoint", checkpoint)
    assert rc == 0, err
    assert "input (1, 3, 48, 48): max abs error" in out and " ok" in out
    outputs = torch.jit.load(tmp_path / "nano.pt")(torch.randn(1, 3, 48, 48))
    assert outputs.shape == (1, 10)
    assert _files(tmp_path) == ["nano.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nano.onnx", "nano.pt"], ids=["dynamo_onnx", "trace"])
def test_a_bare_model_dynamic_export_checked_on_three_sizes(tmp_path, capsys, name):
    rc, out, err = cli(capsys, "export", tmp_path / name, "--model", "biformer_nano", "--img-size", "64", "--dynamic")
    assert rc == 0, err
    checked = [line for line in out.splitlines() if "max abs error" in line]
    assert len(checked) == 3 and all(line.endswith(" ok") for line in checked), out
    assert "(1, 3, 60, 84)" in out and "(3, 3, 33, 36)" in out  # sides not divisible by 32; maps below n_win


@pytest.mark.slow
def test_the_backbone_of_a_checkpoint_gives_four_maps(checkpoint, tmp_path, capsys):
    rc, out, err = cli(capsys, "export", tmp_path / "backbone.onnx", "--checkpoint", checkpoint, "--backbone",
                       "--legacy", "--img-size", "64", "96")
    assert rc == 0, err
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "backbone.onnx"), providers=["CPUExecutionProvider"])
    shapes = [tuple(output.shape) for output in session.get_outputs()]
    assert shapes == [(1, 32, 16, 24), (1, 64, 8, 12), (1, 128, 4, 6), (1, 256, 2, 3)]


@pytest.mark.slow
def test_a_detector_through_the_legacy_onnx_exporter(tmp_path, capsys):
    """FCOS with random weights finds boxes at 128 px (RetinaNet and Mask R-CNN find none): non-empty outputs
    compared, boxes, scores and labels."""
    rc, out, err = cli(capsys, "export", tmp_path / "fcos.onnx", "--model", "fcos_biformer_nano", "--legacy",
                       "--img-size", "128")
    assert rc == 0, err
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "fcos.onnx"), providers=["CPUExecutionProvider"])
    boxes = session.run(None, {"images": torch.randn(1, 3, 128, 128).numpy()})[0]
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and " ok" in out


@pytest.mark.parametrize("argv, fragments", [
    (["--model", "biformer_nano", "--img-size", "16"], ["--img-size 16 16", "within 32..4096"]),
    (["--model", "biformer_nano", "--img-size", "32", "--dynamic", "--format", "onnx"], ["within 33..4096"]),
    (["--model", "biformer_nano", "--img-size", "32", "48", "64"], ["--img-size takes H and W"]),
    (["--model", "no_such_model"], ["--model 'no_such_model' is no model of any task"]),
    ([], ["pass --checkpoint FILE", "or --model NAME"]),
    (["--model", "sfpn_biformer_nano", "--backbone"], ["--backbone needs a BiFormer classifier"]),
    (["--model", "retinanet_biformer_nano"], ["detection models export with --format onnx --legacy only"]),
    (["--model", "fcos_biformer_nano", "--format", "onnx", "--legacy", "--dynamic"], ["detection models export at a fixed size"]),
    (["--model", "unet_biformer3d_nano", "--img-size", "64", "48"], ["--img-size of a volume model takes D H W"]),
    (["--model", "unet_biformer3d_nano", "--img-size", "16", "64", "20"], ["--img-size 16 64 20", "within 33..4096"]),
    (["--model", "unet_biformer3d_nano", "--frames", "8"], ["--frames: not for volume models"]),
    (["--model", "monai_unet", "--img-size", "40"], ["--img-size 40 40 40", "multiples of 16", "choose e.g. 32 32 32"]),
    (["--model", "monai_unet", "--dynamic", "--format", "onnx"], ["MONAI's monai_unet", "without --dynamic"]),
])
def test_bad_options(tmp_path, capsys, argv, fragments):
    rc, _, err = cli(capsys, "export", tmp_path / ("model.onnx" if "onnx" in argv else "model.pt"), *argv)
    assert_one_line_error(rc, err, *fragments)
    assert _files(tmp_path) == []


def test_unknown_suffix_without_format(tmp_path, capsys):
    rc, _, err = cli(capsys, "export", tmp_path / "model.tflite", "--model", "biformer_nano")
    assert_one_line_error(rc, err, "cannot tell the format", ".onnx (onnx)", "--format")
    assert _files(tmp_path) == []


def test_unknown_format_is_refused_by_the_parser(tmp_path, capsys):
    rc, _, err = cli(capsys, "export", tmp_path / "model.onnx", "--model", "biformer_nano", "--format", "tflite")
    assert rc == 2 and "invalid choice: 'tflite'" in err and "Traceback" not in err
    assert _files(tmp_path) == []


def test_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    rc, _, err = cli(capsys, "export", tmp_path / "model.pt", "--checkpoint", bad, "--model", "biformer_nano")
    assert_one_line_error(rc, err, str(bad))
    assert _files(tmp_path) == ["bad.safetensors"]


@pytest.mark.parametrize("case", ["missing-folder", "read-only-folder"])
def test_unwritable_output(tmp_path, capsys, case):
    folder = tmp_path / "out"
    if case == "read-only-folder":
        folder.mkdir()
        folder.chmod(0o500)
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user who may write anywhere (root): a read-only folder cannot be made")
    rc, _, err = cli(capsys, "export", folder / "model.pt", "--model", "biformer_nano", "--img-size", "32")
    assert_one_line_error(rc, err, str(folder))
    assert not folder.exists() or _files(folder) == []


class _DiffersWhenExported(torch.nn.Module):
    """Output = input, but for a trace or torch.export, which see input + 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1 if torch.jit.is_tracing() or torch.compiler.is_exporting() else x


@pytest.mark.parametrize("name, settings", [("model.pt", ExportSettings("torchscript")),
                                            ("model.xml", ExportSettings("openvino"))], ids=["trace", "openvino"])
def test_a_file_that_differs_from_eager_is_not_written(tmp_path, name, settings):
    if settings.format == "openvino":
        pytest.importorskip("openvino", reason="OPENVINO EXTRA NOT INSTALLED: its export not checked")
    with pytest.raises(ExportMismatchError, match="differs from eager PyTorch.*MISMATCH"):
        export(_DiffersWhenExported(), tmp_path / name, settings, 32, 32)
    assert _files(tmp_path) == []  # neither the .xml nor its .bin, nor the ONNX file between


@pytest.mark.parametrize("dynamic", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["static", "dynamic"])
def test_an_openvino_model_equals_eager_pytorch(checkpoint, tmp_path, capsys, dynamic):
    """Run here in OpenVINO (float32) against the checkpoint's model in eager PyTorch; with --dynamic at another
    batch and sides not divisible by 32."""
    pytest.importorskip("openvino", reason="OPENVINO EXTRA NOT INSTALLED: its export not checked")
    from biformer.tasks.registry import restore

    rc, out, err = cli(capsys, "export", tmp_path / "nano.xml", "--checkpoint", checkpoint,
                       *(["--dynamic"] if dynamic else []))
    assert rc == 0, err
    assert _files(tmp_path) == ["nano.bin", "nano.xml"]
    compiled = openvino_core().compile_model(str(tmp_path / "nano.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    model = restore(checkpoint).model
    torch.manual_seed(1)
    for shape in [(1, 3, 48, 48), *([(3, 3, 45, 70)] if dynamic else [])]:
        images = torch.randn(shape)
        with torch.no_grad():
            expected = model(images)
        got = torch.from_numpy(compiled(images.numpy())[compiled.outputs[0]])
        assert got.shape == expected.shape and (got - expected).abs().max() < 1e-4
