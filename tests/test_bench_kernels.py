"""The Triton kernels judged without a GPU: useful work from the tiling, and an offline sm_90 compile."""
from __future__ import annotations

import pytest
import torch

from biformer.benchmarks import kernels as kernels_bench
from biformer.cli import main
from biformer.ops.functional import region_grid

pytestmark = pytest.mark.skipif(kernels_bench.missing_compiler() is not None,
                                reason=f"no offline Triton compiler: {kernels_bench.missing_compiler()}")


@pytest.mark.parametrize("stage", list(kernels_bench.STAGES))
def test_useful_fraction_at_every_biformer_s_stage(stage):
    """The tiled kernel's share written out: its 64-row tiles pack 64 / T_P regions and keep 1 / slots of each
    64x64 score tile; the region kernel computes exactly the routed entries."""
    side, heads, dim, n_win, topk = kernels_bench.STAGES[stage]
    tokens = (side // n_win) ** 2
    regions, slots = n_win * n_win, 64 // tokens
    tiled = regions * tokens * topk * tokens / (-(-regions // slots) * topk * 64 * 64)
    stage = kernels_bench.Stage(side, heads, dim, n_win, topk)
    assert kernels_bench.useful_fraction("triton", stage) == pytest.approx(tiled)
    assert kernels_bench.useful_fraction("triton_region", stage) >= 0.8


def test_region_tiling_counts_odd_regions_and_long_key_lists():
    from biformer.ops.backends import triton_region

    grid = region_grid(30, 33, 7)  # 5x5-token regions (25 tokens: a 32-row query tile), 7 routed: 175 keys
    computed, valid = triton_region.score_tiling(grid, 7)
    assert valid == 49 * 25 * 7 * 25 and computed == 49 * 32 * 3 * 64  # three 64-key tiles


@pytest.mark.slow
def test_new_kernels_compile_for_sm90_without_spills():
    rows = kernels_bench.kernel_rows(("triton_region",), (torch.bfloat16,))
    assert len(rows) == 9
    for row in rows:
        assert row["spill_bytes"] == 0, row
        if row["kernel"] == "forward":
            assert row["registers"] <= 128, row


def test_command(tmp_path, capsys):
    path = tmp_path / "kernels.csv"
    assert main(["bench", "kernels", "--backends", "triton_region", "--dtypes", "bfloat16", "--csv", str(path)]) == 0
    assert "stage3" in capsys.readouterr().out
    assert path.read_text().count("\n") == 10  # header and 3 stages x 3 kernels
