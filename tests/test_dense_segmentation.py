"""Segmentation models (Semantic FPN, UperNet) on BiFormer and timm backbones: shapes, names, recipes,
gradients, checkpoints, and the backbone and memory-lean decoder against their oracles."""
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from timm.layers import DropPath

from biformer.dense import (
    SegmentationModel,
    create_backbone,
    create_segmentation_model,
    is_segmentation_model,
    segmentation_settings,
    split_segmentation_name,
)
from biformer.dense.segmentation import LeanUPerNetDecoder
from biformer.errors import UserError

# small backbones of each kind: BiFormer's own, a timm CNN with a stride-2 map, a timm model with strides 4-32 only
MODELS = ["sfpn_biformer_nano", "upernet_biformer_nano", "sfpn_resnet18", "upernet_convnext_atto"]


def _randomize_batch_norms(model: torch.nn.Module) -> None:
    """Running statistics away from (0, 1), so that eval-mode outputs depend on them."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("name", MODELS)
def test_output_shapes_and_gradients(name):
    """Training: "out" and, for UperNet, "aux", and gradients in every part; eval: "out" alone."""
    torch.manual_seed(0)
    model = create_segmentation_model(name, num_classes=5).train()
    images = torch.randn(2, 3, 96, 64)
    outputs = model(images)
    has_aux = name.startswith("upernet")
    assert sorted(outputs) == (["aux", "out"] if has_aux else ["out"]) and (model.aux_head is not None) == has_aux
    assert all(output.shape == (2, 5, 96, 64) for output in outputs.values())
    sum(output.square().mean() for output in outputs.values()).backward()
    for part in [model.backbone, model.decoder, model.head] + [model.aux_head] * has_aux:
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), type(part).__name__
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert list(outputs) == ["out"] and outputs["out"].shape == (2, 5, 96, 64) and outputs["out"].is_contiguous()


def test_sizes_not_divisible_by_32_are_refused():
    model = create_segmentation_model("sfpn_biformer_nano", 3).eval()
    with pytest.raises(ValueError, match=r"images of 64x80: .*divisible by 32.*pad to 64x96"):
        model(torch.randn(1, 3, 64, 80))


def test_names():
    assert split_segmentation_name("upernet_biformer_tiny") == ("upernet", "biformer_tiny")
    assert split_segmentation_name("sfpn_convnext_tiny") == ("sfpn", "convnext_tiny")
    assert split_segmentation_name("sfpn_no_such_model") == ("sfpn", "no_such_model")  # existence not checked
    for name in ("biformer_tiny", "fpn_resnet18", "upernet_", "upernet"):
        assert split_segmentation_name(name) is None
    assert is_segmentation_model("upernet_biformer_tiny") and is_segmentation_model("sfpn_resnet18")
    assert not is_segmentation_model("upernet_no_such_model") and not is_segmentation_model("biformer_tiny")


@pytest.mark.parametrize("name, reason", [
    ("upernet_no_such_model", "unknown backbone 'no_such_model'"),
    ("deeplab_resnet18", "no head prefix"),
])
def test_unknown_names_list_the_accepted_forms(name, reason):
    for make in (lambda: create_segmentation_model(name, 3), lambda: segmentation_settings(name)):
        with pytest.raises(UserError, match=f"{reason}.*HEAD_BACKBONE with HEAD one of sfpn, upernet"):
            make()


def test_a_backbone_without_stride_4_maps_is_refused():
    with pytest.raises(UserError, match=r"'levit_128s' has no feature map at stride 4, 8 .*strides \[16, 32, 64\]"):
        create_segmentation_model("sfpn_levit_128s", 3)


@pytest.mark.parametrize("option", [dict(n_win=7), dict(padding="legacy"), dict(region_size=8)])
def test_biformer_options_are_refused_for_other_backbones(option):
    (name, _), = option.items()
    with pytest.raises(ValueError, match=f"{name}=.* applies to BiFormer backbones only; 'resnet18'"):
        create_segmentation_model("sfpn_resnet18", 3, **option)


def test_model_settings_are_the_original_configs():
    """The release's ADE20K configs: crop 512, drop path S 0.15 / B 0.3 (Semantic FPN), S 0.3 / B 0.4 (UperNet), the
    auxiliary head's weight (their optimization is the ade20k-* recipes: tests/test_recipes.py)."""
    for variant, rate in (("small", 0.15), ("base", 0.3)):
        settings = segmentation_settings(f"sfpn_biformer_{variant}")
        assert (settings.crop, settings.drop_path, settings.aux_weight) == (512, rate, 0.0)
    for variant, rate in (("small", 0.3), ("base", 0.4)):
        settings = segmentation_settings(f"upernet_biformer_{variant}")
        assert (settings.crop, settings.drop_path, settings.aux_weight) == (512, rate, 0.4)
    assert segmentation_settings("upernet_biformer_tiny").drop_path == 0.1  # no release config: ours
    assert segmentation_settings("upernet_convnext_tiny").drop_path == 0.0


def test_drop_path_comes_from_the_model_settings_unless_given():
    def largest_rate(model):
        return max(module.drop_prob for module in model.modules() if isinstance(module, DropPath))

    model = create_segmentation_model("upernet_biformer_nano", 3)
    assert model.settings == segmentation_settings("upernet_biformer_nano")
    assert largest_rate(model) == pytest.approx(model.settings.drop_path)  # the last block takes the full rate
    assert largest_rate(create_segmentation_model("upernet_biformer_nano", 3, drop_path_rate=0.25)) == pytest.approx(0.25)


def test_backbone_maps_are_create_backbones():
    """Oracle: the independently tested dense backbone, on the same weights."""
    torch.manual_seed(0)
    model = create_segmentation_model("upernet_biformer_nano", 3, n_win=4, padding="legacy").eval()
    oracle = create_backbone("biformer_nano", n_win=4, padding="legacy").eval()
    oracle.load_state_dict(model.backbone.state_dict())
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for ours, expected in zip(model.backbone(images), oracle(images), strict=True):
            torch.testing.assert_close(ours, expected, atol=0, rtol=0)


@pytest.mark.parametrize("normalize", [False, True])
def test_lean_upernet_decoder_computes_smps_result(normalize):
    """The memory-lean forward against smp's own on the same parameters, with smp's map norms (timm backbones)
    and without (BiFormer's maps are normed already)."""
    torch.manual_seed(0)
    channels = [32, 64, 128, 256]
    decoder = LeanUPerNetDecoder(channels, decoder_channels=512, normalize=normalize).eval()
    _randomize_batch_norms(decoder)
    features = [torch.randn(2, c, 64 // s, 96 // s) for c, s in zip(channels, (4, 8, 16, 32))]
    with torch.no_grad():
        expected = UPerNetDecoder.forward(decoder, [None, None, *features])
        torch.testing.assert_close(decoder(features), expected, atol=1e-5, rtol=1e-5)


def test_state_dict_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    model = create_segmentation_model("upernet_biformer_nano", 3).eval()
    _randomize_batch_norms(model)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    torch.manual_seed(1)
    again = create_segmentation_model("upernet_biformer_nano", 3).eval()
    again.load_state_dict(load_file(tmp_path / "model.safetensors"))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(images)["out"], model(images)["out"], atol=0, rtol=0)


def test_backbone_checkpoint_passes_through(golden_dir):
    checkpoint = golden_dir / "biformer_tiny/weights.safetensors"
    model = create_segmentation_model("sfpn_biformer_tiny", 3, backbone_checkpoint=checkpoint)
    assert isinstance(model, SegmentationModel)
    assert "classification checkpoint" in str(model.backbone.checkpoint_report)
    expected = create_backbone("biformer_tiny", checkpoint=checkpoint).state_dict()
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("backbone", ["resnet18", "convnext_atto"])
def test_a_timm_backbone_starts_from_its_classifiers_checkpoint(backbone, tmp_path):
    """The feature maps of a timm backbone loaded from its classifier's file are the classifier's own
    intermediate maps (timm's forward_intermediates), and the head is reported unused."""
    classifier = timm.create_model(backbone, num_classes=7).eval()
    path = tmp_path / "classifier.pth"
    torch.save({"state_dict": classifier.state_dict()}, path)  # as PyTorch training scripts wrap it
    model = create_segmentation_model(f"sfpn_{backbone}", 3, backbone_checkpoint=path).eval()
    report = model.backbone.checkpoint_report
    assert report.loaded > 0 and set(report.unused) <= {"fc", "head"} and sum(report.unused.values()) >= 2
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = classifier.forward_intermediates(x, intermediates_only=True)
        for got, want in zip(model.backbone(x), expected[-4:]):
            torch.testing.assert_close(got, want)


def test_a_checkpoint_of_another_model_is_refused_naming_its_keys(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34").state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit the feature maps of resnet18: .* unexpected keys \(layer1.2.bn1.bias"):
        create_segmentation_model("sfpn_resnet18", 3, backbone_checkpoint=path)
