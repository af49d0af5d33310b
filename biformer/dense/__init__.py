"""Dense prediction on BiFormer: the backbone of the original detection/segmentation code."""
from .backbone import (
    CheckpointReport,
    DenseBackbone,
    create_backbone,
    load_backbone_checkpoint,
)

__all__ = ["CheckpointReport", "DenseBackbone", "create_backbone", "load_backbone_checkpoint"]
