"""The paper's complexity analysis (Eq. 9): analytic optimum against brute force, table and plot."""
import math

import pytest
from PIL import Image

from biformer.analysis.complexity import (
    bra_cost,
    complexity_table,
    format_table,
    optimal_regions,
    optimal_regions_per_side,
    plot_complexity,
    region_cost,
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
    rows = complexity_table((16, 16), 32, 4, heads=2, repeats=1)
    assert [r.regions_per_side for r in rows] == [2, 4, 8, 16]
    assert all(r.time_ms is not None and r.time_ms > 0 for r in rows)
    assert [r.tokens_per_region for r in rows] == [64, 16, 4, 1]
    plot_complexity(rows, (16, 16), 32, 4, str(tmp_path / "c.png"))
    with Image.open(tmp_path / "c.png") as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 300
    write_csv(rows, str(tmp_path / "c.csv"))
    lines = (tmp_path / "c.csv").read_text().splitlines()
    assert lines[0].startswith("regions_per_side,frame_regions,") and len(lines) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "c.png"]  # no temporary files left


def test_a_clip_map_counts_every_split_over_its_axes_by_eq_9_in_regions(tmp_path):
    # 4 x 8 x 8 tokens, k = 4: frame regions 1, 2, 4 times S in 1, 2, 4, 8 with at least 4 regions
    rows = complexity_table((4, 8, 8), 16, 4, heads=1, repeats=1)
    assert [r.counts for r in rows] == [(1, 2, 2), (1, 4, 4), (1, 8, 8), (2, 2, 2), (2, 4, 4), (2, 8, 8),
                                        (4, 1, 1), (4, 2, 2), (4, 4, 4), (4, 8, 8)]
    two_by_four = next(r for r in rows if r.counts == (2, 4, 4))
    # by hand: N = 256 tokens, R = 32 regions, C = 16: routing 2 * 32^2 * 16, attention 2 * 256 * 4 * (256 / 32) * 16
    assert (two_by_four.routing_flops, two_by_four.attention_flops, two_by_four.tokens_per_region) == (32_768, 262_144, 8)
    assert all(r.time_ms > 0 for r in rows)
    # R* minimises Eq. 9 whatever the axes: a fine grid of region counts finds it
    optimum = optimal_regions(256, 4)
    grid = [1 + i * 1e-2 for i in range(25_600)]
    assert abs(min(grid, key=lambda regions: region_cost(256, 16, 4, regions).total) - optimum) <= 1e-2
    plot_complexity(rows, (4, 8, 8), 16, 4, str(tmp_path / "clip.png"))
    with Image.open(tmp_path / "clip.png") as image:
        assert image.format == "PNG" and image.width > 600
    assert "R* = (k (T H W)^2 / 2)^(1/3)" in format_table(rows, (4, 8, 8), 4)
