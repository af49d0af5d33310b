"""The paper's complexity analysis of BRA (Sec. 3.3, Eq. 9) made concrete, for images and for clips or volumes.

For an H x W map of C channels cut into S x S regions, each query region attending to k of them,
BRA costs (multiply-adds, the paper's convention)

    FLOPs(S) = 3HWC^2               q, k, v projections
             + 2(S^2)^2 C           region-to-region routing
             + 2HW k (HW/S^2) C     token attention (q.k and attn.v over k regions of HW/S^2 tokens)

Only the last two terms depend on S. With x = S^2, d/dx [2Cx^2 + 2Ck(HW)^2/x] = 0 gives
x^3 = k(HW)^2 / 2, so

    S* = (k (HW)^2 / 2)^(1/6)   and   FLOPs(S*) = 3HWC^2 + 6C (k (HW)^2 / 2)^(2/3),

i.e. O((HW)^(4/3)) instead of full attention's O((HW)^2). S* does not depend on C.

A map of N tokens over any number of axes (a T x H x W clip) cut into R regions costs the same terms with HW ->
N and S^2 -> R, so R* = (k N^2 / 2)^(1/3): how R is split over the axes does not change the count (only how
well the regions fit the content), and the table lists every split whose counts divide the axes.
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
    """Multiply-adds of one BRA layer on one map cut into `regions` regions (Eq. 9)."""

    regions: float
    projection: float
    routing: float
    attention: float

    @property
    def total(self) -> float:
        return self.projection + self.routing + self.attention


def region_cost(tokens: int, dim: int, topk: int, regions: float) -> BRACost:
    """Eq. 9 for a map of `tokens` tokens in any number of axes, cut into `regions` regions (may be fractional:
    the continuous relaxation): routing 2R^2C, token attention 2N k (N/R) C."""
    return BRACost(regions=regions, projection=3 * tokens * dim**2, routing=2 * regions**2 * dim,
                   attention=2 * tokens * topk * (tokens / regions) * dim)


def bra_cost(height: int, width: int, dim: int, topk: int, regions_per_side: float) -> BRACost:
    """Eq. 9 of the paper for an image cut into S x S regions; S may be fractional."""
    return region_cost(height * width, dim, topk, regions_per_side**2)


def optimal_regions(tokens: int, topk: int) -> float:
    """The region count R minimising Eq. 9 on a map of `tokens` tokens, whatever its axes: (k N^2 / 2)^(1/3)."""
    return (topk * tokens**2 / 2) ** (1 / 3)


def optimal_regions_per_side(height: int, width: int, topk: int) -> float:
    """The S minimising Eq. 9: (k (HW)^2 / 2)^(1/6) (see the module docstring)."""
    return math.sqrt(optimal_regions(height * width, topk))


def valid_regions_per_side(height: int, width: int, topk: int) -> list[int]:
    """S that cut the map into whole regions (S divides H and W, the paper's setting) with k <= S^2."""
    return [s for s in range(1, min(height, width) + 1) if height % s == 0 and width % s == 0 and s * s >= topk]


def valid_region_counts(size: Sequence[int], topk: int) -> list[tuple[int, ...]]:
    """The regions per axis that cut the map into whole regions, at least k of them: (S, S) for an H x W image,
    (T', S, S) for a T x H x W clip or volume (S x S in space as the models cut it, T' any divisor of T)."""
    *time, height, width = size
    sides = valid_regions_per_side(height, width, 1)
    counts = [(*frames, s, s) for frames in ([()] if not time else [(t,) for t in range(1, time[0] + 1)
                                                                     if time[0] % t == 0]) for s in sides]
    return [count for count in counts if math.prod(count) >= topk]


@dataclass(frozen=True)
class ComplexityRow:
    regions_per_side: int
    frame_regions: int | None  # regions along the first axis of a clip or volume (None for an image)
    tokens_per_region: int
    projection_flops: int
    routing_flops: int
    attention_flops: int
    total_flops: int
    time_ms: float | None  # median wall time of bi_level_routing_attention, None if not measured

    @property
    def counts(self) -> tuple[int, ...]:
        """Regions per axis."""
        side = (self.regions_per_side,) * 2
        return side if self.frame_regions is None else (self.frame_regions, *side)

    @property
    def label(self) -> str:
        return str(self.regions_per_side) if self.frame_regions is None else "x".join(map(str, self.counts))


def measure_bra_ms(
    size: Sequence[int], dim: int, heads: int, topk: int, counts: tuple[int, ...], *,
    batch: int = 1, repeats: int = 5, device: str = "cpu", backend: str | None = None,
) -> float:
    """Median wall time (ms) of our routing + token attention (no projections) on random q, k, v."""
    q, k, v = torch.randn(3, batch, *size, heads, dim // heads, device=device).unbind(0)

    def run() -> None:
        with torch.no_grad():
            bi_level_routing_attention(q, k, v, counts, topk, backend=backend)

    seconds = interleaved_median_seconds({"bra": run}, torch.device(device), repeats, warmup=1,
                                         desc=f"regions {'x'.join(map(str, counts))}")
    return 1e3 * seconds["bra"]


def complexity_table(
    size: Sequence[int], dim: int, topk: int, *, heads: int = 1, measure: bool = True,
    repeats: int = 5, device: str = "cpu", backend: str | None = None,
) -> list[ComplexityRow]:
    """One row per valid region count (`valid_region_counts`) of an H x W or T x H x W map: Eq. 9's terms and
    (if measure) the measured time of our op."""
    rows = []
    tokens = math.prod(size)
    for counts in progress(valid_region_counts(size, topk), desc="region counts", unit="count", enabled=measure):
        cost = region_cost(tokens, dim, topk, math.prod(counts))
        time_ms = (measure_bra_ms(size, dim, heads, topk, counts, repeats=repeats, device=device, backend=backend)
                   if measure else None)
        rows.append(ComplexityRow(  # the counts divide the map, so every term is a whole number
            regions_per_side=counts[-1], frame_regions=counts[0] if len(counts) == 3 else None,
            tokens_per_region=tokens // math.prod(counts), projection_flops=round(cost.projection),
            routing_flops=round(cost.routing), attention_flops=round(cost.attention), total_flops=round(cost.total),
            time_ms=time_ms,
        ))
    return rows


def format_table(rows: Sequence[ComplexityRow], size: Sequence[int], topk: int) -> str:
    best = min(rows, key=lambda r: r.total_flops)
    planar = len(size) == 2
    head = "S" if planar else "T'xSxS"
    width = max(len(head), *(len(r.label) for r in rows))
    lines = [f"{head:>{width}} {'regions':>7} {'tok/reg':>8} {'routing':>10} {'attention':>10} {'routing+attn':>13} "
             f"{'total':>10} {'time ms':>9}"]
    for r in rows:
        time_ms = f"{r.time_ms:9.3f}" if r.time_ms is not None else f"{'-':>9}"
        lines.append(
            f"{r.label:>{width}} {math.prod(r.counts):>7} {r.tokens_per_region:>8} {_si(r.routing_flops):>10} "
            f"{_si(r.attention_flops):>10} {_si(r.routing_flops + r.attention_flops):>13} {_si(r.total_flops):>10} "
            f"{time_ms}{'  <- fewest FLOPs' if r is best else ''}"
        )
    optimum = optimal_regions(math.prod(size), topk)
    lines.append(f"analytic optimum S* = (k (HW)^2 / 2)^(1/6) = {math.sqrt(optimum):.2f}" if planar else
                 f"analytic optimum R* = (k (T H W)^2 / 2)^(1/3) = {optimum:.2f} regions, any split over the axes")
    lines[-1] += "; FLOPs are multiply-adds (Eq. 9)"
    return "\n".join(lines)


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def write_csv(rows: Sequence[ComplexityRow], path: str) -> None:
    table = [asdict(r) for r in rows]
    write_table_csv(table, list(table[0]), path)


def plot_complexity(rows: Sequence[ComplexityRow], size: Sequence[int], dim: int, topk: int, path: str) -> None:
    """Eq. 9's routing, attention and sum against the regions (continuous curves, valid counts marked), and the
    measured time: against S for an image, against the region count R for a clip or volume."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    planar, tokens = len(size) == 2, math.prod(size)
    axis = (lambda regions: math.sqrt(regions)) if planar else (lambda regions: regions)  # the x of R regions
    optimum = axis(optimal_regions(tokens, topk))
    low, high = max(1.0, topk), float(min(size[-2:]) ** 2 * (1 if planar else size[0]))
    grid = [low * (high / low) ** (i / 400) for i in range(401)]
    curves = [region_cost(tokens, dim, topk, regions) for regions in grid]
    x = [axis(regions) for regions in grid]
    marks = [axis(math.prod(r.counts)) for r in rows]
    name, symbol = ("regions per side S", "S") if planar else ("regions R = T' x S x S", "R")
    shape = "x".join(map(str, size))
    measured = [r for r in rows if r.time_ms is not None]
    figure, axes = plt.subplots(1, 2 if measured else 1, figsize=(12 if measured else 6.5, 4.5), squeeze=False)
    ax = axes[0, 0]
    ax.plot(x, [c.routing for c in curves], label="routing 2(S²)²C" if planar else "routing 2R²C")
    ax.plot(x, [c.attention for c in curves], label="token attention 2HW·k·(HW/S²)·C" if planar
            else "token attention 2N·k·(N/R)·C")
    ax.plot(x, [c.routing + c.attention for c in curves], color="black", label="routing + attention")
    ax.scatter(marks, [r.routing_flops + r.attention_flops for r in rows], color="black", zorder=3,
               label="S dividing H and W" if planar else "counts dividing the axes")
    ax.axvline(optimum, color="red", linestyle="--", label=f"{symbol}* = {optimum:.2f}")
    ax.set(xscale="log", yscale="log", xlabel=name, ylabel="multiply-adds",
           title=f"BRA FLOPs (Eq. 9), {shape}, C={dim}, k={topk}")
    ax.legend(fontsize=8)
    if measured:
        ax = axes[0, 1]
        ax.plot([axis(math.prod(r.counts)) for r in measured], [r.time_ms for r in measured], marker="o",
                linestyle="-" if planar else "none")
        ax.axvline(optimum, color="red", linestyle="--", label=f"{symbol}* = {optimum:.2f}")
        ax.set(xscale="log", xlabel=name, ylabel="ms (median)", title="measured: routing + token attention (our op)")
        ax.legend(fontsize=8)
    ticks = sorted(set(marks))
    for ax in axes.flat:  # label the valid counts themselves, not log-axis powers
        ax.set_xticks(ticks, [f"{tick:g}" for tick in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    figure.tight_layout()
    try:
        with atomic_output(path) as temp:
            figure.savefig(temp, format="png", dpi=110)
    finally:
        plt.close(figure)
