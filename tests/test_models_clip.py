"""BiFormer for clips (biformer3d_*): shapes, timm's contract, and inflation from the image weights, checked
against the image model on clips of identical frames (the release's BiFormer-T in ../shared/golden)."""
import pytest
import timm
import torch
from safetensors.torch import load_file

import biformer  # noqa: F401  (registers the models)
from biformer.checkpoints import checkpoint_filter_fn
from biformer.checkpoints.inflation import inflate_state_dict
from biformer.checkpoints.loading import load_pretrained_classifier


def test_a_clip_model_takes_any_clip_and_gives_features_per_stage():
    model = timm.create_model("biformer3d_nano", num_classes=7).eval()
    assert model(torch.randn(2, 3, 6, 70, 50)).shape == (2, 7)  # sizes not divisible by the regions
    features = timm.create_model("biformer3d_nano", features_only=True)
    shapes = [tuple(f.shape) for f in features(torch.randn(1, 3, 8, 64, 64))]
    assert shapes == [(1, 32, 4, 16, 16), (1, 64, 4, 8, 8), (1, 128, 4, 4, 4), (1, 256, 4, 2, 2)]  # time halved once
    final, intermediates = model.forward_intermediates(torch.randn(1, 3, 8, 64, 64), output_fmt="NCTHW")
    assert final.shape == (1, 256, 4, 2, 2) and len(intermediates) == 4


def test_inflated_kernels_sum_to_the_image_kernel_over_time():
    model = timm.create_model("biformer3d_nano")
    image = timm.create_model("biformer_nano").state_dict()
    state, inflated = inflate_state_dict(image, model)
    assert "stem.0.weight" in inflated and "stages.0.blocks.0.attn.lepe.weight" in inflated
    for key in inflated:
        assert state[key].shape == model.state_dict()[key].shape
        torch.testing.assert_close(state[key].sum(2), image[key])  # what a clip of identical frames sees
    lepe = state["stages.0.blocks.0.attn.lepe.weight"]  # a time-padded conv: the centre frame only
    assert lepe[:, :, 1].equal(image["stages.0.blocks.0.attn.lepe.weight"]) and not lepe[:, :, 0].any()


@pytest.fixture(scope="module")
def tiny_weights(golden_dir):
    return {key: value.float() for key, value in load_file(golden_dir / "biformer_tiny" / "weights.safetensors").items()}


def _inflated_tiny(weights, **kwargs):
    model = timm.create_model("biformer3d_tiny", **kwargs).eval()
    state, _ = inflate_state_dict(checkpoint_filter_fn(weights, model), model)
    model.load_state_dict(state, strict=True)
    return model


def test_inflated_tiny_gives_the_image_logits_on_identical_frames(golden_dir, tiny_weights):
    image_model = timm.create_model("biformer_tiny").eval()
    image_model.load_state_dict(checkpoint_filter_fn(tiny_weights, image_model), strict=True)
    images = load_file(golden_dir / "biformer_tiny" / "io.safetensors")["x224.input"]  # (2, 3, 224, 224)
    clips = images[:, :, None].expand(-1, -1, 4, -1, -1)  # 4 identical frames, 2 after the stem
    with torch.no_grad():
        expected = image_model(images)
        one_region_in_time = _inflated_tiny(tiny_weights, temporal_regions=1)(clips)
        default = _inflated_tiny(tiny_weights)(clips)
    torch.testing.assert_close(one_region_in_time, expected, atol=1e-4, rtol=0)
    # two regions along time hold one frame each: every region has an identical twin, the routing ties between
    # them, and a query region may take both twins of one region instead of two regions: the logits move
    difference = (default - expected).abs().max().item()
    print(f"inflated biformer3d_tiny, default regions, 2 identical frames: max |logit difference| {difference:.3g}")
    assert difference > 1e-4


def test_pretrained_inflates_an_image_checkpoint_and_says_so(golden_dir, tiny_weights):
    model = timm.create_model("biformer3d_tiny", num_classes=5)
    report = load_pretrained_classifier(model, golden_dir / "biformer_tiny" / "weights.safetensors")
    assert "conv kernels inflated over time" in report.kind and report.initial == ["head"]
    torch.testing.assert_close(model.stages[2].blocks[0].attn.qkv.weight,
                               checkpoint_filter_fn(tiny_weights, model)["stages.2.blocks.0.attn.qkv.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("suffix, legacy", [(".onnx", False), (".onnx", True), (".pt", False)])
def test_a_clip_model_exports_with_frames_height_and_width_free(tmp_path, suffix, legacy):
    """The dynamo ONNX exporter (which runs torch.export, the .pt2 format's), the legacy one and a TorchScript
    trace; `export` checks each file against eager PyTorch at other frames, sizes and batches before writing it."""
    from biformer.export import ExportSettings, export, format_for_path

    path = tmp_path / f"clip{suffix}"
    settings = ExportSettings(format_for_path(path), dynamic=True, legacy=legacy)
    model = timm.create_model("biformer3d_nano", num_classes=5).eval()
    checks, sizes = export(model, path, settings, 64, 64, frames=8)
    assert path.is_file() and all(check.passed for check in checks)
    assert {check.input_shape[2] for check in checks} == {8, 11, 4} and "frames 4..1024" in sizes


def test_timm_pretrained_inflates_an_image_file(tmp_path):
    from safetensors.torch import save_file

    image = timm.create_model("biformer_nano", num_classes=10)
    save_file(image.state_dict(), tmp_path / "nano.safetensors")
    clip = timm.create_model("biformer3d_nano", pretrained=True, num_classes=10,
                             pretrained_cfg_overlay=dict(file=str(tmp_path / "nano.safetensors"))).eval()
    torch.testing.assert_close(clip.stem[0].weight.sum(2), image.stem[0].weight)
    with pytest.raises(ValueError, match="at least 2 frames"):
        clip(torch.randn(1, 3, 1, 64, 64))
