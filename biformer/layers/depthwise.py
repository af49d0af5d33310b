"""Depthwise "same" convolution whose CPU weight gradient is computed in slices of <= 3 columns.

oneDNN's depthwise weight-gradient kernel is fast only for kernels at most 3 wide; a 5x5
kernel (BiFormer's lepe) falls to a path 5-15x slower, and a bias gradient computed with it
takes that path too. The weight gradient is a sum of shifted products, so it splits by kernel
columns: columns [j0, j1) are the weight gradient of a (kh, j1 - j0) conv over the padded map's
columns from j0 on. Each slice takes the fast kernel; the input gradient is the conv of the
output gradient with the flipped kernel, the bias gradient a plain sum. The backward pads the
map once (channels-last, so a strided input such as a slice of qkv is read once) and slices that
padded map without copies. Results equal nn.Conv2d's up to summation order.

Shape legend: B batch, C channels, H/W map height/width, kh/kw kernel height/width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .exporting import is_exporting
from .inplace import autograd_records

FAST_WEIGHT_GRAD_WIDTH = 3  # widest depthwise kernel oneDNN's weight-gradient kernel serves fast


def _same_padding(weight: Tensor) -> tuple[int, int]:
    return weight.shape[-2] // 2, weight.shape[-1] // 2


def depthwise_weight_grad(grad: Tensor, padded: Tensor, weight: Tensor) -> Tensor:
    """Weight gradient (C, 1, kh, kw) of a stride-1 depthwise conv without padding.

    grad: (B, C, H, W), the output's gradient; padded: (B, C, H + kh - 1, W + kw - 1), the
    conv's input (the map already padded); weight: (C, 1, kh, kw).
    """
    kernel_w, width = weight.shape[-1], grad.shape[-1]
    slices = []
    for start in range(0, kernel_w, FAST_WEIGHT_GRAD_WIDTH):
        stop = min(start + FAST_WEIGHT_GRAD_WIDTH, kernel_w)
        columns = padded[..., start : stop - 1 + width]  # the columns kernel column `start` meets
        slices.append(torch.ops.aten.convolution_backward(
            grad, columns, weight[..., start:stop], None, (1, 1), (0, 0), (1, 1), False, (0, 0), weight.shape[0],
            (False, True, False),
        )[1])
    return torch.cat(slices, dim=-1)


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)  # x, not the padded map: no tensor kept beyond what nn.Conv2d keeps
        return F.conv2d(x, weight, bias, padding=_same_padding(weight), groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # a stride-1 "same" conv's transpose: the flipped kernel
            grad_x = F.conv2d(grad, weight.flip(-2, -1), padding=_same_padding(weight), groups=weight.shape[0])
        if ctx.needs_input_grad[1]:
            pad_h, pad_w = _same_padding(weight)
            grad_weight = depthwise_weight_grad(grad, F.pad(x, (pad_w, pad_w, pad_h, pad_h)), weight)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise conv, stride 1, "same" padding (odd kernel); an nn.Conv2d in weights and results.

    On CPU, when a kernel wider than 3 needs its weight gradient, the backward runs in column
    slices (see the module docstring); everywhere else this is plain nn.Conv2d.
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        sliced = (
            x.device.type == "cpu"
            and self.kernel_size[1] > FAST_WEIGHT_GRAD_WIDTH
            and autograd_records(self.weight)
            and not is_exporting()  # a tracer would record the Function opaquely (torch.compile traces into it)
        )
        if not sliced:
            return super().forward(x)
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled("cpu"):  # cast as autocast would for conv2d, then keep it out of the Function
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            with torch.autocast("cpu", enabled=False):
                return _DepthwiseConv.apply(x, weight, bias)
        return _DepthwiseConv.apply(x, weight, bias)


def depthwise_conv(channels: int, kernel_size: int, spatial_dims: int = 2) -> nn.Module:
    """A depthwise "same" conv (odd kernel, stride 1) over 1, 2 or 3 spatial axes: channels-first (B, C, *S) in
    and out; 2-D: `DepthwiseConv2d` (its fast CPU weight gradient)."""
    if spatial_dims == 2:
        return DepthwiseConv2d(channels, kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[spatial_dims]
    return conv(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
