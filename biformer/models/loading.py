"""Reading checkpoint files safely and loading them strictly, with errors a user can act on."""
from __future__ import annotations

import os
import pickle
import zipfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .biformer import BiFormer, checkpoint_filter_fn

_WRAPPER_KEYS = ("model", "state_dict", "model_ema")


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a .safetensors file or a .pth/.pt file (plain tensors only, `{"model": ...}` unwrapped).

    Raises FileNotFoundError for a missing file and ValueError for a corrupt or truncated file or a
    pickle holding anything but tensors (it is never unpickled as code: weights_only=True).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"checkpoint {path!r} is not a readable safetensors file (corrupt or truncated?): {error}") from error
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):  # not a class it refused: bytes that are no pickle at all
            raise ValueError(f"checkpoint {path!r} is corrupt or not a PyTorch checkpoint") from error
        raise ValueError(
            f"checkpoint {path!r} holds objects other than plain tensors, refused for safety "
            f"(only weights_only pickles and safetensors are loaded): {_unsupported_global(error)}"
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"checkpoint {path!r} is corrupt or truncated: {str(error).splitlines()[0]}") from error
    for key in _WRAPPER_KEYS:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise ValueError(f"checkpoint {path!r} is not a state dict of tensors (nor {{'model': state_dict}})")
    return checkpoint


def _unsupported_global(error: pickle.UnpicklingError) -> str:
    """The line of torch's weights_only error that names the refused class."""
    return next((line.strip() for line in str(error).splitlines() if "Unsupported global" in line), "")


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint (ours or the original release layout, .pth or .safetensors) strictly into model.

    Raises ValueError listing missing/unexpected keys or mismatched shapes: never a partial load.
    """
    state_dict = read_state_dict(path)
    if isinstance(model, BiFormer):
        state_dict = checkpoint_filter_fn(state_dict, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        def listing(name: str, items: list[str]) -> str:
            return f"{len(items)} {name} ({', '.join(items[:8])}{', ...' if len(items) > 8 else ''})" if items else ""
        problems = "; ".join(filter(None, (listing("missing keys", missing), listing("unexpected keys", unexpected),
                                           listing("shape mismatches", mismatched))))
        raise ValueError(f"checkpoint {os.fspath(path)!r} does not fit {type(model).__name__}: {problems}. "
                         "Is it for another model or number of classes?")
    model.load_state_dict(state_dict)
    return model
