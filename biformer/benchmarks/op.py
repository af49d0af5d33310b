"""`biformer bench op`: every BRA backend against the original release's algorithm, interleaved, on BiFormer's
stage shapes or given ones (also 1-D sequences and 3-D clips or volumes)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..measure import interleaved_median_seconds, megabytes, peak_memory_bytes
from ..ops import bi_level_routing_attention
from ..ops.backends import BackendUnsupported, select_backend
from ..ops.backends.inputs import RoutedAttentionInputs
from ..ops.functional import region_grid
from ..ops.regions import RegionGrid

BASELINE = "original"  # the original release's gather algorithm (biformer.ops.backends.original)
REFERENCE = "reference"  # the specification: max_abs_err is measured against it
AUTO = "auto"  # automatic dispatch; the note says what it picked


@dataclass(frozen=True)
class OpShape:
    """One BRA layer's input: a (batch, *sizes, dim) map of 1, 2 or 3 spatial axes, heads, regions per axis (one
    value, or one per axis), topk."""

    name: str
    batch: int
    sizes: tuple[int, ...]
    dim: int
    heads: int
    n_win: int | tuple[int, ...]
    topk: int

    @classmethod
    def parse(cls, text: str, batch: int) -> "OpShape":
        """'[NAME=]SIZES...,DIM,HEADS,N_WIN,TOPK' with 1-3 sizes (L; H,W; or T,H,W) and N_WIN an int or one per
        axis joined by x (e.g. 16,112,112,64,2,2x7x7,8); ValueError naming the expected form."""
        name, _, spec = text.rpartition("=")
        form = "[NAME=]SIZES,DIM,HEADS,N_WIN,TOPK: 1 to 3 sizes, then three integers and N_WIN (an int or AxBxC)"
        parts = spec.split(",")
        try:
            *sizes, dim, heads, n_win_text, topk = parts
            sizes, dim, heads, topk = tuple(int(part) for part in sizes), int(dim), int(heads), int(topk)
            n_win = tuple(int(part) for part in n_win_text.split("x"))
        except ValueError:
            raise ValueError(f"shape {text!r} is not {form}") from None
        if not 1 <= len(sizes) <= 3 or len(n_win) not in (1, len(sizes)):
            raise ValueError(f"shape {text!r} is not {form}, with N_WIN one int or one per size")
        if min(*sizes, dim, heads, *n_win, topk) < 1 or dim % heads:
            raise ValueError(f"shape {text!r}: sizes must be positive and HEADS must divide DIM")
        shape = cls(name or spec, batch, sizes, dim, heads, n_win[0] if len(n_win) == 1 else n_win, topk)
        try:
            regions = shape.grid().num_regions
        except ValueError as error:
            raise ValueError(f"shape {text!r}: {error}") from None
        if topk > regions:
            raise ValueError(f"shape {text!r}: TOPK {topk} exceeds the {regions} regions")
        return shape

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def grid(self) -> RegionGrid:
        return region_grid(self.sizes, self.n_win)

    def attention_flops(self) -> int:
        """FLOPs (2 per multiply-add) of the token attention's forward: q.k and p.v, each query
        against the topk*T keys of its routed regions, T the tokens of a (ceil-sized) region."""
        keys = self.topk * self.grid().tokens_per_region
        return 2 * self.batch * math.prod(self.sizes) * keys * 2 * self.dim


def stage_shapes(batch: int = 8) -> list[OpShape]:
    """BiFormer-T/S (same widths, different depths) BRA stages at 224x224 input; stage 4 is full attention."""
    return [
        OpShape("T/S stage1", batch, (56, 56), 64, 2, 7, 1),
        OpShape("T/S stage2", batch, (28, 28), 128, 4, 7, 4),
        OpShape("T/S stage3", batch, (14, 14), 256, 8, 7, 16),
    ]


COLUMNS = (
    "shape", "backend", "fwd_ms", "orig_fwd_ms", "fwd_speedup", "fwd_bwd_ms", "orig_fwd_bwd_ms", "fwd_bwd_speedup",
    "fwd_tflop_s", "fwd_bwd_tflop_s", "peak_mb", "orig_peak_mb", "peak_per_io", "max_abs_err", "note",
)
# a backward does 2.5x the forward's matmul work (dV, dP, dQ, dK and the recomputed scores): the
# usual flash-attention convention for achieved throughput
BACKWARD_FLOP_FACTOR = 2.5


def bench_op(
    shapes: list[OpShape],
    backends: list[str],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    padding: str = "masked",
    repeats: int = 10,
    warmup: int = 2,
    memory: bool = True,
    baseline: bool = True,
) -> list[dict[str, Any]]:
    """One row per (shape, backend other than the original), each beside the original algorithm, same run.

    Times are medians of interleaved rounds of the whole op (routing included); the forward runs
    without autograd, forward+backward from a leaf qkv tensor, as in a layer. peak_mb is the
    memory allocated during forward+backward on top of the inputs; peak_per_io is the whole
    footprint (that peak plus qkv and the output gradient) over the bytes of q, k, v, output and
    their gradients. max_abs_err compares output and q/k/v gradients with the reference.
    fwd_tflop_s / fwd_bwd_tflop_s: the token attention's FLOPs (`OpShape.attention_flops`) over
    the measured time, which includes routing: the op's achieved rate. baseline=False leaves the
    original out (its orig_* columns empty), for maps where its gather does not fit in memory.
    A backend that runs only without autograd here (flex on CPU) gets a forward row: its fwd_bwd_*
    and memory columns stay empty, max_abs_err compares the output only, and the note says why.
    """
    candidates = list(dict.fromkeys([BASELINE] * baseline + backends))
    return [row for shape in shapes
            for row in _bench_shape(shape, candidates, device, dtype, padding, repeats, warmup, memory)]


def _runnable(
    shape: OpShape, candidates: list[str], qkv: torch.Tensor, padding: str
) -> tuple[list[str], list[str], dict[str, str]]:
    """The candidates that can run this shape's forward, those of them that can also run it with
    autograd, and a note for each that cannot (or runs the forward only, or what auto picked)."""
    grid = shape.grid()

    def select(name: str, qkv: torch.Tensor) -> str:
        q, k, v = qkv.unbind(-3)
        return select_backend(None if name == AUTO else name,
                              RoutedAttentionInputs.of(q, k, v, grid, shape.topk, padding == "masked")).name

    runnable, trainable, notes = [], [], {}
    for name in candidates:
        try:
            chosen = select(name, qkv.detach())
        except BackendUnsupported as error:
            notes[name] = f"skipped: {'; '.join(error.reasons)}"
            continue
        runnable.append(name)
        try:
            chosen_with_grad = select(name, qkv)
        except BackendUnsupported as error:
            notes[name] = f"forward only: {'; '.join(error.reasons)}"
            continue
        trainable.append(name)
        if name == AUTO:
            with_grad = "" if chosen_with_grad == chosen else f", {chosen_with_grad} with autograd"
            notes[name] = f"picked {chosen}{with_grad}"
    return runnable, trainable, notes


def _bench_shape(shape: OpShape, candidates: list[str], device: torch.device, dtype: torch.dtype, padding: str,
                 repeats: int, warmup: int, memory: bool) -> list[dict[str, Any]]:
    rows = []
    generator = torch.Generator(device).manual_seed(0)
    qkv = torch.randn(shape.batch, *shape.sizes, 3, shape.heads, shape.head_dim,
                      generator=generator, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(qkv.shape[:-3] + qkv.shape[-2:], generator=generator, device=device, dtype=dtype)
    scale = shape.dim**-0.5  # BiFormer's layers scale by the full width

    def op(backend: str) -> torch.Tensor:
        q, k, v = qkv.unbind(-3)
        return bi_level_routing_attention(q, k, v, shape.n_win, shape.topk, scale=scale, padding=padding,
                                          backend=None if backend == AUTO else backend)

    def forward(backend: str) -> None:
        with torch.no_grad():
            op(backend)

    def forward_backward(backend: str) -> list[torch.Tensor]:
        qkv.grad = None
        out = op(backend)
        out.backward(grad_out)
        return [out.detach(), qkv.grad]

    runnable, trainable, notes = _runnable(shape, candidates, qkv, padding)
    reference_outputs = forward_backward(REFERENCE)

    def error(name: str) -> float:
        if name in trainable:
            outputs = forward_backward(name)
        else:
            with torch.no_grad():
                outputs = [op(name)]
        return max((a.float() - b.float()).abs().max().item() for a, b in zip(outputs, reference_outputs))

    errors = {name: error(name) for name in runnable}
    forward_s = interleaved_median_seconds({n: (lambda n=n: forward(n)) for n in runnable}, device, repeats, warmup,
                                           desc=f"{shape.name} forward")
    train_s = interleaved_median_seconds({n: (lambda n=n: forward_backward(n)) for n in trainable}, device,
                                         repeats, warmup, desc=f"{shape.name} forward+backward")
    peaks = {n: peak_memory_bytes(lambda n=n: forward_backward(n), device) if memory and n in trainable else None
             for n in runnable}
    qkv.grad = None
    inputs_bytes = (qkv.numel() + grad_out.numel()) * qkv.element_size()  # q, k, v and the output gradient
    io_bytes = 2 * inputs_bytes  # q, k, v, out and their gradients
    base = BASELINE if BASELINE in trainable else None
    for name in [n for n in runnable if n != BASELINE]:
        train = train_s.get(name)
        rows.append(dict(
            shape=shape.name, backend=name,
            fwd_ms=1e3 * forward_s[name], orig_fwd_ms=base and 1e3 * forward_s[base],
            fwd_speedup=base and forward_s[base] / forward_s[name],
            fwd_bwd_ms=train and 1e3 * train, orig_fwd_bwd_ms=base and 1e3 * train_s[base],
            fwd_bwd_speedup=base and train and train_s[base] / train,
            fwd_tflop_s=shape.attention_flops() / forward_s[name] / 1e12,
            fwd_bwd_tflop_s=train and (1 + BACKWARD_FLOP_FACTOR) * shape.attention_flops() / train / 1e12,
            peak_mb=megabytes(peaks[name]), orig_peak_mb=base and megabytes(peaks[base]),
            peak_per_io=None if peaks[name] is None else (peaks[name] + inputs_bytes) / io_bytes,
            max_abs_err=errors[name], note=notes.get(name),
        ))
    rows += [dict(shape=shape.name, backend=n, note=note) for n, note in notes.items() if n not in runnable]
    return rows
