"""Acceptance 1: the BRA module reproduces the original release on its recorded cases."""
import json

import pytest
import torch
from safetensors.torch import load_file

from biformer.checkpoints.original import attention_layer_state_dict
from biformer.ops import BiLevelRoutingAttention, use_backend
from biformer.ops.backends import BACKENDS

ATOL = 1e-4


def _load_case(golden_dir, name):
    data = load_file(str(golden_dir / "ops" / f"{name}.safetensors"))
    config = json.loads((golden_dir / "ops" / "configs.json").read_text())[name.split("_", 1)[1]]
    return data, config


def _build(data, config, channels_last, padding="legacy"):
    layer = BiLevelRoutingAttention(
        config["dim"], config["num_heads"], config["n_win"], config["topk"],
        side_dwconv=config["side_dwconv"], padding=padding, channels_last=channels_last,
    )
    weights = attention_layer_state_dict(
        {key.removeprefix("weight."): value for key, value in data.items() if key.startswith("weight.")}
    )
    layer.load_state_dict(weights, strict=True)
    return layer


def _run(layer, data):
    x = data["input"].clone().requires_grad_(True)
    out = layer(x)
    (out * data["grad_output"]).sum().backward()
    return out, x.grad


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_legacy_matches_original(golden_dir, stage):
    data, config = _load_case(golden_dir, f"legacy_stage{stage}")
    layer = _build(data, config, channels_last=True)
    out, grad = _run(layer, data)
    torch.testing.assert_close(out, data["output"], atol=ATOL, rtol=0)
    torch.testing.assert_close(grad, data["grad_input"], atol=ATOL, rtol=0)

    # routing indices identical (the op's routing on the layer's own q, k)
    from biformer.ops import bi_level_routing_attention

    q, k, v = layer.qkv(data["input"]).unflatten(-1, (3, config["num_heads"], -1)).unbind(3)
    _, routing = bi_level_routing_attention(
        q, k, v, config["n_win"], config["topk"], scale=layer.scale, padding="legacy", return_routing=True
    )
    assert torch.equal(routing.indices, data["r_idx"])
    torch.testing.assert_close(routing.weights, data["r_weight"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("padding", ["legacy", "masked"])
def test_nchw_matches_original(golden_dir, stage, padding):
    # divisible maps: both padding modes equal the original
    data, config = _load_case(golden_dir, f"nchw_stage{stage}")
    layer = _build(data, config, channels_last=False, padding=padding)
    out, grad = _run(layer, data)
    torch.testing.assert_close(out, data["output"], atol=ATOL, rtol=0)
    torch.testing.assert_close(grad, data["grad_input"], atol=ATOL, rtol=0)


# the CPU backends with a backward (the test takes gradients; flex has none on CPU)
@pytest.mark.parametrize("backend", [name for name in BACKENDS if name not in ("triton", "triton_region", "flex")])
def test_nchw_odd_map_matches_original_in_legacy_nchw_mode(golden_dir, backend):
    # 30x33 map, n_win 7: the original NCHW layer cuts it into 8x9 regions of 4x4 tokens, zero-pads
    # q, k, v to 32x36, takes region means over the map's tokens only and attends to the padded keys
    data, config = _load_case(golden_dir, "nchw_odd")
    layer = _build(data, config, channels_last=False, padding="legacy_nchw")
    with use_backend(layer, backend):
        out, grad = _run(layer, data)
    torch.testing.assert_close(out, data["output"], atol=ATOL, rtol=0)
    torch.testing.assert_close(grad, data["grad_input"], atol=ATOL, rtol=0)
