"""`biformer bench trace`: CUDA work counted on fake tensors, checked against counts written out by hand."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

import biformer.models  # noqa: F401  (registers the timm models)
from biformer.benchmarks import trace as trace_bench
from biformer.cli import main
from biformer.ops.backends import triton_attention


class _Bincount(nn.Module):
    """A linear layer that also counts its argmaxes with bincount (which reads min and max back to the host)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 32 * 32, 10)

    def forward(self, images):
        logits = self.linear(images.flatten(1))
        return logits + torch.bincount(logits.argmax(-1), minlength=10)[None]


def test_a_linear_layer_by_hand():
    batch, features, classes = 4, 3 * 32 * 32, 10
    model = nn.Sequential(nn.Flatten(), nn.Linear(features, classes))
    trace = trace_bench.trace_model(model, "infer", batch, img_size=32, dtype=torch.float32)
    total = trace.total()
    assert dict(trace.ops) == {"aten::addmm": 1}  # flatten and the weight's transpose are views
    assert total.launches == 1 and total.syncs == 0
    assert total.flops == 2 * batch * features * classes
    # addmm reads the bias, the input and the weight and writes the output, float32
    assert total.bytes == 4 * (classes + batch * features + features * classes + batch * classes)


def test_autocast_casts_are_their_own_category():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    trace = trace_bench.trace_model(model, "infer", 4, img_size=32, dtype=torch.bfloat16)
    # input, weight and bias cast to bfloat16 before the addmm
    assert trace.categories["cast"].launches == 3 and trace.ops["aten::addmm"] == 1


@pytest.mark.parametrize("mode", trace_bench.MODES)
def test_host_syncs_are_counted(mode):
    trace = trace_bench.trace_model(_Bincount(), mode, 4, img_size=32, dtype=torch.float32)
    assert trace.total().syncs == 2  # bincount's min and max, in the forward only


def test_a_training_step_has_the_backward_and_the_optimizer():
    batch, features, classes = 4, 3 * 32 * 32, 10
    model = nn.Sequential(nn.Flatten(), nn.Linear(features, classes))
    trace = trace_bench.trace_model(model, "train", batch, img_size=32, dtype=torch.float32)
    # the weight gradient as one mm, the bias gradient as one sum; no grad for the input (no mm for it)
    assert trace.ops["aten::mm"] == 1 and trace.ops["aten::addmm"] == 1
    assert trace.total().flops == 2 * 2 * batch * features * classes  # forward and weight gradient products
    assert any(name.startswith("aten::_foreach") for name in trace.ops)  # SGD with momentum, foreach


@pytest.mark.slow
def test_bra_training_step_is_free_of_host_syncs_and_counts_the_triton_kernels(monkeypatch):
    model = timm.create_model("biformer_tiny")
    trace = trace_bench.trace_model(model, "train", 2)
    layers = trace_bench.bra_layers(model)
    kernel_calls = trace.ops["biformer::triton_routed_attention"]
    # 2x2-token regions (stage 3) train on another backend; every other BRA layer runs the Triton kernels
    assert 0 < kernel_calls < layers and trace.ops["biformer::triton_routed_attention_backward"] == kernel_calls
    assert trace.total().syncs == 0
    assert trace.categories["routing"].launches > 0

    def with_bincount(indices):  # the earlier inverse routing: counts by bincount
        routed_by, start = original(indices)
        torch.bincount(indices.flatten(), minlength=indices.shape[1])
        return routed_by, start

    original = triton_attention.inverse_routing
    monkeypatch.setattr(triton_attention, "inverse_routing", with_bincount)
    trace = trace_bench.trace_model(timm.create_model("biformer_tiny"), "train", 2)
    assert trace.total().syncs == 2 * kernel_calls


def test_command_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "trace.json"
    assert main(["bench", "trace", "resnet18", "--batch", "2", "--img-size", "64", "--mode", "infer",
                 "--json", str(path)]) == 0
    assert "resnet18" in capsys.readouterr().out
    traces = json.loads(path.read_text())["traces"]
    assert traces["resnet18 infer"]["total"]["launches"] > 0 and traces["resnet18 infer"]["total"]["syncs"] == 0


def test_command_errors_name_the_option(tmp_path, capsys):
    assert main(["bench", "trace", "resnet18", "--batch", "0"]) == 2
    assert "--batch" in capsys.readouterr().err
    assert main(["bench", "trace", "no_such_model"]) == 2
    assert "no_such_model" in capsys.readouterr().err
    assert main(["bench", "trace", "resnet18", "--json", str(tmp_path / "missing" / "t.json")]) == 2
    assert "missing" in capsys.readouterr().err


def test_depthwise_convolution_backward_counts_its_groups():
    """2 FLOPs per multiply-add; a 7x7 depthwise conv: each output element sums 49 products, in the forward and
    in the weight gradient (the input, which needs no gradient, gets none)."""
    batch, channels, side = 2, 3, 32
    model = nn.Sequential(nn.Conv2d(channels, channels, 7, padding=3, groups=channels, bias=False),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    traced = trace_bench.trace_model(model, "train", batch, img_size=side, dtype=torch.float32)
    per_pass = 2 * batch * channels * side * side * 49
    assert traced.categories["Conv2d"].flops == 2 * per_pass


class _Concatenation(nn.Module):
    def __init__(self, pieces: int, form: str) -> None:
        super().__init__()
        self.pieces, self.form = pieces, form

    def forward(self, images):  # (B, 3, 4, 4)
        piece = {"contiguous": images, "strided": images.transpose(2, 3), "5-d": images[:, None]}[self.form]
        return torch.cat([piece] * self.pieces)


@pytest.mark.parametrize("pieces, form, launches", [
    (2, "contiguous", 1), (128, "contiguous", 1), (129, "contiguous", 2), (300, "contiguous", 3),
    (64, "strided", 1), (65, "strided", 2), (3, "5-d", 3),
])
def test_a_cat_takes_launches_as_atens_cuda_cat(pieces, form, launches):
    """ATen's CUDA cat copies up to 128 contiguous (64 strided) inputs per kernel into an output of up to 4
    dimensions, else one input per kernel."""
    trace = trace_bench.trace_model(_Concatenation(pieces, form), "infer", 1, img_size=4, dtype=torch.float32)
    assert dict(trace.ops) == {"aten::cat": 1} and trace.total().launches == launches


class _ClipLinear(nn.Module):
    """A 1x1x1 Conv3d over a clip, then a linear head: FLOPs countable by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 8, kernel_size=1, bias=False)
        self.linear = nn.Linear(8, 10, bias=False)

    def forward(self, clips):  # (B, 3, T, H, W)
        return self.linear(self.conv(clips).mean((2, 3, 4)))


def test_a_clip_is_traced_with_its_frames():
    batch, frames, side = 2, 4, 32
    trace = trace_bench.trace_model(_ClipLinear(), "infer", batch, side, torch.float32, frames=frames)
    convolution = 2 * batch * frames * side * side * 3 * 8  # a multiply and an add per weight and output voxel
    assert trace.ops["aten::convolution"] == 1
    assert convolution + 2 * batch * 8 * 10 <= trace.total().flops <= convolution + 2 * batch * 8 * 10 + batch * 8 * frames * side * side


def test_a_clip_model_traces_without_host_syncs(tmp_path, capsys):
    path = tmp_path / "trace.json"
    assert main(["bench", "trace", "biformer3d_nano", "--frames", "4", "--img-size", "64", "--batch", "1",
                 "--json", str(path)]) == 0
    output = capsys.readouterr().out
    assert "clips of 4 frames 64x64" in output and "biformer3d_nano" in output
    for mode in ("infer", "train"):
        trace = json.loads(path.read_text())["traces"][f"biformer3d_nano {mode}"]
        assert trace["total"]["syncs"] == 0 and trace["categories"]["routing"]["launches"] > 0
    assert main(["bench", "trace", "resnet18", "--frames", "4", "--img-size", "64", "--batch", "1", "--mode", "infer"]) == 2
    assert "measure image and clip models (--frames) apart" in capsys.readouterr().err
