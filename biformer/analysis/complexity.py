"""The paper's complexity analysis of BRA (Sec. 3.3, Eq. 9) made concrete.

For an H x W map of C channels cut into S x S regions, each query region attending to k of them,
BRA costs (multiply-adds, the paper's convention)

    FLOPs(S) = 3HWC^2               q, k, v projections
             + 2(S^2)^2 C           region-to-region routing
             + 2HW k (HW/S^2) C     token attention (q.k and attn.v over k regions of HW/S^2 tokens)

Only the last two terms depend on S. With x = S^2, d/dx [2Cx^2 + 2Ck(HW)^2/x] = 0 gives
x^3 = k(HW)^2 / 2, so

    S* = (k (HW)^2 / 2)^(1/6)   and   FLOPs(S*) = 3HWC^2 + 6C (k (HW)^2 / 2)^(2/3),

i.e. O((HW)^(4/3)) instead of full attention's O((HW)^2). S* does not depend on C.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..files import atomic_output
from ..measure import interleaved_median_seconds
from ..measure import write_csv as write_table_csv
from ..ops import bi_level_routing_attention
from ..progress import progress


@dataclass(frozen=True)
class BRACost:
    """Multiply-adds of one BRA layer on one image for S regions per side (Eq. 9)."""

    regions_per_side: float
    projection: float
    routing: float
    attention: float

    @property
    def total(self) -> float:
        return self.projection + self.routing + self.attention


def bra_cost(height: int, width: int, dim: int, topk: int, regions_per_side: float) -> BRACost:
    """Eq. 9 of the paper; regions_per_side may be fractional (the continuous relaxation)."""
    tokens = height * width
    regions = regions_per_side**2
    return BRACost(
        regions_per_side=regions_per_side,
        projection=3 * tokens * dim**2,
        routing=2 * regions**2 * dim,
        attention=2 * tokens * topk * (tokens / regions) * dim,
    )


def optimal_regions_per_side(height: int, width: int, topk: int) -> float:
    """The S minimising Eq. 9: (k (HW)^2 / 2)^(1/6) (see the module docstring)."""
    return (topk * (height * width) ** 2 / 2) ** (1 / 6)


def valid_regions_per_side(height: int, width: int, topk: int) -> list[int]:
    """S that cut the map into whole regions (S divides H and W, the paper's setting) with k <= S^2."""
    return [s for s in range(1, min(height, width) + 1) if height % s == 0 and width % s == 0 and s * s >= topk]


@dataclass(frozen=True)
class ComplexityRow:
    regions_per_side: int
    tokens_per_region: int
    projection_flops: int
    routing_flops: int
    attention_flops: int
    total_flops: int
    time_ms: float | None  # median wall time of bi_level_routing_attention, None if not measured


def measure_bra_ms(
    height: int, width: int, dim: int, heads: int, topk: int, regions_per_side: int, *,
    batch: int = 1, repeats: int = 5, device: str = "cpu", backend: str | None = None,
) -> float:
    """Median wall time (ms) of our routing + token attention (no projections) on random q, k, v."""
    q, k, v = torch.randn(3, batch, height, width, heads, dim // heads, device=device).unbind(0)

    def run() -> None:
        with torch.no_grad():
            bi_level_routing_attention(q, k, v, regions_per_side, topk, backend=backend)

    seconds = interleaved_median_seconds({"bra": run}, torch.device(device), repeats, warmup=1,
                                         desc=f"S={regions_per_side}")
    return 1e3 * seconds["bra"]


def complexity_table(
    height: int, width: int, dim: int, topk: int, *, heads: int = 1, measure: bool = True,
    repeats: int = 5, device: str = "cpu", backend: str | None = None,
) -> list[ComplexityRow]:
    """One row per valid S: Eq. 9's terms and (if measure) the measured time of our op."""
    rows = []
    sizes = valid_regions_per_side(height, width, topk)
    for s in progress(sizes, desc="regions per side", unit="S", enabled=measure):
        cost = bra_cost(height, width, dim, topk, s)
        time_ms = (
            measure_bra_ms(height, width, dim, heads, topk, s, repeats=repeats, device=device, backend=backend)
            if measure else None
        )
        rows.append(ComplexityRow(  # S divides the map, so every term is a whole number
            regions_per_side=s, tokens_per_region=(height // s) * (width // s), projection_flops=round(cost.projection),
            routing_flops=round(cost.routing), attention_flops=round(cost.attention), total_flops=round(cost.total),
            time_ms=time_ms,
        ))
    return rows


def format_table(rows: Sequence[ComplexityRow], optimum: float) -> str:
    best = min(rows, key=lambda r: r.total_flops).regions_per_side
    lines = [f"{'S':>4} {'S^2':>6} {'tok/reg':>8} {'routing':>10} {'attention':>10} {'routing+attn':>13} "
             f"{'total':>10} {'time ms':>9}"]
    for r in rows:
        time_ms = f"{r.time_ms:9.3f}" if r.time_ms is not None else f"{'-':>9}"
        lines.append(
            f"{r.regions_per_side:>4} {r.regions_per_side**2:>6} {r.tokens_per_region:>8} {_si(r.routing_flops):>10} "
            f"{_si(r.attention_flops):>10} {_si(r.routing_flops + r.attention_flops):>13} {_si(r.total_flops):>10} "
            f"{time_ms}{'  <- fewest FLOPs' if r.regions_per_side == best else ''}"
        )
    lines.append(f"analytic optimum S* = (k (HW)^2 / 2)^(1/6) = {optimum:.2f}; FLOPs are multiply-adds (Eq. 9)")
    return "\n".join(lines)


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def write_csv(rows: Sequence[ComplexityRow], path: str) -> None:
    table = [asdict(r) for r in rows]
    write_table_csv(table, list(table[0]), path)


def plot_complexity(
    rows: Sequence[ComplexityRow], height: int, width: int, dim: int, topk: int, path: str
) -> None:
    """Eq. 9's routing, attention and sum against S (continuous curves, valid S marked), and measured time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    optimum = optimal_regions_per_side(height, width, topk)
    low, high = max(1.0, math.sqrt(topk)), float(min(height, width))
    grid = [low + (high - low) * i / 400 for i in range(401)]
    curves = [bra_cost(height, width, dim, topk, s) for s in grid]
    measured = [r for r in rows if r.time_ms is not None]
    figure, axes = plt.subplots(1, 2 if measured else 1, figsize=(12 if measured else 6.5, 4.5), squeeze=False)
    ax = axes[0, 0]
    ax.plot(grid, [c.routing for c in curves], label="routing 2(S²)²C")
    ax.plot(grid, [c.attention for c in curves], label="token attention 2HW·k·(HW/S²)·C")
    ax.plot(grid, [c.routing + c.attention for c in curves], color="black", label="routing + attention")
    ax.scatter([r.regions_per_side for r in rows], [r.routing_flops + r.attention_flops for r in rows],
               color="black", zorder=3, label="S dividing H and W")
    ax.axvline(optimum, color="red", linestyle="--", label=f"S* = {optimum:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="regions per side S", ylabel="multiply-adds",
           title=f"BRA FLOPs (Eq. 9), {height}x{width}, C={dim}, k={topk}")
    ax.legend(fontsize=8)
    if measured:
        ax = axes[0, 1]
        ax.plot([r.regions_per_side for r in measured], [r.time_ms for r in measured], marker="o")
        ax.axvline(optimum, color="red", linestyle="--", label=f"S* = {optimum:.2f}")
        ax.set(xscale="log", xlabel="regions per side S", ylabel="ms (median)",
               title="measured: routing + token attention (our op)")
        ax.legend(fontsize=8)
    for ax in axes.flat:  # label the valid S themselves, not log-axis powers
        ax.set_xticks([r.regions_per_side for r in rows], [str(r.regions_per_side) for r in rows])
        ax.xaxis.set_minor_formatter(NullFormatter())
    figure.tight_layout()
    try:
        with atomic_output(path) as temp:
            figure.savefig(temp, format="png", dpi=110)
    finally:
        plt.close(figure)
