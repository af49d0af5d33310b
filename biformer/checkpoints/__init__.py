"""Checkpoint files: safe reading, our weight files, the original release's formats, strict loading.

- `weights`: read any .pth/.safetensors safely, write and read our .safetensors (with metadata), key-fit checks.
- `original`: the original release's key layouts, both directions, layout detection and file conversion.
- `loading`: strict loading of either layout into a model.
"""
from .loading import load_checkpoint, load_weights
from .original import checkpoint_filter_fn, convert_file, to_original_state_dict
from .weights import cpu_state_dict, read_metadata, read_state_dict, save_weights

__all__ = [
    "checkpoint_filter_fn",
    "convert_file",
    "cpu_state_dict",
    "load_checkpoint",
    "load_weights",
    "read_metadata",
    "read_state_dict",
    "save_weights",
    "to_original_state_dict",
]
