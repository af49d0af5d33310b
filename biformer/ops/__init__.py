"""Bi-Level Routing Attention: functional op, module and backends."""
from .backends import available_backends
from .depthwise import DepthwiseConv2d
from .functional import bi_level_routing_attention, region_grid
from .mlp import LeanMlp
from .module import BiLevelRoutingAttention, use_backend
from .regions import RegionGrid, Routing

__all__ = [
    "BiLevelRoutingAttention",
    "DepthwiseConv2d",
    "LeanMlp",
    "RegionGrid",
    "Routing",
    "available_backends",
    "bi_level_routing_attention",
    "region_grid",
    "use_backend",
]
