"""Dense prediction on BiFormer: the backbone of the original detection/segmentation code, and the
semantic segmentation models (Semantic FPN, UperNet) of the paper's ADE20K experiments."""
from .backbone import (
    CheckpointReport,
    DenseBackbone,
    create_backbone,
    load_backbone_checkpoint,
)
from .segmentation import (
    SEGMENTATION_HEADS,
    SegmentationModel,
    SegmentationRecipe,
    create_segmentation_model,
    is_segmentation_model,
    segmentation_recipe,
    split_segmentation_name,
)

__all__ = [
    "SEGMENTATION_HEADS",
    "CheckpointReport",
    "DenseBackbone",
    "SegmentationModel",
    "SegmentationRecipe",
    "create_backbone",
    "create_segmentation_model",
    "is_segmentation_model",
    "load_backbone_checkpoint",
    "segmentation_recipe",
    "split_segmentation_name",
]
