"""Strict loading of a weights file into a model, whichever of our layout or the original release's it has."""
from __future__ import annotations

import os

from torch import Tensor, nn

from .original import ORIGINAL_MARKER, checkpoint_filter_fn
from .weights import check_fits, read_state_dict


def load_weights(model: nn.Module, state_dict: dict[str, Tensor], source: str | os.PathLike) -> nn.Module:
    """Load a state dict read from `source` (ours or in the original release layout) strictly into model.

    Raises CheckpointError (a ValueError) listing missing/unexpected keys or mismatched shapes:
    never a partial load.
    """
    if ORIGINAL_MARKER in state_dict:
        state_dict = checkpoint_filter_fn(state_dict, model)
    check_fits(state_dict, model, source, type(model).__name__, "Is it for another model or number of classes?")
    model.load_state_dict(state_dict)
    return model


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint file (.pth or .safetensors, ours or the original release's) strictly into model."""
    return load_weights(model, read_state_dict(path), path)
