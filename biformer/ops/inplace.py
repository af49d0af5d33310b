"""In-place sums where autograd records nothing."""
from __future__ import annotations

import torch
from torch import Tensor


def add_into(fresh: Tensor, other: Tensor) -> Tensor:
    """fresh + other, written into `fresh` (a tensor no one else holds) when autograd records nothing.

    At inference this saves one fresh tensor per sum, and on CPU fresh pages cost more than the
    add. With autograd recording, the sum stays out of place: an in-place add on a view (a permuted
    conv output, a linear's reshaped output) would cost two extra copies in the backward.
    """
    if torch.is_grad_enabled() and (fresh.requires_grad or other.requires_grad):
        return fresh + other
    return fresh.add_(other)
