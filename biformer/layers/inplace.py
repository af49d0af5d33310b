"""In-place sums and activations where autograd records nothing."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .exporting import plain_eager


def autograd_records(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def overwrites(*tensors: Tensor) -> bool:
    """Whether an op may overwrite its inputs: where autograd records nothing, in plain eager code (an exported graph
    is a function of its inputs, a trace must record the same ops however it runs, and a compiler reuses buffers
    by itself)."""
    return plain_eager() and not autograd_records(*tensors)


def add_into(fresh: Tensor, other: Tensor) -> Tensor:
    """fresh + other, written into `fresh` (a tensor no one else holds) when autograd records nothing.

    At inference this saves one fresh tensor per sum, and on CPU fresh pages cost more than the
    add. With autograd recording, the sum stays out of place: an in-place add on a view (a permuted
    conv output, a linear's reshaped output) would cost two extra copies in the backward.
    """
    rounds_down = torch.promote_types(fresh.dtype, other.dtype) != fresh.dtype  # `fresh` too narrow for the sum
    if not overwrites(fresh, other) or rounds_down:
        return fresh + other
    return fresh.add_(other)


class InplaceGELU(nn.GELU):
    """nn.GELU that overwrites its input where autograd records nothing; for inputs no one else
    holds (a linear's or a norm's fresh output), such as the MLP's hidden layer, a block's largest tensor."""

    def forward(self, x: Tensor) -> Tensor:
        if not overwrites(x):
            return super().forward(x)
        return torch.ops.aten.gelu_(x, approximate=self.approximate)
