"""Exported BiFormer equals eager PyTorch (the oracle: the model run in the test), for each model kind a user
deploys (the classifier, the STL layout, the dense backbone, a segmentation model) and each exporter: the file
is written, loaded back as a user would (torch.jit.load, ONNX Runtime, torch.export.load) and run.

Every exporter is checked at its export size and at other batches and sizes: sides not divisible by 32
(196x300: the third stage's 13x19 map in 7x7 regions of 2x3, padded) and a small input (96x128: the third
stage's 6x8 map, smaller than its 7x7 regions).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import timm
import torch

import biformer.models  # noqa: F401  (registers the models with timm)
from biformer.dense import create_backbone, create_segmentation_model
from biformer.dense.inference import AnySizeSegmenter
from biformer.export import ExportSettings, one_graph_for_every_size, smallest_dynamic_side, write
from biformer.ops import BiLevelRoutingAttention

ort = pytest.importorskip("onnxruntime", reason="ONNX EXTRA NOT INSTALLED: export not checked")

TOLERANCE = 1e-4  # max abs, float32
EXPORT_SIZE = (2, 224, 224)  # (B, H, W)
OTHER_SIZES = [(1, 196, 300), (3, 96, 128)]

MODELS = {
    "biformer_tiny": lambda **kwargs: timm.create_model("biformer_tiny", **kwargs),
    "biformer_stl": lambda **kwargs: timm.create_model("biformer_stl", **kwargs),
    "dense_backbone": lambda **kwargs: create_backbone("biformer_tiny", **kwargs),
    "sfpn_biformer_tiny":
        lambda **kwargs: AnySizeSegmenter(create_segmentation_model("sfpn_biformer_tiny", 5, **kwargs)),
}
# A dynamic export of a whole model takes minutes on a 2-core CPU (biformer_tiny: about 3 per exporter), so the
# dynamic tests export each model with one block per stage: the blocks of a stage are alike, so these graphs
# differ from the whole models' only in how often the same blocks repeat (stems, stage kinds, region grids,
# heads and outputs are all there). The traced formats, fast to export, are checked on the whole models.
ONE_BLOCK_PER_STAGE = {"depths": (1, 1, 1, 1)}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[request.param]().eval()


@pytest.fixture(scope="module", params=list(MODELS))
def dynamic_model(request) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[request.param](**ONE_BLOCK_PER_STAGE).eval()


def _images(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(batch * height * width))


def _tensors(value) -> list[torch.Tensor]:
    """A model's outputs (a tensor or a list of feature maps) as a list."""
    return [value] if isinstance(value, torch.Tensor) else list(value)


def _max_error(run, model, images) -> float:
    with torch.no_grad():
        expected = _tensors(model(images))
        got = _tensors(run(images))
    assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in expected]
    return max((a - b).abs().max().item() for a, b in zip(got, expected))


def _onnx_runner(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: [torch.from_numpy(array) for array in session.run(None, {name: x.numpy()})]


@pytest.mark.slow
def test_torchscript_trace_runs_every_size(model, tmp_path):
    """A trace follows the sizes BRA and the segmenter's padding compute from the input: one file for every size."""
    write(model, _images(*EXPORT_SIZE), tmp_path / "model.pt", ExportSettings("torchscript", dynamic=True))
    loaded = torch.jit.load(tmp_path / "model.pt")
    errors = {size: _max_error(loaded, model, _images(*size)) for size in [EXPORT_SIZE, *OTHER_SIZES]}
    assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.slow
def test_legacy_onnx_dynamic_runs_every_size(model, tmp_path):
    write(model, _images(*EXPORT_SIZE), tmp_path / "model.onnx", ExportSettings("onnx", legacy=True, dynamic=True))
    run = _onnx_runner(tmp_path / "model.onnx")
    errors = {size: _max_error(run, model, _images(*size)) for size in [EXPORT_SIZE, *OTHER_SIZES]}
    assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.slow
@pytest.mark.parametrize("settings", [ExportSettings("torchscript"), ExportSettings("onnx", legacy=True)],
                         ids=["torchscript", "legacy_onnx"])
def test_traced_at_maps_smaller_than_n_win(settings, tmp_path):
    """Traced at 96x128, where the third stage's 6x8 map is smaller than its 7x7 regions (the sizes a trace
    records as tensors once made n_win a tensor)."""
    torch.manual_seed(0)
    model, x = timm.create_model("biformer_tiny").eval(), _images(1, 96, 128)
    path = tmp_path / ("model.pt" if settings.format == "torchscript" else "model.onnx")
    write(model, x, path, settings)
    run = torch.jit.load(path) if settings.format == "torchscript" else _onnx_runner(path)
    assert _max_error(run, model, x) < TOLERANCE


@pytest.mark.slow
def test_dynamo_onnx_dynamic_runs_every_size(dynamic_model, tmp_path):
    model = dynamic_model
    write(model, _images(*EXPORT_SIZE), tmp_path / "model.onnx", ExportSettings("onnx", dynamic=True),
          min_side=smallest_dynamic_side(model))
    run = _onnx_runner(tmp_path / "model.onnx")
    errors = {size: _max_error(run, model, _images(*size)) for size in [EXPORT_SIZE, *OTHER_SIZES]}
    assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.slow
def test_torch_export_dynamic_runs_every_size(dynamic_model, tmp_path):
    model = dynamic_model
    write(model, _images(*EXPORT_SIZE), tmp_path / "model.pt2", ExportSettings("exported", dynamic=True),
          min_side=smallest_dynamic_side(model))
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    errors = {size: _max_error(loaded, model, _images(*size)) for size in [EXPORT_SIZE, *OTHER_SIZES]}
    assert max(errors.values()) < TOLERANCE, errors


def test_smallest_dynamic_side():
    """The conv stem halves with padding (a 33 px input leaves a 2x2 last map), the patch stem floors (64 px)."""
    assert smallest_dynamic_side(timm.create_model("biformer_nano").eval()) == 33
    assert smallest_dynamic_side(timm.create_model("biformer_stl_nano").eval()) == 64


@pytest.mark.parametrize("settings, message", [
    (ExportSettings("exported", legacy=True), "legacy is the TorchScript-based ONNX exporter"),
    (ExportSettings("tflite"), "format 'tflite' is not one of"),
])
def test_unsupported_settings_are_refused(settings, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        write(timm.create_model("biformer_nano").eval(), _images(1, 32, 32), tmp_path / "model", settings)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("padding", ["masked", "legacy", "legacy_nchw"])
def test_bra_layer_exports_one_graph_for_every_map(padding):
    """One BRA layer exported at a 14x14 map, run on maps with regions of 1 token, padded maps and maps
    smaller than n_win."""
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(32, 2, 7, 4, padding=padding).eval()
    height, width = torch.export.Dim("height", min=2, max=256), torch.export.Dim("width", min=2, max=256)
    with one_graph_for_every_size():
        program = torch.export.export(layer, (torch.randn(2, 14, 14, 32),), dynamic_shapes=({1: height, 2: width},),
                                      prefer_deferred_runtime_asserts_over_guards=True)
    exported = program.module()
    for size in [(14, 14), (9, 23), (5, 5), (3, 9), (7, 7), (30, 33)]:
        x = torch.randn(2, *size, 32)
        with torch.no_grad():
            np.testing.assert_allclose(exported(x).detach(), layer(x), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("padding", ["masked", "legacy", "legacy_nchw"])
def test_bra_layer_in_legacy_onnx_runs_every_map(padding, tmp_path):
    """One BRA layer through the TorchScript-based ONNX exporter (a trace) at a 14x14 map, run in ONNX Runtime
    on maps with other region sizes, padded maps and maps smaller than n_win: no size of the traced map baked in."""
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(32, 2, 7, 4, padding=padding).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's and the exporter's warnings about the sizes they record
        torch.onnx.export(layer, (torch.randn(2, 14, 14, 32),), tmp_path / "bra.onnx", dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "batch", 1: "height", 2: "width"}})
    run = _onnx_runner(tmp_path / "bra.onnx")
    for size in [(21, 28), (13, 17), (5, 6)]:
        x = torch.randn(1, *size, 32)
        assert _max_error(run, layer, x) < TOLERANCE, size
