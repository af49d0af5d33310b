"""Weight files: read any .pth/.safetensors safely, write ours, load strictly with errors a user can act on.

Our files are .safetensors whose metadata values are JSON (model name, classes, preprocessing, ...).
`read_metadata` also accepts plain-string values (other tools write {"format": "pt"}), so every
file that `train` or `convert` writes, and every safetensors file timm can read, loads here too. A .pth
that `convert` writes keeps the same metadata as JSON text beside the state dict (METADATA_KEY).
Exported models (ONNX, torch.export, TorchScript) are for runtimes: they are named as such, not read.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import CheckpointError
from ..files import atomic_output

# keys under which training scripts nest the state dict ({"model": ...} is the original release's)
WRAPPER_KEYS = ("model", "state_dict", "model_ema")
# the task of a weights file whose metadata names none (release files, and ours from before tasks were recorded);
# `convert` writes it, being for classifiers only
UNRECORDED_TASK = "classification"
# where a .pth written by `convert` keeps our metadata (JSON text; the original release's loader ignores it)
METADATA_KEY = "biformer_metadata"


def exported_kind(path: str) -> str | None:
    """What kind of exported model the file `path` is (None: not one): ONNX, torch.export or TorchScript."""
    if path.lower().endswith(".onnx"):
        return "an ONNX model"
    if path.lower().endswith(".pt2"):
        return "a torch.export program (.pt2)"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any("/code/" in name for name in archive.namelist()):  # TorchScript keeps its Python code there
                return "a TorchScript module"
    return None


def _require_file(path: str) -> None:
    """FileNotFoundError for a missing file; CheckpointError naming an exported model's kind."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    kind = exported_kind(path)
    if kind is not None:
        raise CheckpointError(f"{path!r} is {kind}, written for runtimes by `biformer export`; give the checkpoint "
                              "it was exported from (the .safetensors of `biformer train`, or a .pth)")


def _unreadable_safetensors(path: str, error: Exception) -> CheckpointError:
    return CheckpointError(f"checkpoint {path!r} is not a readable safetensors file (corrupt or truncated?): {error}")


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a .safetensors file or a .pth/.pt file (plain tensors only, `{"model": ...}` unwrapped).

    Raises FileNotFoundError for a missing file and CheckpointError (a ValueError) for a corrupt or
    truncated file or a pickle holding anything but tensors (never unpickled as code: weights_only=True).
    """
    path = os.fspath(path)
    _require_file(path)
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise _unreadable_safetensors(path, error) from error
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):  # not a class it refused: bytes that are no pickle at all
            raise CheckpointError(f"checkpoint {path!r} is corrupt or not a PyTorch checkpoint") from error
        raise CheckpointError(
            f"checkpoint {path!r} holds objects other than plain tensors, refused for safety "
            f"(only weights_only pickles and safetensors are loaded): {_unsupported_global(error)}"
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"checkpoint {path!r} is corrupt or truncated: {str(error).splitlines()[0]}") from error
    for key in WRAPPER_KEYS:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get(METADATA_KEY), str):
        checkpoint = {key: value for key, value in checkpoint.items() if key != METADATA_KEY}
    if not isinstance(checkpoint, dict) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise CheckpointError(f"checkpoint {path!r} is not a state dict of tensors (nor {{'model': state_dict}})")
    return checkpoint


def _unsupported_global(error: pickle.UnpicklingError) -> str:
    """The line of torch's weights_only error that names the refused class."""
    return next((line.strip() for line in str(error).splitlines() if "Unsupported global" in line), "")


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value  # a plain string, as other tools write them


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a .safetensors file (JSON values decoded) or of a .pth that `convert` wrote; {} for other
    files and files without any."""
    path = os.fspath(path)
    _require_file(path)
    if not path.endswith(".safetensors"):
        return _pth_metadata(path)
    try:
        with safe_open(path, "pt") as file:
            metadata = file.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise _unreadable_safetensors(path, error) from error
    return {key: _decode(value) for key, value in metadata.items()}


def _pth_metadata(path: str) -> dict[str, Any]:
    """The METADATA_KEY entry of a torch pickle, mapped rather than read whole; {} where it has none or is not a
    readable pickle (reading its tensors says why)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError):
        return {}
    text = checkpoint.get(METADATA_KEY) if isinstance(checkpoint, dict) else None
    return json.loads(text) if isinstance(text, str) else {}


def cpu_state_dict(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_weights(path: str | os.PathLike, weights: nn.Module | dict[str, Tensor], metadata: dict[str, Any]) -> None:
    """Write weights (a model's, or a state dict) as .safetensors with JSON metadata, atomically."""
    state_dict = cpu_state_dict(weights) if isinstance(weights, nn.Module) else weights
    encoded = {"format": "pt", **{key: json.dumps(value) for key, value in metadata.items()}}
    with atomic_output(path) as temp:
        save_file(state_dict, temp, metadata=encoded)


def _listing(name: str, items: list[str]) -> str:
    return f"{len(items)} {name} ({', '.join(items[:8])}{', ...' if len(items) > 8 else ''})" if items else ""


def check_fits(state_dict: dict[str, Tensor], module: nn.Module, source: str | os.PathLike, target: str, hint: str,
               may_miss: Callable[[str], bool] = lambda key: False) -> None:
    """CheckpointError listing the missing and unexpected keys and the mismatched shapes, unless `state_dict`
    fits `module`'s exactly. Keys `may_miss` accepts may be missing, and so may BatchNorm step counters:
    release files have none, load_state_dict fills them in, and they feed no output."""
    own = module.state_dict()
    missing = sorted(k for k in set(own) - set(state_dict) if not k.endswith("num_batches_tracked") and not may_miss(k))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [f"{k}: file {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        problems = "; ".join(filter(None, (_listing("missing keys", missing), _listing("unexpected keys", unexpected),
                                           _listing("shape mismatches", mismatched))))
        raise CheckpointError(f"checkpoint {os.fspath(source)!r} does not fit {target}: {problems}. {hint}")
