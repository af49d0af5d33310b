"""fc1 -> GELU -> fc2 that keeps one hidden-width tensor per MLP for the backward, not two.

Through autograd, timm's Mlp keeps fc1's output h (for GELU's backward) and gelu(h) (fc2's input,
for fc2's weight gradient): two tensors of mlp_ratio times the block width, the largest a
BiFormer block keeps. `LeanMlp` keeps x and h and recomputes gelu(h) in the backward, one
elementwise pass next to three matmuls.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from .exporting import plain_eager
from .inplace import InplaceGELU, autograd_records

__all__ = ["LeanMlp", "linear_gelu_linear"]


class _LinearGeluLinear(torch.autograd.Function):
    """y = fc2(gelu(fc1(x))) saving x and h = fc1(x); gelu(h) is recomputed in the backward.

    Once differentiable: h is saved without its graph, so a double backward would miss d h / d x;
    it raises instead.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor,
                b2: Tensor | None, approximate: str) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the caller cast the inputs as autocast would
            h = F.linear(x, w1, b1)
            y = F.linear(F.gelu(h, approximate=approximate), w2, b2)  # gelu(h) dies here
        ctx.save_for_backward(x, h, w1, w2)
        ctx.approximate = approximate
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, h, w1, w2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad  # False for a None bias
        with torch.autocast(grad_y.device.type, enabled=False):
            g = grad_y.reshape(-1, grad_y.shape[-1])  # (N, out)
            h = h.reshape(-1, h.shape[-1])  # (N, hidden)
            grad_w2 = g.t().mm(F.gelu(h, approximate=ctx.approximate)) if need_w2 else None
            grad_b2 = g.sum(0) if need_b2 else None
            grad_x = grad_w1 = grad_b1 = None
            if need_x or need_w1 or need_b1:
                grad_h = torch.ops.aten.gelu_backward(g.mm(w2), h, approximate=ctx.approximate)
                if need_x:
                    grad_x = grad_h.mm(w1).view(x.shape)
                if need_w1:
                    grad_w1 = grad_h.t().mm(x.reshape(-1, x.shape[-1]))
                grad_b1 = grad_h.sum(0) if need_b1 else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None


def _as_autocast_would(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The tensors cast to the autocast dtype of their device when autocast is on there, as F.linear's
    autocast casts its arguments (floating, not float64); the casts stay on the autograd graph."""
    device = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def linear_gelu_linear(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                       approximate: str = "none") -> Tensor:
    """F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2) through autograd,
    keeping x and the hidden pre-activation for the backward, not also the activation."""
    return _LinearGeluLinear.apply(*_as_autocast_would(x, w1, b1, w2, b2), approximate)


class LeanMlp(nn.Module):
    """timm's Mlp(in, hidden, out, act_layer=nn.GELU) (no dropout, no hidden norm), same state_dict keys,
    at less training memory: see `linear_gelu_linear`.

    Without autograd recording it runs fc1 -> in-place GELU -> fc2 (`InplaceGELU`), which holds no
    more than one hidden tensor. Under torch.compile/export it runs the plain layers: the compiler
    plans what to keep itself.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 approximate: str = "none", bias: bool = True) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = InplaceGELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        fc1, fc2 = self.fc1, self.fc2
        if not plain_eager() or not autograd_records(x, *self.parameters()):
            return fc2(self.act(fc1(x)))
        return linear_gelu_linear(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.act.approximate)
