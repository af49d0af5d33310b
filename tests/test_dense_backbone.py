"""The dense backbone against the original detection/segmentation backbone, and its checkpoint loading."""
import pytest
import torch
from safetensors.torch import load_file

import biformer  # noqa: F401  (registers the models)
from biformer.checkpoints import convert_file
from biformer.dense import create_backbone
from biformer.errors import CheckpointError

GOLDEN_CASES = [  # (tag in dense/io.safetensors, n_win, checkpoint file relative to the golden folder)
    ("cls.det16", 16, "biformer_tiny/weights.safetensors"),
    ("cls.seg8", 8, "biformer_tiny/weights.safetensors"),
    ("mmdet.det16", 16, "dense/mmdet_retinanet_tiny.pth"),
]


@pytest.mark.parametrize("tag,n_win,checkpoint", GOLDEN_CASES, ids=[case[0] for case in GOLDEN_CASES])
def test_reproduces_the_original_dense_backbone(golden_dir, tag, n_win, checkpoint):
    backbone = create_backbone("biformer_tiny", n_win=n_win, padding="legacy", checkpoint=golden_dir / checkpoint)
    io = load_file(golden_dir / "dense" / "io.safetensors")
    with torch.no_grad():
        features = backbone.eval()(io["x256x352.input"])
    assert [f.shape[1] for f in features] == backbone.out_channels == [64, 128, 256, 512]
    for index, feature in enumerate(features):
        torch.testing.assert_close(feature, io[f"{tag}.x256x352.stage{index}"], atol=1e-4, rtol=0, msg=f"stage {index}")


def test_reports_what_each_checkpoint_kind_used(golden_dir, tmp_path):
    release = create_backbone("biformer_tiny", checkpoint=golden_dir / "biformer_tiny/weights.safetensors")
    report = str(release.checkpoint_report)
    assert "classification checkpoint" in report and "not used: head (2), norm (4)" in report
    assert "initial values (weight 1, bias 0): norms.0, norms.1, norms.2, norms.3" in report
    assert torch.equal(release.norms[2].weight, torch.ones(256)) and torch.equal(release.norms[2].bias, torch.zeros(256))

    ours = tmp_path / "ours.safetensors"  # the release file in our layout, as `biformer convert` writes it
    convert_file(str(golden_dir / "biformer_tiny/weights.safetensors"), str(ours))
    again = create_backbone("biformer_tiny", checkpoint=ours)
    assert again.checkpoint_report.unused == {"head": 2, "norm": 4}
    for key, value in release.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, atol=0, rtol=0)

    detection = create_backbone("biformer_tiny", checkpoint=golden_dir / "dense/mmdet_retinanet_tiny.pth")
    report = str(detection.checkpoint_report)
    assert "detection/segmentation checkpoint" in report and "bbox_head" in report and "neck" in report
    assert "initial values" not in report and not torch.equal(detection.norms[0].weight, torch.ones(64))


def test_a_checkpoint_of_another_variant_names_the_keys(golden_dir):
    with pytest.raises(CheckpointError, match=r"does not fit this backbone: .*shape mismatches \(stem\.0\.weight"):
        create_backbone("biformer_small", checkpoint=golden_dir / "biformer_stl_mini/weights.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(stages\.0\.blocks\.2\."):
        create_backbone("biformer_small", checkpoint=golden_dir / "biformer_tiny/weights.safetensors")


@pytest.mark.parametrize("size", [(32, 32), (45, 77)])
def test_any_input_size_from_32(size):
    backbone = create_backbone("biformer_nano", n_win=8).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, *size))
    assert [tuple(f.shape[2:]) for f in features] == [(-(-size[0] // s), -(-size[1] // s)) for s in (4, 8, 16, 32)]


def test_not_a_biformer():
    with pytest.raises(ValueError, match="not a BiFormer variant"):
        create_backbone("resnet18")


def test_region_size_keeps_regions_small_at_any_resolution():
    backbone = create_backbone("biformer_nano", region_size=4).eval()
    layer = backbone.stages[0].blocks[0].attn
    assert layer.regions_per_axis((16, 16)) == (4, 4) and layer.regions_per_axis((64, 100)) == (16, 25)
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 256, 400))
    assert [tuple(f.shape[2:]) for f in features] == [(64, 100), (32, 50), (16, 25), (8, 13)]
