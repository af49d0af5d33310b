"""What the custom-op backends share: torch.export (and so ONNX export) needs plain aten ops."""
from __future__ import annotations

import torch


def exporting_reasons() -> list[str]:
    """Why a custom-op backend cannot run now: torch.export would keep the op opaque, and the
    ONNX exporter has no translation for it (the dense and reference backends export)."""
    if torch.compiler.is_exporting():
        return ["torch.export/ONNX export is tracing, and this backend's custom op has no ONNX translation"]
    return []
