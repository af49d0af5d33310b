"""BiFormer: vision transformer with Bi-Level Routing Attention.

The models are registered with timm as soon as both `biformer` and `timm` are imported, in either
order; `biformer.ops` alone needs only torch (importing timm and torchvision takes seconds).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

from . import ops
from .ops import BiLevelRoutingAttention, available_backends, bi_level_routing_attention

__version__ = "0.1.0"
__all__ = ["BiLevelRoutingAttention", "available_backends", "bi_level_routing_attention", "models", "ops"]


class _RegisterWithTimm(importlib.abc.MetaPathFinder):
    """Imports biformer.models (which registers the models) right after timm itself has been imported."""

    def find_spec(self, name, path, target=None):
        if name != "timm":
            return None
        sys.meta_path.remove(self)  # once, and out of the way of the search below
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        importlib.import_module(f"{__name__}.models")

    def __getattr__(self, name: str):  # resource readers and the like: timm's own loader answers
        return getattr(self.loader, name)


def __getattr__(name: str) -> ModuleType:
    if name == "models":  # `biformer.models` without importing it first: timm comes with it
        return importlib.import_module(f"{__name__}.models")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "timm" in sys.modules:
    from . import models  # noqa: F401
else:
    sys.meta_path.insert(0, _RegisterWithTimm())
