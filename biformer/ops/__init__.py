"""Bi-Level Routing Attention: functional op, module and backends."""
from .backends import available_backends
from .functional import bi_level_routing_attention, region_grid
from .module import BiLevelRoutingAttention, use_backend
from .regions import RegionGrid, Routing

__all__ = [
    "BiLevelRoutingAttention",
    "RegionGrid",
    "Routing",
    "available_backends",
    "bi_level_routing_attention",
    "region_grid",
    "use_backend",
]
