"""BiFormer models against the original release: parameter counts, key layouts, golden outputs, loading."""
import json
import time

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import biformer  # noqa: F401  (registers the models)
from biformer.checkpoints import checkpoint_filter_fn, load_checkpoint, read_state_dict, to_original_state_dict

PARAMETERS = {"biformer_tiny": 13_142_760, "biformer_small": 25_536_232, "biformer_base": 56_804_968}
STL_MINI = dict(depths=(1, 1, 2, 1), embed_dims=(32, 64, 128, 256), num_classes=10)
GOLDEN_CASES = [  # (model, golden folder, io file, tag, model kwargs)
    ("biformer_tiny", "biformer_tiny", "io.safetensors", "x224", {}),
    ("biformer_tiny", "biformer_tiny", "io_autopad.safetensors", "x256x320", dict(padding="legacy")),
    ("biformer_stl", "biformer_stl_mini", "io.safetensors", "x224", STL_MINI),
    ("biformer_stl_nchw", "biformer_stl_nchw_mini", "io.safetensors", "x224", STL_MINI),
]


def golden_weights(golden_dir, folder):
    return {k: v.float() for k, v in load_file(golden_dir / folder / "weights.safetensors").items()}


@pytest.fixture(scope="module")
def released_shapes(golden_dir):
    return json.loads((golden_dir / "official_state_dict_shapes.json").read_text())


@pytest.mark.parametrize("name", ["biformer_tiny", "biformer_small", "biformer_base", "biformer_stl", "biformer_stl_nchw"])
def test_every_released_key_loads_strictly(name, released_shapes):
    shapes = released_shapes[name]
    with torch.device("meta"):
        model = timm.create_model(name)
        released = {key: torch.empty(shape) for key, shape in shapes.items()}
    expected = PARAMETERS.get(name) or sum(
        torch.Size(s).numel() for k, s in shapes.items() if "running_" not in k and "num_batches" not in k
    )
    assert sum(p.numel() for p in model.parameters()) == expected
    model.load_state_dict(checkpoint_filter_fn(released, model), strict=True, assign=True)
    # and back: our layout converts to exactly the released keys and shapes
    back = to_original_state_dict(model.state_dict(), model)
    assert {k: list(v.shape) for k, v in back.items()} == shapes


@pytest.mark.parametrize("name,folder,io_file,tag,kwargs", GOLDEN_CASES, ids=lambda c: c if isinstance(c, str) else "")
def test_matches_original_outputs(golden_dir, name, folder, io_file, tag, kwargs):
    model = timm.create_model(name, **kwargs).eval()
    model.load_state_dict(checkpoint_filter_fn(golden_weights(golden_dir, folder), model), strict=True)
    io = load_file(golden_dir / folder / io_file)
    with torch.no_grad():
        features, stages = model.forward_intermediates(io[f"{tag}.input"])
        logits = model.forward_head(features)
    for index, stage in enumerate(stages):
        torch.testing.assert_close(stage, io[f"{tag}.stage{index}"], atol=1e-4, rtol=0, msg=f"stage {index}")
    torch.testing.assert_close(features, io[f"{tag}.features"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, io[f"{tag}.logits"], atol=1e-4, rtol=0)


def test_masked_padding_differs_from_legacy_on_padded_input(golden_dir):
    """Sanity check that the legacy golden case really exercises padding (256x320 is not a multiple of 7*32)."""
    model = timm.create_model("biformer_tiny").eval()  # padding="masked"
    model.load_state_dict(checkpoint_filter_fn(golden_weights(golden_dir, "biformer_tiny"), model))
    io = load_file(golden_dir / "biformer_tiny" / "io_autopad.safetensors")
    with torch.no_grad():
        assert (model(io["x256x320.input"]) - io["x256x320.logits"]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def release_file(golden_dir, tmp_path_factory):
    """The golden tiny weights written as the original release writes them: {"model": state_dict} .pth."""
    path = tmp_path_factory.mktemp("release") / "biformer_tiny_in1k.pth"
    torch.save({"model": golden_weights(golden_dir, "biformer_tiny")}, path)
    return path


def test_timm_pretrained_file_gives_original_predictions(golden_dir, release_file, tmp_path):
    io = load_file(golden_dir / "biformer_tiny" / "io.safetensors")
    model = timm.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(release_file)))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(io["x224.input"]), io["x224.logits"], atol=1e-4, rtol=0)
    # our layout as safetensors loads the same way
    ours = tmp_path / "tiny.safetensors"
    save_file(model.state_dict(), ours)
    again = timm.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(ours))).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(io["x224.input"]), io["x224.logits"], atol=1e-4, rtol=0)


def test_wrong_model_checkpoint_lists_keys(golden_dir, tmp_path):
    path = tmp_path / "stl_mini.safetensors"
    save_file(golden_weights(golden_dir, "biformer_stl_mini"), path)
    with pytest.raises(ValueError, match="missing keys.*unexpected keys.*another model"):
        load_checkpoint(timm.create_model("biformer_nano"), path)
    with pytest.raises(RuntimeError, match="Missing key"):  # timm's own path is strict too
        timm.create_model("biformer_nano", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_other_number_of_classes_is_named(golden_dir, release_file):
    with pytest.raises(ValueError, match=r"shape mismatches \(head.weight"):
        load_checkpoint(timm.create_model("biformer_tiny", num_classes=10), release_file)


def test_truncated_and_unsafe_files_are_refused(release_file, tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(release_file.read_bytes()[: 1 << 20])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_state_dict(truncated)
    truncated_st = tmp_path / "truncated.safetensors"
    save_file({"w": torch.ones(1000)}, tmp_path / "whole.safetensors")
    truncated_st.write_bytes((tmp_path / "whole.safetensors").read_bytes()[:-100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_state_dict(truncated_st)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": {"w": torch.ones(1)}, "args": _Custom()}, unsafe)
    with pytest.raises(ValueError, match=r"refused for safety.*Unsupported global.*_Custom"):
        read_state_dict(unsafe)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x02not a pickle" * 8)  # a pickle protocol header, then junk
    with pytest.raises(ValueError, match="corrupt or not a PyTorch checkpoint"):
        read_state_dict(garbage)


class _Custom:
    pass


def test_pretrained_without_file_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"pretrained_cfg_overlay=dict\(file=PATH\)"):
        timm.create_model("biformer_small", pretrained=True)
    assert time.perf_counter() - start < 5
    with pytest.raises(FileNotFoundError, match="does not exist"):
        timm.create_model("biformer_small", pretrained=True, pretrained_cfg_overlay=dict(file="/nonexistent.pth"))
