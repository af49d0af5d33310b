"""The paper's complexity analysis (Eq. 9): analytic optimum against brute force, table and plot."""
import math

import pytest
from PIL import Image

from biformer.analysis.complexity import (
    bra_cost,
    complexity_table,
    optimal_regions_per_side,
    plot_complexity,
    valid_regions_per_side,
    write_csv,
)


@pytest.mark.parametrize("height,width,topk", [(56, 56, 4), (28, 28, 4), (14, 14, 16), (64, 48, 8), (224, 224, 1)])
def test_analytic_optimum_is_the_brute_force_minimum(height, width, topk):
    dim = 64
    optimum = optimal_regions_per_side(height, width, topk)
    # continuous: the minimum over a fine grid of S lies within one grid step of S*
    steps = [1 + i * 1e-3 for i in range(int((max(height, width) * 2 - 1) / 1e-3))]
    brute = min(steps, key=lambda s: bra_cost(height, width, dim, topk, s).total)
    assert abs(brute - optimum) <= 1e-3
    # integers: the best whole S is the floor or the ceiling of S*
    best_int = min(range(1, 4 * max(height, width)), key=lambda s: bra_cost(height, width, dim, topk, s).total)
    assert best_int in (math.floor(optimum), math.ceil(optimum))


def test_cost_terms_match_a_hand_count():
    # 56x56 map, C=64, k=4, S=7: projections 3*3136*64^2; routing 2*49^2*64; attention 2*3136*4*64*64
    cost = bra_cost(56, 56, 64, 4, 7)
    assert (cost.projection, cost.routing, cost.attention) == (38_535_168, 307_328, 102_760_448)
    assert cost.total == 38_535_168 + 307_328 + 102_760_448


def test_valid_sizes_divide_the_map_and_cover_topk():
    assert valid_regions_per_side(56, 56, 4) == [2, 4, 7, 8, 14, 28, 56]
    assert valid_regions_per_side(12, 18, 2) == [2, 3, 6]
    assert valid_regions_per_side(7, 7, 50) == []


def test_table_plot_and_csv(tmp_path):
    rows = complexity_table(16, 16, 32, 4, heads=2, repeats=1)
    assert [r.regions_per_side for r in rows] == [2, 4, 8, 16]
    assert all(r.time_ms is not None and r.time_ms > 0 for r in rows)
    assert [r.tokens_per_region for r in rows] == [64, 16, 4, 1]
    plot_complexity(rows, 16, 16, 32, 4, str(tmp_path / "c.png"))
    with Image.open(tmp_path / "c.png") as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 300
    write_csv(rows, str(tmp_path / "c.csv"))
    lines = (tmp_path / "c.csv").read_text().splitlines()
    assert lines[0].startswith("regions_per_side,") and len(lines) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "c.png"]  # no temporary files left
