"""ONNX export of biformer_tiny with the dynamo exporter, run in onnxruntime."""
import pytest
import timm
import torch

import biformer  # noqa: F401  (registers the models)

onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX EXTRA NOT INSTALLED: export not checked")


@pytest.mark.slow
def test_biformer_tiny_exports_and_matches(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("biformer_tiny").eval()
    x = torch.randn(1, 3, 224, 224)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    path = tmp_path / "biformer_tiny.onnx"
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(x), atol=1e-4, rtol=0)
