"""FLOP counting: one BRA layer against a hand count, and the paper's table for BiFormer-T/S/B."""
import pytest
import timm
from torch import nn

import biformer  # noqa: F401  (registers the models)
from biformer.analysis.flops import count_flops, format_report
from biformer.ops import BiLevelRoutingAttention


class _Wrapper(nn.Module):
    """(B, C, H, W) image -> BRA layer, so count_flops can feed it like a model."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("height,width", [(16, 20), (15, 18)], ids=["whole-regions", "padded"])
def test_bra_layer_matches_hand_count(height, width):
    dim, heads, n_win, topk, kernel, batch = 64, 2, 4, 3, 3, 2
    layer = BiLevelRoutingAttention(dim, heads, n_win, topk, side_dwconv=kernel, channels_last=False)
    report = count_flops(_Wrapper(layer), (height, width), batch=batch, in_chans=dim)
    # hand count, multiply-adds; regions are ceil-sized and the padded slots of routed regions are
    # attended to (masked), so the attention works on the padded grid
    region_h, region_w = -(-height // n_win), -(-width // n_win)
    regions, tokens = n_win * n_win, region_h * region_w
    pixels = height * width
    paper = report.by_kind("paper")
    assert paper["routing"] == batch * regions * regions * dim  # (R, C) @ (C, R) on region means
    assert paper["region attention"] == batch * regions * tokens * topk * tokens * 2 * dim  # q.k and attn.v
    assert paper["linear"] == batch * pixels * (3 * dim * dim + dim * dim)  # qkv and proj
    assert paper["convolution"] == batch * pixels * dim * kernel * kernel  # depthwise lepe
    assert set(paper) == {"routing", "region attention", "linear", "convolution"}
    assert report.total_params == sum(p.numel() for p in layer.parameters())
    # the complete count adds at least the biases and the attention softmax to the doubled paper count
    complete = report.by_kind("complete")
    scores = batch * heads * regions * tokens * topk * tokens  # one logit per head, query and routed key slot
    assert complete["region attention"] == 2 * paper["region attention"] + 5 * scores  # scale + softmax
    assert complete["linear"] == 2 * paper["linear"] + batch * pixels * 4 * dim
    assert report.uncounted_ops == []


@pytest.mark.parametrize("chosen", ["indexed", None], ids=["forced", "automatic"])
def test_counting_restores_the_layers_own_backend(chosen, monkeypatch):
    """Counting runs the reference backend, then gives each layer back the backend it had."""
    from biformer.ops import backends

    layer = BiLevelRoutingAttention(32, 2, 2, 2, backend=chosen, channels_last=False)
    used = []
    select = backends.select_backend
    monkeypatch.setattr("biformer.ops.functional.select_backend",
                        lambda requested, inputs: used.append(requested) or select(requested, inputs))
    count_flops(_Wrapper(layer), (8, 8), in_chans=32)
    assert used and set(used) == {"reference"} and layer.backend == chosen


@pytest.mark.parametrize("name,params,flops", [
    ("biformer_tiny", "13.1M", "2.2G"), ("biformer_small", "25.5M", "4.5G"), ("biformer_base", "56.8M", "9.8G"),
])
def test_paper_table(name, params, flops):
    report = count_flops(timm.create_model(name), (224, 224))
    text = format_report(report, name)
    assert f"{params} parameters, {flops} FLOPs (paper convention" in text
    by_kind = report.by_kind("paper")
    assert by_kind["region attention"] > 0 and by_kind["full attention"] > 0 and by_kind["routing"] > 0
    assert [g for g in report.paper if g.startswith("stages.")] == [f"stages.{i}" for i in range(4)]
    assert 1.9 < report.total_complete / report.total_paper < 2.2
