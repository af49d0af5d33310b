"""BiFormer: vision transformer with Bi-Level Routing Attention. Importing it registers the models with timm."""
from . import models, ops
from .ops import BiLevelRoutingAttention, available_backends, bi_level_routing_attention

__version__ = "0.1.0"
__all__ = ["BiLevelRoutingAttention", "available_backends", "bi_level_routing_attention", "models", "ops"]
