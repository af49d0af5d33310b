"""Checkpoint files: safe reading, our weight files, the original release's formats, models restored from files.

- `files`: read any .pth/.safetensors safely, write and read our .safetensors (with metadata), strict loading.
- `original`: the original release's key layouts, both directions, layout detection and file conversion.
- `restore`: a ready-to-run model from a checkpoint file (ours or a release file), for eval, predict and visualize.
"""
from .files import cpu_state_dict, load_checkpoint, read_metadata, read_state_dict, save_weights
from .original import checkpoint_filter_fn, convert_file, to_original_state_dict

__all__ = [
    "checkpoint_filter_fn",
    "convert_file",
    "cpu_state_dict",
    "load_checkpoint",
    "read_metadata",
    "read_state_dict",
    "save_weights",
    "to_original_state_dict",
]
