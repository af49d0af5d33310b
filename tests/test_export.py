"""Exported BiFormer equals eager PyTorch: torch.jit.trace and both ONNX exporters (run by ONNX Runtime) at the
export size, and the dynamic exports (dynamo ONNX for the model, torch.export for one BRA layer) at other sizes:
padded maps (160 px: the third stage's 10x10 map in 7x7 regions of 2x2), sides not divisible by 32 (200x296) and
maps smaller than n_win (96x128: the third stage's 6x8 map in 6x7 regions)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import timm
import torch

import biformer.models  # noqa: F401  (registers the models with timm)
from biformer.export import export_onnx, one_graph_for_every_size
from biformer.ops import BiLevelRoutingAttention

ort = pytest.importorskip("onnxruntime")

TOLERANCE = 1e-4  # max abs, float32
EXPORT_SIZE = (224, 224)
OTHER_SIZES = [(160, 160), (200, 296), (96, 128)]


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("biformer_tiny").eval()


def _images(height: int, width: int) -> torch.Tensor:
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(height * width))


def _eager(model, x):
    with torch.no_grad():
        return model(x)


def _onnx_runner(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _max_error(run, model, x) -> float:
    return (run(x) - _eager(model, x)).abs().max().item()


def test_jit_trace_at_its_size(tiny, tmp_path):
    x = _images(*EXPORT_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings: a trace keeps the traced size, which the docs say
        torch.jit.save(torch.jit.trace(tiny, x), tmp_path / "tiny.pt")
    loaded = torch.jit.load(tmp_path / "tiny.pt")
    assert _max_error(loaded, tiny, x) < TOLERANCE


def test_legacy_onnx_at_its_size(tiny, tmp_path):
    x = _images(*EXPORT_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(tiny, x, tmp_path / "tiny.onnx", legacy=True)
    assert _max_error(_onnx_runner(tmp_path / "tiny.onnx"), tiny, x) < TOLERANCE


def test_legacy_onnx_refuses_dynamic(tiny, tmp_path):
    with pytest.raises(ValueError, match="dynamic=True needs the dynamo exporter"):
        export_onnx(tiny, _images(*EXPORT_SIZE), tmp_path / "tiny.onnx", legacy=True, dynamic=True)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_dynamo_onnx_dynamic_runs_every_size(tiny, tmp_path):
    export_onnx(tiny, _images(*EXPORT_SIZE), tmp_path / "tiny.onnx", dynamic=True)
    run = _onnx_runner(tmp_path / "tiny.onnx")
    errors = {size: _max_error(run, tiny, _images(*size)) for size in [EXPORT_SIZE, *OTHER_SIZES]}
    assert max(errors.values()) < TOLERANCE, errors


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
        np.testing.assert_allclose(exported(x).detach(), _eager(layer, x), atol=TOLERANCE, rtol=0)
