"""weights_cast_once against autocast's own per-layer casts: the same values and gradients, fewer casts."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import Tensor, nn

import biformer.models  # noqa: F401  (registers the timm models)
from biformer.benchmarks import trace as trace_bench
from biformer.layers import weight_cast
from biformer.layers.weight_cast import weights_cast_once

CPU = torch.device("cpu")


@pytest.fixture
def on_the_cpu_too(monkeypatch):
    """The casts made at once on the CPU as well (by default only on CUDA), to compare them here."""
    monkeypatch.setattr(weight_cast, "DEVICES", {"cuda", "cpu"})


def _layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.LayerNorm(8 * 5 * 5), nn.Linear(200, 4))


def _run(model: nn.Module, x: Tensor, dtype: torch.dtype, cast_once: bool) -> tuple[Tensor, list[Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype), weights_cast_once(model, CPU, enabled=cast_once):
        out = model(x)
    out.float().square().sum().backward()
    return out, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_values_and_gradients_equal_autocasts_own(dtype, on_the_cpu_too):
    model, x = _layers(), torch.randn(2, 3, 5, 5)
    want, want_grads = _run(model, x, dtype, cast_once=False)
    got, got_grads = _run(model, x, dtype, cast_once=True)
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got, want, atol=0, rtol=0)  # the same casts of the same tensors, the same ops
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_frozen_layers_stay_without_gradients(on_the_cpu_too):
    """A frozen layer is left to autocast: it gets no gradient, and the others get autocast's."""
    model, x = _layers(), torch.randn(2, 3, 5, 5)
    model[0].requires_grad_(False)
    want, want_grads = _run(model, x, torch.bfloat16, cast_once=False)
    got, got_grads = _run(model, x, torch.bfloat16, cast_once=True)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert got_grads[:2] == [None, None]
    for g, w in zip(got_grads[2:], want_grads[2:], strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_parameters_are_back_after_the_context_also_on_errors(on_the_cpu_too):
    model = _layers()
    parameters = dict(model.named_parameters())
    with pytest.raises(RuntimeError, match="boom"):
        with torch.autocast("cpu", dtype=torch.bfloat16), weights_cast_once(model, CPU):
            assert model[0].weight.dtype == torch.bfloat16 and not isinstance(model[0].weight, nn.Parameter)
            assert model[2].weight.dtype == torch.float32  # layer_norm is no lower-precision op: left alone
            raise RuntimeError("boom")
    assert dict(model.named_parameters()) == parameters
    assert all(isinstance(p, nn.Parameter) and p.dtype == torch.float32 for p in model.parameters())


def test_nothing_happens_without_half_autocast_or_on_other_devices(on_the_cpu_too, monkeypatch):
    model = _layers()
    with weights_cast_once(model, CPU):
        assert model[0].weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False), weights_cast_once(model, CPU):
        assert isinstance(model[3].weight, nn.Parameter)
    monkeypatch.setattr(weight_cast, "DEVICES", {"cuda"})
    with torch.autocast("cpu", dtype=torch.bfloat16), weights_cast_once(model, CPU):
        assert isinstance(model[3].weight, nn.Parameter)


def test_biformer_stage_casts_once_and_leaves_checkpointing_to_autocast(on_the_cpu_too):
    """A stage's layers see half weights under autocast; with gradient checkpointing (blocks recomputed after
    the stage's forward) they see the Parameters."""
    model = timm.create_model("biformer_nano", num_classes=3)
    seen = []
    model.stages[1].blocks[0].attn.qkv.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
    x = torch.randn(2, 3, 64, 64)
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).float().sum().backward()
    assert seen[0] == torch.bfloat16 and set(seen[1:]) == {torch.float32}
    assert all(isinstance(p, nn.Parameter) and p.grad is not None for p in model.parameters())


def test_traced_training_step_casts_each_stages_weights_in_one_kernel():
    """The traced casts of a biformer_nano training step: the stages' weights cost two casts per stage (the
    weights, their gradients) instead of two per Linear/conv weight and bias."""
    def casts(cast_once: bool) -> int:
        model = timm.create_model("biformer_nano")
        for stage in model.stages:
            stage.cast_weights_once = cast_once
        return trace_bench.trace_model(model, "train", 2, img_size=64).categories["cast"].launches

    model = timm.create_model("biformer_nano")
    stage_tensors = sum(p.numel() > 0 for stage in model.stages for layer in stage.modules()
                        if isinstance(layer, (nn.Linear, nn.Conv2d)) for p in layer.parameters())
    assert casts(False) - casts(True) == 2 * stage_tensors - 2 * len(model.stages)
