"""Dense prediction on BiFormer: the backbone of the original detection/segmentation code, the semantic
segmentation models (Semantic FPN, UperNet) of the paper's ADE20K experiments, and the detection models
(RetinaNet, Mask R-CNN) of its COCO experiments, and FCOS."""
from .backbone import (
    CheckpointReport,
    DenseBackbone,
    create_backbone,
    load_backbone_checkpoint,
)
from .detection import (
    DETECTION_HEADS,
    DetectionModel,
    DetectionSettings,
    FCOSModel,
    MaskRCNNModel,
    RetinaNetModel,
    create_detection_model,
    detection_settings,
    is_detection_model,
    split_detection_name,
)
from .segmentation import (
    SEGMENTATION_HEADS,
    SegmentationModel,
    SegmentationSettings,
    create_segmentation_model,
    is_segmentation_model,
    segmentation_settings,
    split_segmentation_name,
)

__all__ = [
    "DETECTION_HEADS",
    "SEGMENTATION_HEADS",
    "CheckpointReport",
    "DenseBackbone",
    "DetectionModel",
    "DetectionSettings",
    "FCOSModel",
    "MaskRCNNModel",
    "RetinaNetModel",
    "SegmentationModel",
    "SegmentationSettings",
    "create_backbone",
    "create_detection_model",
    "create_segmentation_model",
    "detection_settings",
    "is_detection_model",
    "is_segmentation_model",
    "load_backbone_checkpoint",
    "segmentation_settings",
    "split_detection_name",
    "split_segmentation_name",
]
