"""BiFormer models, registered with timm on import."""
from .biformer import BiFormer

__all__ = ["BiFormer"]
