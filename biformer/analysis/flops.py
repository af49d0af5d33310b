"""Parameters and FLOPs of a model per stage and per op kind, with torch's FlopCounterMode.

Two counts, each from one forward pass:

* paper convention: multiply-adds (one per multiply-add) of convolutions, linear layers, the
  routing matmul and attention (q.k and attn.v), the ops the paper's table counts. FlopCounterMode
  has no formula for CPU scaled-dot-product attention, so without ours BRA's token attention and
  the last stage's full attention would count as zero.
* complete: floating-point operations (a multiply-add is two), adding what the paper convention
  leaves out: biases, normalisation, activations, softmax and the attention scale, residual adds,
  the region means of routing. Per element: elementwise ops and activations 1 (a transcendental
  counts as one), softmax 4 (subtract max, exp, sum, divide), layer/batch norm in training 7, batch
  norm in eval 3 (subtract, scale, shift), sum 1 per input element.

Ops without arithmetic (views, copies, indexing) and comparisons/selections (top-k, masks) are
not counted in either; `FlopReport.uncounted_ops` names every op that ran without a formula.
BRA layers are forced to the reference backend while counting, so that a fused backend, whose
custom op FlopCounterMode cannot see into, does not hide the attention.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ..ops import BiLevelRoutingAttention, use_backend
from ..progress import progress as progress_bar

aten = torch.ops.aten


def _optional_ops(*names: str) -> list:
    """The aten ops among names that this torch build has."""
    return [getattr(aten, name) for name in names if hasattr(aten, name)]


# Every SDPA variant takes (query, key, value, ...) with shapes (..., L, D).
SDPA_OPS = _optional_ops(
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math",
    "_scaled_dot_product_fused_attention_overrideable", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
)
MATMUL_OPS = (aten.mm, aten.addmm, aten.bmm, aten.baddbmm)
NORM_OPS = _optional_ops("native_layer_norm", "native_batch_norm", "_native_batch_norm_legit",
                         "_native_batch_norm_legit_no_training", "native_group_norm")
# each with its in-place form, which inference runs where it can overwrite a fresh tensor
_ACTIVATIONS = ("gelu", "relu", "silu", "sigmoid", "tanh", "hardswish", "erf", "exp")
_ELEMENTWISE = ("add", "sub", "mul", "div", "neg", "clamp", "pow", "rsqrt", "sqrt", "reciprocal")
ACTIVATION_OPS = _optional_ops(*_ACTIVATIONS, *(name + "_" for name in _ACTIVATIONS))
ELEMENTWISE_OPS = _optional_ops(*_ELEMENTWISE, *(name + "_" for name in _ELEMENTWISE))
# region means of routing pool the map: a sum per input element (the divide is folded in)
REDUCTION_OPS = _optional_ops("sum", "mean", "avg_pool2d")
# ops that move, copy, index or compare values but do no arithmetic
NO_ARITHMETIC_OPS = set(_optional_ops(
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze", "clone",
    "contiguous", "detach", "alias", "slice", "select", "unbind", "split", "split_with_sizes", "cat", "stack",
    "index", "gather", "_to_copy", "copy_", "empty", "zeros", "ones", "full", "arange", "constant_pad_nd",
    "lt", "gt", "le", "ge", "eq", "ne", "bitwise_and", "bitwise_or", "bitwise_not", "logical_not", "masked_fill",
    "where", "topk", "sort", "argmax", "max", "min", "any", "all", "logical_and", "logical_or", "promote_types",
    "zeros_like", "empty_like", "ones_like", "full_like", "new_zeros", "new_empty", "new_ones", "scalar_tensor",
    "fill", "lift_fresh", "repeat", "flip", "roll", "narrow", "as_strided", "index_select", "masked_select",
    "_reshape_alias", "empty_strided", "bitwise_or_", "eye",
))


def _sdpa_macs(query_shape, key_shape, value_shape) -> int:
    *batch, query_len, head_dim = query_shape
    return math.prod(batch) * query_len * key_shape[-2] * (head_dim + value_shape[-1])


def _scores(query_shape, key_shape) -> int:
    return math.prod(query_shape[:-1]) * key_shape[-2]


# FlopCounterMode formulas get tensor arguments as shapes and return FLOPs (2 per multiply-add).
def _sdpa_paper(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _sdpa_macs(query_shape, key_shape, value_shape)


def _sdpa_complete(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _sdpa_macs(query_shape, key_shape, value_shape) + 5 * _scores(query_shape, key_shape)  # scale + softmax


def _matmul_complete(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:  # mm, bmm
    return 2 * math.prod(a_shape) * b_shape[-1]


def _matmul_bias_complete(bias_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:  # addmm, baddbmm
    return 2 * math.prod(a_shape) * b_shape[-1] + math.prod(out_shape)


def _conv_complete(x_shape, w_shape, bias_shape, stride, padding, dilation, transposed, *args, out_shape=None, **kwargs) -> int:
    # each output (input, if transposed) element takes one multiply-add per weight of its group
    macs = math.prod(x_shape if transposed else out_shape) * math.prod(w_shape[1:])
    return 2 * macs + (math.prod(out_shape) if bias_shape is not None else 0)


def _norm_complete(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 7 * math.prod(x_shape)


def _batch_norm_complete(x_shape, weight, bias, mean, var, training=False, *args, out_shape=None, **kwargs) -> int:
    return (7 if training else 3) * math.prod(x_shape)


def _batch_norm_eval_complete(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 3 * math.prod(x_shape)


def _per_output_element(cost: int) -> Callable[..., int]:
    def formula(*args, out_shape=None, **kwargs) -> int:
        if isinstance(out_shape, (tuple, list)) and not out_shape:  # an op with no outputs (an empty split)
            return 0
        shape = out_shape[0] if isinstance(out_shape, (tuple, list)) and isinstance(out_shape[0], torch.Size) else out_shape
        return cost * math.prod(shape)
    return formula


def _per_input_element(x_shape, *args, out_shape=None, **kwargs) -> int:
    return math.prod(x_shape)


PAPER_FORMULAS: dict[Any, Callable[..., int]] = {op: _sdpa_paper for op in SDPA_OPS}
COMPLETE_FORMULAS: dict[Any, Callable[..., int]] = {
    **{op: _sdpa_complete for op in SDPA_OPS},
    aten.mm: _matmul_complete, aten.bmm: _matmul_complete,
    aten.addmm: _matmul_bias_complete, aten.baddbmm: _matmul_bias_complete,
    aten.convolution: _conv_complete,
    **{op: _norm_complete for op in NORM_OPS},
    aten.native_batch_norm: _batch_norm_complete,
    **{op: _batch_norm_eval_complete for op in _optional_ops("_native_batch_norm_legit_no_training")},
    aten._softmax: _per_output_element(4),
    **{op: _per_output_element(1) for op in ACTIVATION_OPS + ELEMENTWISE_OPS},
    **{op: _per_input_element for op in REDUCTION_OPS},
}
PAPER_OPS = {aten.convolution, *MATMUL_OPS, *SDPA_OPS}


def op_kind(module: nn.Module, op) -> str:
    """Which kind of work an op is, given the innermost module that ran it."""
    # a layer's bias add may run as its own op (linear on a non-contiguous input): it is still the layer's work
    if isinstance(module, nn.Linear):
        return "linear"
    if op is aten.convolution or isinstance(module, nn.modules.conv._ConvNd):
        return "convolution"
    if op in MATMUL_OPS:
        return "routing" if isinstance(module, BiLevelRoutingAttention) else "matmul"
    if op in SDPA_OPS:
        return "region attention" if isinstance(module, BiLevelRoutingAttention) else "full attention"
    if op in NORM_OPS:
        return "normalisation"
    if op is aten._softmax:
        return "softmax"
    if op in ACTIVATION_OPS:
        return "activation"
    if op in REDUCTION_OPS:
        return "reduction"
    return "elementwise"


@dataclass
class FlopReport:
    """Counts of one forward pass. paper: multiply-adds; complete: FLOPs (see the module docstring)."""

    input_shape: tuple[int, ...]
    params: dict[str, int]  # per group (stem, stages.i, ...)
    paper: dict[str, dict[str, int]]  # group -> kind -> multiply-adds
    complete: dict[str, dict[str, int]]  # group -> kind -> FLOPs
    uncounted_ops: list[str] = field(default_factory=list)  # ran without a formula, doing arithmetic
    no_arithmetic_ops: list[str] = field(default_factory=list)  # ran without a formula, moving/selecting data

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def total_paper(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.paper.values())

    @property
    def total_complete(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.complete.values())

    def by_kind(self, convention: str) -> dict[str, int]:
        """Totals per op kind, largest first; convention is "paper" or "complete"."""
        if convention not in ("paper", "complete"):
            raise ValueError(f"convention must be 'paper' or 'complete', got {convention!r}")
        totals: dict[str, int] = defaultdict(int)
        for kinds in getattr(self, convention).values():
            for kind, count in kinds.items():
                totals[kind] += count
        return dict(sorted(totals.items(), key=lambda item: -item[1]))


class _OpRecorder(TorchDispatchMode):
    """Records the ops that run (beneath FlopCounterMode, so it sees what the counter sees)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


def _group_of(model: nn.Module, name: str) -> str:
    """'stages.2.blocks.0.attn' -> 'stages.2'; 'stem.0' -> 'stem'; '' (the model itself) -> '(top level)'."""
    if not name:
        return "(top level)"  # ops of the model's own forward, e.g. pooling
    parts = name.split(".")
    container = model.get_submodule(parts[0])
    # a container of composite modules (stages) is split into its items; one of layers (a stem) is not
    splits = isinstance(container, (nn.Sequential, nn.ModuleList)) and any(
        any(True for _ in child.children()) for child in container.children()
    )
    return ".".join(parts[:2]) if splits and len(parts) > 1 else parts[0]


def _count(model: nn.Module, inputs: torch.Tensor, formulas: dict, counted_ops: set | None) -> tuple[dict, set]:
    """group -> kind -> FLOPs (FlopCounterMode's 2-per-multiply-add), and the ops that ran."""
    root = type(model).__name__
    modules = {f"{root}.{name}" if name else root: (name, module) for name, module in model.named_modules()}
    counter = FlopCounterMode(display=False, depth=None, custom_mapping=formulas)
    recorder = _OpRecorder()
    with torch.no_grad(), use_backend(model, "reference"), counter, recorder:
        model(inputs)
    cumulative = counter.get_flop_counts()  # module path -> op -> FLOPs, parents include their children
    result: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for path, ops in cumulative.items():
        if path not in modules:
            continue  # "Global" and the like
        name, module = modules[path]
        children = [f"{path}.{child}" for child, _ in module.named_children()]
        for op, flops in ops.items():
            own = flops - sum(cumulative.get(child, {}).get(op, 0) for child in children)
            if own and (counted_ops is None or op in counted_ops):
                result[_group_of(model, name)][op_kind(module, op)] += own
    return {group: dict(kinds) for group, kinds in result.items()}, recorder.ops


def count_flops(
    model: nn.Module, input_size: tuple[int, int], batch: int = 1, in_chans: int = 3, progress: bool = False
) -> FlopReport:
    """Paper-convention and complete counts of model on a (batch, in_chans, H, W) input, plus parameters."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        inputs = torch.randn(batch, in_chans, *input_size, device=device)
        with progress_bar(total=2, desc="counting FLOPs", unit="pass", enabled=progress) as bar:
            paper, _ = _count(model, inputs, PAPER_FORMULAS, PAPER_OPS)
            bar.update()
            complete, ran = _count(model, inputs, COMPLETE_FORMULAS, None)
            bar.update()
    finally:
        model.train(was_training)
    params: dict[str, int] = defaultdict(int)
    for name, parameter in model.named_parameters():
        params[_group_of(model, name.rsplit(".", 1)[0] if "." in name else "")] += parameter.numel()
    without_formula = {op for op in ran if op not in COMPLETE_FORMULAS}
    return FlopReport(
        input_shape=tuple(inputs.shape),
        params=dict(params),
        paper={g: {k: v // 2 for k, v in kinds.items()} for g, kinds in paper.items()},
        complete=complete,
        uncounted_ops=sorted(str(op) for op in without_formula - NO_ARITHMETIC_OPS),
        no_arithmetic_ops=sorted(str(op) for op in without_formula & NO_ARITHMETIC_OPS),
    )


def total_multiply_adds(model: nn.Module, input_size: tuple[int, int], batch: int = 1, in_chans: int = 3) -> int:
    """The paper convention's multiply-adds of one forward, for the whole model only: FlopCounterMode's global
    count, right also for models that `count_flops`' split by module misreads (a forward that bypasses its
    containers, or one module instance at many places, as ultralytics' models have)."""
    was_training = model.training
    model.eval()
    try:
        inputs = torch.randn(batch, in_chans, *input_size, device=next(model.parameters()).device)
        counter = FlopCounterMode(display=False, custom_mapping=PAPER_FORMULAS)
        with torch.no_grad(), use_backend(model, "reference"), counter:
            model(inputs)
    finally:
        model.train(was_training)
    return sum(flops for op, flops in counter.get_flop_counts()["Global"].items() if op in PAPER_OPS) // 2


def si(value: float) -> str:
    """13142760 -> '13.1M'."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def format_report(report: FlopReport, name: str) -> str:
    size = "x".join(map(str, report.input_shape[2:]))
    groups = sorted(set(report.params) | set(report.paper) | set(report.complete), key=_group_order)
    lines = [
        f"{name} at {size} (batch {report.input_shape[0]}): {si(report.total_params)} parameters, "
        f"{si(report.total_paper)} FLOPs (paper convention: multiply-adds), {si(report.total_complete)} FLOPs complete",
        "",
        f"{'part':<12} {'params':>9} {'paper':>9} {'complete':>9}",
    ]
    for group in groups:
        lines.append(f"{group:<12} {si(report.params.get(group, 0)):>9} "
                     f"{si(sum(report.paper.get(group, {}).values())):>9} "
                     f"{si(sum(report.complete.get(group, {}).values())):>9}")
    lines += ["", f"{'op kind':<17} {'paper':>9} {'complete':>9}"]
    paper_kinds = report.by_kind("paper")
    for kind, flops in report.by_kind("complete").items():
        paper_value = si(paper_kinds[kind]) if kind in paper_kinds else "-"
        lines.append(f"{kind:<17} {paper_value:>9} {si(flops):>9}")
    lines += [
        "",
        "paper convention: one per multiply-add of convolutions, linear layers, routing matmul and attention.",
        "complete: every multiply and add (a multiply-add is 2), plus biases, norms, activations, softmax, "
        "residual adds and region means.",
        "not counted (no arithmetic: data movement, indexing, comparison, selection): "
        + (", ".join(report.no_arithmetic_ops) or "none"),
        "not counted (arithmetic without a formula): " + (", ".join(report.uncounted_ops) or "none"),
    ]
    return "\n".join(lines)


def _group_order(group: str) -> tuple:
    order = {"stem": 0, "stages": 1, "norm": 2, "(top level)": 3, "head": 4}
    head, _, index = group.partition(".")
    return (order.get(head, 1), head, int(index) if index.isdigit() else 0)
