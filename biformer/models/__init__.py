"""BiFormer models, registered with timm on import."""
from .biformer import BiFormer, checkpoint_filter_fn, to_original_state_dict
from .loading import load_checkpoint, read_state_dict

__all__ = ["BiFormer", "checkpoint_filter_fn", "load_checkpoint", "read_state_dict", "to_original_state_dict"]
