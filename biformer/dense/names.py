"""Dense model names: `<head>_<backbone>`, e.g. upernet_biformer_tiny or maskrcnn_convnext_atto. Each task module
declares its heads (segmentation's SEGMENTATION_HEADS, detection's DETECTION_HEADS); these helpers read names
against such a list."""
from __future__ import annotations

import timm

from ..errors import UserError


def is_biformer(backbone: str) -> bool:
    return backbone.startswith("biformer")


def split_head_name(name: str, heads: tuple[str, ...]) -> tuple[str, str] | None:
    """'upernet_biformer_tiny' -> ('upernet', 'biformer_tiny') for a head in `heads`; None without such a prefix.

    Whether timm knows the backbone is not checked.
    """
    head, _, backbone = name.partition("_")
    return (head, backbone) if head in heads and backbone else None


def head_forms(heads: tuple[str, ...]) -> str:
    """('sfpn', 'upernet') -> 'sfpn_<backbone>, upernet_<backbone>': the accepted name forms, for messages."""
    return ", ".join(f"{head}_<backbone>" for head in heads)


def is_head_model(name: str, heads: tuple[str, ...]) -> bool:
    """A head prefix of `heads` and a backbone that timm knows (BiFormer variants included)."""
    parts = split_head_name(name, heads)
    return parts is not None and timm.is_model(parts[1])


def parse_head_name(name: str, heads: tuple[str, ...], task: str) -> tuple[str, str]:
    """(head, backbone) of a `task` model's name; UserError without a head of `heads` or a backbone timm knows."""
    parts = split_head_name(name, heads)
    if parts is None or not timm.is_model(parts[1]):
        unknown = f"unknown backbone {parts[1]!r}" if parts else "no head prefix"
        raise UserError(
            f"{task} model {name!r}: {unknown}; use HEAD_BACKBONE with HEAD one of {', '.join(heads)} "
            "and BACKBONE a BiFormer variant (biformer_tiny, biformer_small, biformer_base) or a timm model with "
            f"feature maps at strides 4-32 (resnet18, convnext_tiny, ...), e.g. {heads[-1]}_biformer_small")
    return parts
