"""Detection models (RetinaNet, FCOS, Mask R-CNN) on BiFormer and timm backbones: the backbone against the original,
losses, gradients and detections, the necks' levels, frozen BatchNorms, the label convention, recipes, names."""
import math

import pytest
import timm
import torch
from safetensors.torch import load_file

from biformer.checkpoints.weights import save_weights
from biformer.dense import (
    DETECTION_HEADS,
    FCOSModel,
    MaskRCNNModel,
    RetinaNetModel,
    create_backbone,
    create_detection_model,
    detection_settings,
    is_detection_model,
    split_detection_name,
)
from biformer.dense.detection import InputP6P7, LastLevelP6P7
from biformer.errors import UserError

SMALL = dict(min_size=128, max_size=160)  # torchvision's resize: images of at most 128x160
TINY = dict(min_size=64, max_size=80)  # for training steps: the 256-channel heads cost ~10 GFLOPs at 128x160
LOSSES = {
    "retinanet": {"classification", "bbox_regression"},
    "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
    "maskrcnn": {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"},
}
OUTPUTS = {"retinanet": {"boxes", "scores", "labels"}, "fcos": {"boxes", "scores", "labels"}, "maskrcnn": {"boxes", "scores", "labels", "masks"}}
# each head on BiFormer's smallest backbone and on a timm CNN or ConvNeXt; a training step takes seconds on a
# CPU (Mask R-CNN's RoI heads more), so one case is in the fast tier
MODELS = [
    "retinanet_biformer_nano",
    pytest.param("retinanet_resnet18", marks=pytest.mark.slow),
    "fcos_biformer_nano",
    pytest.param("fcos_convnext_atto", marks=pytest.mark.slow),
    pytest.param("maskrcnn_biformer_nano", marks=pytest.mark.slow),
    pytest.param("maskrcnn_convnext_atto", marks=pytest.mark.slow),
]


def _batch(with_masks: bool) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two images of different sizes: one with two objects (labels 1 and 3), one with none (a negative)."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 120, 150, generator=generator), torch.rand(3, 100, 90, generator=generator)]
    boxes = [torch.tensor([[10.0, 20.0, 60.0, 80.0], [30.0, 30.0, 140.0, 110.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([1, 3]), torch.zeros(0, dtype=torch.int64)]
    targets = []
    for image, image_boxes, image_labels in zip(images, boxes, labels):
        target = {"boxes": image_boxes, "labels": image_labels}
        if with_masks:  # each object fills its box
            masks = torch.zeros(len(image_boxes), *image.shape[1:], dtype=torch.uint8)
            for mask, (x1, y1, x2, y2) in zip(masks, image_boxes.long().tolist()):
                mask[y1:y2, x1:x2] = 1
            target["masks"] = masks
        targets.append(target)
    return images, targets


def _fewer_rois(model: torch.nn.Module) -> None:
    """Mask R-CNN with fewer proposals and RoIs than COCO's, so that CPU tests stay short (same computation)."""
    if isinstance(model, MaskRCNNModel):
        model.rpn._pre_nms_top_n = dict(training=200, testing=200)
        model.rpn._post_nms_top_n = dict(training=100, testing=100)
        model.roi_heads.fg_bg_sampler.batch_size_per_image = 64
        model.roi_heads.detections_per_img = 20


def _batch_norms(module: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_reproduces_the_original_retinanet_backbone(golden_dir):
    """Acceptance: the original mmdet RetinaNet checkpoint's backbone gives the original's maps."""
    model = create_detection_model("retinanet_biformer_tiny", 80, padding="legacy",
                                   backbone_checkpoint=golden_dir / "dense/mmdet_retinanet_tiny.pth")
    assert "detection/segmentation checkpoint" in str(model.backbone.body.checkpoint_report)
    io = load_file(golden_dir / "dense" / "io.safetensors")
    with torch.no_grad():
        features = model.eval().backbone.body(io["x256x352.input"])
    for index, feature in enumerate(features):
        torch.testing.assert_close(feature, io[f"mmdet.det16.x256x352.stage{index}"], atol=1e-4, rtol=0,
                                   msg=f"stage {index}")


@pytest.mark.parametrize("name", MODELS)
def test_losses_gradients_and_detections(name):
    """Training: finite losses of the head's kinds, with an image without objects in the batch, and gradients
    in every trainable parameter; eval: detections with the head's keys and consistent shapes."""
    torch.manual_seed(0)
    head = name.split("_")[0]
    model = create_detection_model(name, num_classes=3, **TINY)
    _fewer_rois(model)
    images, targets = _batch(with_masks=head == "maskrcnn")
    losses = model(images, targets)
    assert set(losses) == LOSSES[head]
    assert all(loss.ndim == 0 and math.isfinite(loss.item()) for loss in losses.values()), losses
    sum(losses.values()).backward()
    heads = [model.rpn, model.roi_heads] if head == "maskrcnn" else [model.head]
    for part in (model.backbone.body, model.backbone.fpn, *heads):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), type(part).__name__
        assert any(g.abs().sum() > 0 for g in grads), type(part).__name__

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for detection, image in zip(detections, images):
        assert set(detection) == OUTPUTS[head]
        n = len(detection["scores"])
        assert detection["boxes"].shape == (n, 4) and detection["labels"].shape == (n,)
        assert ((detection["labels"] >= 1) & (detection["labels"] <= 3)).all()
        assert (detection["boxes"][:, 2:] <= torch.tensor(image.shape[:0:-1])).all()  # in the input's pixels
        if head == "maskrcnn":
            assert n > 0 and detection["masks"].shape == (n, 1, *image.shape[1:])


@pytest.mark.parametrize("name", ["retinanet_biformer_nano", "fcos_biformer_nano",
                                  pytest.param("maskrcnn_resnet18", marks=pytest.mark.slow)])
def test_a_batch_without_objects_trains_as_negatives(name):
    torch.manual_seed(0)
    model = create_detection_model(name, num_classes=2, **TINY)
    _fewer_rois(model)
    images, targets = _batch(with_masks=name.startswith("maskrcnn"))
    losses = model(images[1:], targets[1:])
    assert all(math.isfinite(loss.item()) for loss in losses.values())
    box_losses = {"retinanet": ("bbox_regression",), "fcos": ("bbox_regression", "bbox_ctrness"),
                  "maskrcnn": ("loss_box_reg", "loss_rpn_box_reg")}[name.split("_")[0]]
    assert all(losses[key].item() == 0 for key in box_losses)
    assert losses.get("classification", losses.get("loss_objectness")).item() > 0  # background is learnt
    sum(losses.values()).backward()


@pytest.mark.parametrize("head, anchors", [("retinanet", 9), ("fcos", 1)])
def test_sigmoid_heads_label_1_to_k(head, anchors):
    """Their K sigmoid outputs stand for labels 1..K: output k - 1 confident everywhere -> every detection is k;
    in training, targets of label k are scored against output k - 1."""
    torch.manual_seed(0)
    model = create_detection_model(f"{head}_resnet18", num_classes=4, **TINY)
    classifier = model.head.classification_head.cls_logits
    assert classifier.out_channels == anchors * 4  # K outputs per anchor, no background
    with torch.no_grad():
        classifier.weight.zero_()
        classifier.bias.copy_(torch.tensor([-10.0, -10.0, 10.0, -10.0]).repeat(anchors))  # output 2 <-> label 3
    images, targets = _batch(with_masks=False)
    targets = targets[:1]
    with torch.no_grad():
        right = model(images[:1], [{**targets[0], "labels": torch.tensor([3, 3])}])["classification"]
        wrong = model(images[:1], [{**targets[0], "labels": torch.tensor([1, 1])}])["classification"]
        assert right < wrong
        detections = model.eval()(images)
    assert all(len(d["labels"]) > 0 and (d["labels"] == 3).all() for d in detections)


@pytest.mark.parametrize("labels", [[0, 1], [1, 4]])
def test_labels_outside_1_to_k_are_refused(labels):
    images, targets = _batch(with_masks=False)
    targets[0]["labels"] = torch.tensor(labels)
    model = create_detection_model("retinanet_biformer_nano", num_classes=3, **TINY)
    with pytest.raises(ValueError, match=r"labels must be 1\.\.3 \(0 is no class\)"):
        model(images, targets)


def test_mask_rcnn_has_a_background_class():
    model = create_detection_model("maskrcnn_biformer_nano", num_classes=4, **SMALL)
    assert model.roi_heads.box_predictor.cls_score.out_features == 5
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 5


def test_retinanet_pyramid_is_p3_to_p7_with_p6_from_the_input_map():
    """mmdet's start_level=1, add_extra_convs='on_input', relu_before_extra_convs=False."""
    torch.manual_seed(0)
    model = create_detection_model("retinanet_biformer_nano", num_classes=3, **SMALL).eval()
    pyramid = model.backbone
    assert pyramid.strides == [8, 16, 32, 64, 128] and len(model.anchor_generator.sizes) == 5
    assert isinstance(pyramid.fpn.extra_blocks, InputP6P7)
    images = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        maps = pyramid.body(images)
        levels = pyramid(images)
        extra = pyramid.fpn.extra_blocks
        torch.testing.assert_close(levels["p6"], extra.p6(maps[3]), atol=0, rtol=0)
        torch.testing.assert_close(levels["p7"], extra.p7(levels["p6"]), atol=0, rtol=0)  # no ReLU between
    assert list(levels) == ["0", "1", "2", "p6", "p7"]
    assert [tuple(level.shape) for level in levels.values()] == [
        (1, 256, 16, 20), (1, 256, 8, 10), (1, 256, 4, 5), (1, 256, 2, 3), (1, 256, 1, 2)]
    # the stride-4 map's norm feeds nothing: kept out of training (DDP needs no find_unused_parameters)
    assert not any(p.requires_grad for p in pyramid.body.norms[0].parameters())


def test_fcos_pyramid_is_p3_to_p7_with_p6_from_the_fpn_output():
    """mmdet's FCOS: start_level=1, add_extra_convs='on_output', relu_before_extra_convs=True."""
    torch.manual_seed(0)
    model = create_detection_model("fcos_biformer_nano", num_classes=3, **SMALL).eval()
    pyramid = model.backbone
    assert pyramid.strides == [8, 16, 32, 64, 128] and len(model.anchor_generator.sizes) == 5
    assert isinstance(pyramid.fpn.extra_blocks, LastLevelP6P7)
    with torch.no_grad():
        levels = pyramid(torch.randn(1, 3, 128, 160))
        extra = pyramid.fpn.extra_blocks
        torch.testing.assert_close(levels["p6"], extra.p6(levels["2"]), atol=0, rtol=0)
        torch.testing.assert_close(levels["p7"], extra.p7(levels["p6"].relu()), atol=0, rtol=0)
    assert list(levels) == ["0", "1", "2", "p6", "p7"]
    assert [tuple(level.shape[2:]) for level in levels.values()] == [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    assert not any(p.requires_grad for p in pyramid.body.norms[0].parameters())
    assert (model.score_thresh, model.nms_thresh, model.detections_per_img) == (0.05, 0.5, 100)  # mmdet's


def test_mask_rcnn_pyramid_is_p2_to_p6():
    """mmdet's Mask R-CNN FPN: strides 4-32 and P6 = P5 subsampled; RoIs pooled from P2-P5."""
    model = create_detection_model("maskrcnn_biformer_nano", num_classes=3, **SMALL).eval()
    pyramid = model.backbone
    assert pyramid.strides == [4, 8, 16, 32, 64] and len(model.rpn.anchor_generator.sizes) == 5
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    with torch.no_grad():
        levels = pyramid(torch.randn(1, 3, 128, 160))
    assert list(levels) == ["0", "1", "2", "3", "pool"]
    assert [tuple(level.shape[2:]) for level in levels.values()] == [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]
    torch.testing.assert_close(levels["pool"], levels["3"][:, :, ::2, ::2], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["retinanet_biformer_nano", "maskrcnn_resnet18"])
def test_backbone_batch_norms_stay_frozen_in_training(name):
    """The original's norm_eval: running statistics fixed in training, affine parameters trained."""
    model = create_detection_model(name, num_classes=3, norm_eval=True, **SMALL)
    norms = _batch_norms(model.backbone.body)
    assert norms and all(not norm.training for norm in norms) and model.training
    model.eval().train()
    assert all(not norm.training for norm in norms)
    assert all(p.requires_grad for norm in norms for p in norm.parameters())
    before = [norm.running_mean.clone() for norm in norms]
    with torch.no_grad():
        model.backbone(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(norm.running_mean, mean) for norm, mean in zip(norms, before))
    if name.startswith("retinanet"):  # BiFormer: the stem's and the downsampling layers'
        body = model.backbone.body
        assert set(norms) == set(_batch_norms(body.stem)) | {norm for stage in body.stages for norm in _batch_norms(stage)}


def test_batch_norms_freeze_by_default_only_for_a_backbone_from_a_checkpoint(tmp_path):
    """torchvision's rule: statistics frozen for pretrained weights only; from scratch they update."""
    scratch = create_detection_model("retinanet_biformer_nano", num_classes=3, **SMALL)
    norms = _batch_norms(scratch.backbone.body)
    assert norms and all(norm.training for norm in norms)
    before = [norm.running_mean.clone() for norm in norms]
    with torch.no_grad():
        scratch.backbone(torch.randn(2, 3, 64, 64))
    assert not any(torch.equal(norm.running_mean, mean) for norm, mean in zip(norms, before))
    checkpoint = tmp_path / "classifier.safetensors"  # a classifier of ours, as `biformer train` writes one
    save_weights(checkpoint, timm.create_model("biformer_nano"), {"model": "biformer_nano"})
    pretrained = create_detection_model("retinanet_biformer_nano", num_classes=3, backbone_checkpoint=checkpoint,
                                        **SMALL)
    assert all(not norm.training for norm in _batch_norms(pretrained.backbone.body))


def test_normalization_is_the_backbones():
    model = create_detection_model("retinanet_biformer_nano", num_classes=3)
    assert model.transform.image_mean == pytest.approx([0.485, 0.456, 0.406])
    assert model.transform.image_std == pytest.approx([0.229, 0.224, 0.225])
    assert (model.transform.min_size, model.transform.max_size) == ((800,), 1333)
    timm_model = create_detection_model("retinanet_convnext_atto", num_classes=3, min_size=320, max_size=480)
    config = timm_model.backbone.body.model.pretrained_cfg
    assert timm_model.transform.image_mean == list(config["mean"]) and timm_model.transform.image_std == list(config["std"])
    assert (timm_model.transform.min_size, timm_model.transform.max_size) == ((320,), 480)


def test_attributes_and_model_settings():
    """The release's COCO configs: 1333x800 with flip 0.5, 16 BRA regions per side, drop path S 0.2 / B 0.3 (their
    optimization is the coco-1x recipe: tests/test_recipes.py)."""
    for head in ("retinanet", "fcos", "maskrcnn"):
        for variant, rate in (("small", 0.2), ("base", 0.3), ("tiny", 0.1)):  # tiny: no release config, ours
            settings = detection_settings(f"{head}_biformer_{variant}")
            assert (settings.max_size, settings.min_size, settings.flip) == (1333, 800, 0.5)
            assert (settings.drop_path, settings.n_win) == (rate, 16)
        assert detection_settings(f"{head}_resnet50").drop_path == 0.0
    model = create_detection_model("maskrcnn_biformer_nano", 7, **SMALL)
    assert (model.name, model.num_classes, model.settings) == ("maskrcnn_biformer_nano", 7, detection_settings(model.name))
    assert isinstance(model, MaskRCNNModel)
    model = create_detection_model("retinanet_resnet18", 2, **SMALL)
    assert (model.name, model.num_classes, model.settings) == ("retinanet_resnet18", 2, detection_settings(model.name))
    assert isinstance(model, RetinaNetModel)
    assert isinstance(create_detection_model("fcos_resnet18", 2, **SMALL), FCOSModel)


def test_drop_path_and_n_win_reach_the_backbone():
    model = create_detection_model("retinanet_biformer_nano", 3, drop_path_rate=0.25, **SMALL)
    oracle = create_backbone("biformer_nano", n_win=16, drop_path_rate=0.25)
    assert [m.drop_prob for m in model.modules() if hasattr(m, "drop_prob")] == [
        m.drop_prob for m in oracle.modules() if hasattr(m, "drop_prob")]
    assert model.backbone.body.stages[0].blocks[0].attn.n_win == (16, 16)


def test_names():
    assert DETECTION_HEADS == ("retinanet", "fcos", "maskrcnn")
    assert split_detection_name("retinanet_biformer_tiny") == ("retinanet", "biformer_tiny")
    assert split_detection_name("maskrcnn_convnext_tiny") == ("maskrcnn", "convnext_tiny")
    assert split_detection_name("fcos_resnet18") == ("fcos", "resnet18")
    assert split_detection_name("maskrcnn_no_such_model") == ("maskrcnn", "no_such_model")  # existence not checked
    for name in ("biformer_tiny", "upernet_resnet18", "retinanet_", "maskrcnn", "mask_rcnn_resnet18"):
        assert split_detection_name(name) is None
    assert is_detection_model("retinanet_biformer_small") and is_detection_model("maskrcnn_resnet50")
    assert not is_detection_model("retinanet_no_such_model") and not is_detection_model("upernet_biformer_tiny")


@pytest.mark.parametrize("name, reason", [
    ("retinanet_no_such_model", "unknown backbone 'no_such_model'"),
    ("yolo_resnet18", "no head prefix"),
])
def test_unknown_names_list_the_accepted_forms(name, reason):
    for make in (lambda: create_detection_model(name, 3), lambda: detection_settings(name)):
        with pytest.raises(UserError, match=f"{reason}.*HEAD_BACKBONE with HEAD one of retinanet, fcos, maskrcnn"):
            make()


def test_a_backbone_without_stride_4_maps_is_refused():
    with pytest.raises(UserError, match=r"'levit_128s' has no feature map at stride 4, 8 .*strides \[16, 32, 64\]"):
        create_detection_model("retinanet_levit_128s", 3)


@pytest.mark.parametrize("num_classes", [0, -1])
def test_num_classes_must_be_positive(num_classes):
    with pytest.raises(ValueError, match=f"num_classes must be at least 1 .*got {num_classes}"):
        create_detection_model("retinanet_biformer_nano", num_classes)


@pytest.mark.parametrize("option", [dict(n_win=8), dict(padding="legacy"), dict(region_size=8)])
def test_biformer_options_are_refused_for_other_backbones(option):
    (name, _), = option.items()
    with pytest.raises(ValueError, match=f"{name}=.* applies to BiFormer backbones only; 'resnet18'"):
        create_detection_model("maskrcnn_resnet18", 3, **option)
