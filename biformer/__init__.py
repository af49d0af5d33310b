"""BiFormer: vision transformer with Bi-Level Routing Attention."""
from . import ops
from .ops import BiLevelRoutingAttention, available_backends, bi_level_routing_attention

__version__ = "0.1.0"
__all__ = ["BiLevelRoutingAttention", "available_backends", "bi_level_routing_attention", "ops"]
