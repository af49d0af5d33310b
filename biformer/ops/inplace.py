"""In-place sums and activations where autograd records nothing."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def add_into(fresh: Tensor, other: Tensor) -> Tensor:
    """fresh + other, written into `fresh` (a tensor no one else holds) when autograd records nothing.

    At inference this saves one fresh tensor per sum, and on CPU fresh pages cost more than the
    add. With autograd recording, the sum stays out of place: an in-place add on a view (a permuted
    conv output, a linear's reshaped output) would cost two extra copies in the backward.
    """
    recording = torch.is_grad_enabled() and (fresh.requires_grad or other.requires_grad)
    if recording or torch.promote_types(fresh.dtype, other.dtype) != fresh.dtype:  # never round the sum down
        return fresh + other
    return fresh.add_(other)


class InplaceGELU(nn.GELU):
    """nn.GELU that overwrites its input where autograd records nothing; for inputs no one else
    holds (a linear's or a norm's fresh output), such as the MLP's hidden layer, a block's largest tensor."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return super().forward(x)
        return torch.ops.aten.gelu_(x, approximate=self.approximate)
