"""Dispatch from declarations: the generic check against toy `Backend`s declared here (the oracle is each toy's own
declaration), the forced backend's error, and the declared priority order."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from biformer.ops import available_backends, backends
from biformer.ops.backends import BACKENDS, PRIORITY, Backend, BackendUnsupported, not_supported_reasons, select_backend
from biformer.ops.backends.inputs import RoutedAttentionInputs
from biformer.ops.functional import region_grid


def _never_called(inputs, indices):
    raise AssertionError("dispatch does not attend")


def _inputs(dtype=torch.float32, device="cpu", requires_grad=False) -> RoutedAttentionInputs:
    q = torch.zeros(1, 8, 8, 1, 8, dtype=dtype, device=device, requires_grad=requires_grad)
    return RoutedAttentionInputs.of(q, q, q, region_grid((8, 8), 4), 2, True)


TOY = Backend("toy", _never_called, devices=("cpu",), dtypes=(torch.float32,), forward_only_on=("cpu",))


def test_a_declaration_that_fits_gives_no_reasons():
    assert not_supported_reasons(TOY, _inputs()) == []


@pytest.mark.parametrize("inputs, reason", [
    (lambda: _inputs(device="meta"), "inputs are on meta; toy runs on cpu"),
    (lambda: _inputs(torch.float64), "dtype torch.float64 is not one of ['torch.float32']"),
    (lambda: _inputs(requires_grad=True), "toy has no backward on cpu, and autograd records here"),
], ids=["device", "dtype", "backward"])
def test_each_declared_limit_gives_its_reason(inputs, reason):
    reasons = not_supported_reasons(TOY, inputs())
    assert len(reasons) == 1 and reasons[0].startswith(reason)


def test_a_backend_that_does_not_trace_steps_aside_under_an_exporter(monkeypatch):
    monkeypatch.setattr(torch.compiler, "_is_exporting_flag", True, raising=False)  # what torch.export sets
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert not_supported_reasons(replace(TOY, traces=True), _inputs()) == []
    [reason] = not_supported_reasons(TOY, _inputs())
    assert reason.startswith("an exporter or tracer is running, and toy does not trace")


def test_unavailable_says_only_why_and_the_own_check_adds_its_reasons():
    def check(inputs):
        return [f"head dim {inputs.q.shape[-1]} is too small"]

    assert not_supported_reasons(replace(TOY, unavailable=lambda: "no toy device", check=check), _inputs()) == [
        "no toy device"]
    assert not_supported_reasons(replace(TOY, check=check), _inputs(torch.float64)) == [
        "dtype torch.float64 is not one of ['torch.float32']", "head dim 8 is too small"]


def test_a_forced_backend_that_cannot_run_names_every_backend(monkeypatch):
    monkeypatch.setitem(BACKENDS, "original", replace(TOY, name="original", dtypes=(torch.float16,)))
    with pytest.raises(ValueError) as raised:
        select_backend("original", _inputs())
    error = raised.value
    assert isinstance(error, BackendUnsupported)
    assert error.reasons == ["dtype torch.float32 is not one of ['torch.float16']"]
    message = str(error)
    assert "\n" not in message  # one line, as the command line shows errors
    assert message.startswith("backend='original' cannot run these inputs: " + error.reasons[0] + " (the other ")
    assert list(error.others) == [name for name in PRIORITY if name != "original"]
    assert error.others["reference"] == [] and "reference (can run)" in message
    assert all(f"{name} ({'; '.join(why)})" in message for name, why in error.others.items() if why)


def test_priority_is_the_declared_order(monkeypatch):
    assert sorted(PRIORITY) == sorted(BACKENDS) and len(set(PRIORITY)) == len(PRIORITY)
    assert list(BACKENDS) == list(PRIORITY)
    everywhere = dict(auto_devices=None, devices=None, dtypes=None, forward_only_on=())
    for name in ("portable", "original"):
        monkeypatch.setitem(BACKENDS, name, replace(TOY, name=name, **everywhere))
    first = ("original", "portable")
    monkeypatch.setattr(backends, "PRIORITY", (*first, *(name for name in PRIORITY if name not in first)))
    assert select_backend(None, _inputs()).name == "original"
    assert available_backends()[:2] == ["original", "portable"]
    monkeypatch.setattr(backends, "PRIORITY", ("portable", *(n for n in backends.PRIORITY if n != "portable")))
    assert select_backend(None, _inputs()).name == "portable"


def test_auto_dispatch_takes_the_first_fast_backend_else_the_first_runnable(monkeypatch):
    slow = dict(auto_devices=("cpu",), forward_only_on=(), is_fast_for=lambda inputs: False)
    monkeypatch.setitem(BACKENDS, "triton", replace(TOY, name="triton", **slow))
    monkeypatch.setitem(BACKENDS, "triton_region", replace(TOY, name="triton_region", auto_devices=("cuda",)))
    monkeypatch.setitem(BACKENDS, "flex", replace(TOY, name="flex", auto_devices=("cpu",), forward_only_on=()))
    assert select_backend(None, _inputs()).name == "flex"  # triton is slower; triton_region is not taken on cpu
    monkeypatch.setitem(BACKENDS, "flex", replace(TOY, name="flex", **slow))
    for name in ("dense", "indexed", "reference"):
        monkeypatch.setitem(BACKENDS, name, replace(TOY, name=name, dtypes=(torch.float16,), auto_devices=None))
    assert select_backend(None, _inputs()).name == "triton"  # none is fast: the first that can run
