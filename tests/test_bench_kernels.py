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
    stage = kernels_bench.Stage(*kernels_bench.STAGES[stage])
    assert kernels_bench.useful_fraction("triton_region", stage) == 1.0


def test_useful_fraction_of_the_tiled_kernel_at_stage_3():
    """14x14 map, 2x2-token regions, 49 of them, 16 routed: valid = 49 regions x 4 queries x 16 x 4 keys; the
    tiled kernel packs 16 regions to a 64-row tile (4 tiles) and meets a 64-column key tile per routed region."""
    stage = kernels_bench.Stage(*kernels_bench.STAGES["stage3"])
    assert kernels_bench.useful_fraction("triton", stage) == 12544 / (4 * 16 * 64 * 64)


def test_region_tiling_counts_odd_regions_long_key_lists_and_wide_heads():
    from biformer.ops.backends import triton_region

    grid = region_grid((30, 33), 7)  # 5x5-token regions (25 tokens: a 32-row query tile), 7 routed: 175 keys
    computed, valid = triton_region.score_tiling(grid, 7, 16)
    assert valid == 49 * 25 * 7 * 25 and computed == 49 * 32 * 3 * 64  # three 64-key tiles
    grid = region_grid((14, 14), 7)  # 2x2-token regions with 128-wide heads: dots on 16-row query tiles
    computed, valid = triton_region.score_tiling(grid, 16, 128)
    assert valid == 49 * 4 * 16 * 4 and computed == 49 * 16 * 64


@pytest.mark.slow
def test_new_kernels_compile_for_sm90_without_spills():
    rows = kernels_bench.kernel_rows(("triton_region",), (torch.bfloat16,))
    assert len(rows) == 15  # forward, dq, dk/dv, routing, inverse routing at three stages
    for row in rows:
        assert row["spill_bytes"] == 0, row
        if row["kernel"] == "forward":
            assert row["registers"] <= 128, row


def test_command(tmp_path, capsys):
    path = tmp_path / "kernels.csv"
    assert main(["bench", "kernels", "--backends", "triton_region", "--dtypes", "bfloat16", "--csv", str(path)]) == 0
    assert "stage3" in capsys.readouterr().out
    assert path.read_text().count("\n") == 16  # header and 3 stages x 5 kernels
