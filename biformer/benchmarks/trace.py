"""`biformer bench trace`: the CUDA work of a model, counted on a machine without a GPU.

The model runs on fake CUDA tensors (torch's FakeTensorMode: shapes, dtypes and devices, no data), under the
autocast a GPU run would use, and a dispatch mode below autograd sees every ATen op. Rules:

- launch: every op but views, aliases and allocations; an op that is only a composition of others
  (CompositeImplicitAutograd) counts as the ops it runs. Our Triton custom ops count as their kernels
  (`CUSTOM_OP_LAUNCHES`). SDPA runs the fused kernel a Hopper GPU would pick (the fake device would take its
  unfused math path; `fused_sdpa=False` counts that instead). foreach ops count one launch each (CUDA splits
  long lists); cat and stack as ATen's CUDA cat: one launch per 128 inputs (64 if some is not contiguous) where
  the output has at most 4 dimensions and the inputs its dtype, else one per input.
- bytes: the distinct tensors a launch reads and writes (inputs and outputs), each once.
- FLOPs: torch.utils.flop_counter's formulas (2 per multiply-add), but a convolution's backward counted with
  its groups (torch's formula ignores them); the Triton kernels' from their geometry.
- host syncs: ops that read a value back to the host (`SYNC_OPS`; bincount reads its min and max) and copies
  from CUDA to the CPU.
- category: a dtype-changing copy is a "cast"; else BRA's routing ("routing") or token attention ("attention")
  where those functions are on the stack; else the class of the innermost module running. A backward op takes
  the category of the forward op that made its autograd node.

A training step is forward, cross-entropy, backward and an SGD step (momentum, foreach), traced after one
untraced step so that the optimizer state exists. torch's autograd engine needs a CUDA driver for CUDA tensors,
fake ones too, so the backward runs here by walking the autograd graph as the engine would: gradients summed
per input, broadcasts reduced and dtypes cast to what the forward saw, and a leaf's first gradient taken as its
.grad without a copy. One difference: a Python autograd Function's missing output gradients reach its backward
as None, where the engine would fill them with zeros unless the Function turned that off (its setting cannot be
read back); ours turn it off or have one output.
"""
from __future__ import annotations

import contextlib
import math
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Iterator
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from ..ops import BiLevelRoutingAttention, use_backend
from ..ops.backends import BACKENDS

MODES = ("infer", "train")
DEFAULT_MODELS = ("biformer_small", "swin_tiny_patch4_window7_224")
COLUMNS = ("model", "mode", "launches", "gbytes", "gflops", "host_syncs", "casts", "routing_launches",
           "routing_per_layer", "bra_layers")

# kernels per call of our Triton custom ops: the forward, and the backward's dq and dk/dv kernels
CUSTOM_OP_LAUNCHES = {
    "biformer::triton_routed_attention": 1,
    "biformer::triton_routed_attention_backward": 2,
    "biformer::triton_region_attention": 1,
    "biformer::triton_region_attention_backward": 2,
    "biformer::triton_region_route": 1,
    "biformer::triton_region_inverse_routing": 1,
}
# ops that make the host wait for the device, with how many times per call
SYNC_OPS = {
    "aten::_local_scalar_dense": 1, "aten::nonzero": 1, "aten::bincount": 2, "aten::_unique2": 1,
    "aten::unique_dim": 1, "aten::unique_consecutive": 1, "aten::masked_select": 1, "aten::repeat_interleave": 1,
    "aten::equal": 1, "aten::is_nonzero": 1,
}
# ops that launch nothing: views whose schema does not say so, and allocations
NO_LAUNCH = {
    "aten::_unsafe_view", "aten::detach", "aten::alias", "aten::empty", "aten::empty_strided", "aten::new_empty",
    "aten::new_empty_strided", "aten::empty_like", "aten::empty_permuted", "aten::lift_fresh", "prim::device",
    "aten::set_",
}
CAT_INPUTS_PER_LAUNCH = 128  # CAT_ARRAY_BATCH_SIZE of ATen's CUDA cat (half for strided inputs)
CAT_MAX_DIMS = 4  # CAT_ARRAY_MAX_INPUT_DIMS: beyond, one copy per input
_CATS = ("aten::cat", "aten::stack")
_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd
_HALF = (torch.float16, torch.bfloat16)


@dataclass
class Tally:
    launches: int = 0
    bytes: int = 0
    flops: int = 0
    syncs: int = 0


@dataclass
class Trace:
    """What one traced call ran: totals and tallies per category and per op."""

    categories: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))
    ops: Counter = field(default_factory=Counter)

    def total(self) -> Tally:
        tallies = self.categories.values()
        return Tally(*(sum(getattr(t, name) for t in tallies) for name in ("launches", "bytes", "flops", "syncs")))


def _tensors(tree: Any) -> list[Tensor]:
    return list({id(t): t for t in tree_leaves(tree) if isinstance(t, Tensor)}.values())


def _nbytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _triton_attention_flops(q: Tensor, v: Tensor, indices: Tensor, region_h: int, region_w: int) -> int:
    """2 products (scores, weighted values) of every query token with topk x region keys, per head."""
    batch, height, width, heads, dim = q.shape
    keys = indices.shape[-1] * region_h * region_w
    return 2 * batch * height * width * heads * keys * (dim + v.shape[-1])


def _fused_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """scaled_dot_product_attention as the fused kernel a Hopper GPU takes (the fake device would take the
    unfused math path): flash attention in half precision without a mask, else memory-efficient attention.
    Under autocast the inputs are cast first, as autocast does for SDPA (the private kernels are not on its lists)."""
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        query, key, value = (t.to(dtype) for t in (query, key, value))
    if query.dtype in _HALF and attn_mask is None and query.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                   scale=scale)[0]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attn_mask, float("-inf"))
    if attn_mask is not None:
        attn_mask = attn_mask.expand(*query.shape[:-1], key.shape[-2])
    needs_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))  # for its backward
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, needs_lse, dropout_p, is_causal, scale=scale)[0]


def _cat_launches(inputs: list[Tensor], out: Tensor) -> int:
    if out.dim() > CAT_MAX_DIMS or any(t.dtype != out.dtype for t in inputs):
        return len(inputs)
    per_launch = CAT_INPUTS_PER_LAUNCH if all(t.is_contiguous() for t in inputs) else CAT_INPUTS_PER_LAUNCH // 2
    return math.ceil(len(inputs) / per_launch)


def _is_dtype_cast(name: str, args: tuple, out: Any) -> bool:
    if name == "aten::_to_copy":
        return out.dtype != args[0].dtype
    return name == "aten::copy_" and args[0].dtype != args[1].dtype


def _is_device_to_host(name: str, args: tuple, out: Any) -> bool:
    if name == "aten::_to_copy":
        return args[0].device.type == "cuda" and isinstance(out, Tensor) and out.device.type == "cpu"
    if name == "aten::copy_":
        return args[1].device.type == "cuda" and args[0].device.type == "cpu"
    return False


class _Categories:
    """The category of the code running now (see the module docstring), read off the Python stack."""

    def __init__(self) -> None:
        self.backward_node_category: str | None = None  # set while the graph walk runs a node

    def current(self) -> str:
        if self.backward_node_category is not None:
            return self.backward_node_category
        frame = sys._getframe(1)
        module_name = None
        while frame is not None:
            code = frame.f_code
            path = code.co_filename.replace("\\", "/")
            if code.co_name == "route" and "/ops/" in path:
                return "routing"
            if code.co_name == "attend" and "/ops/backends/" in path:
                return "attention"
            if module_name is None and code.co_name == "forward":
                owner = frame.f_locals.get("self")
                if isinstance(owner, nn.Module):
                    module_name = type(owner).__name__
            frame = frame.f_back
        return module_name or "other"


class _FunctionLevel(TorchFunctionMode):
    """Above autograd: SDPA as its fused CUDA kernel (if `fused_sdpa`), and the category each forward call's
    autograd node belongs to, for the backward."""

    def __init__(self, categories: _Categories, fused_sdpa: bool) -> None:
        super().__init__()
        self.categories, self.fused_sdpa = categories, fused_sdpa
        self.of_node: dict[Any, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention and self.fused_sdpa:
            func = _fused_sdpa
        out = func(*args, **(kwargs or {}))
        for t in _tensors(out):
            if t.grad_fn is not None and t.grad_fn not in self.of_node:
                self.of_node[t.grad_fn] = self.categories.current()
        return out


class _Counter(TorchDispatchMode):
    def __init__(self, trace: Trace, categories: _Categories) -> None:
        super().__init__()
        self.trace, self.categories = trace, categories

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in SYNC_OPS and not (name == "aten::repeat_interleave" and kwargs.get("output_size") is not None):
            return self._sync(func, name, args, kwargs)
        if func.namespace == "aten" and torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _COMPOSITE):
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if func.is_view or name in NO_LAUNCH or func.namespace == "profiler":
            return out
        tally = self.trace.categories[self._category(name, args, out)]
        tally.launches += _cat_launches(args[0], out) if name in _CATS else CUSTOM_OP_LAUNCHES.get(name, 1)
        tally.bytes += _nbytes(_tensors((args, kwargs, out)))
        tally.syncs += _is_device_to_host(name, args, out)
        tally.flops += self._flops(func, name, args, kwargs, out)
        self.trace.ops[name] += 1
        return out

    def _category(self, name: str, args: tuple, out: Any) -> str:
        return "cast" if _is_dtype_cast(name, args, out) else self.categories.current()

    @staticmethod
    def _flops(func, name: str, args: tuple, kwargs: dict, out: Any) -> int:
        if name in ("biformer::triton_routed_attention", "biformer::triton_region_attention"):
            # q, k, v, indices, cols, region_h, region_w, ...
            return _triton_attention_flops(args[0], args[2], args[3], args[5], args[6])
        # backward: the products it needs, dP, dV, dQ and dK, twice the forward (torch's convention for SDPA's
        # backward, so that models compare alike); the kernels also recompute the scores, once per kernel
        if name in ("biformer::triton_routed_attention_backward", "biformer::triton_region_attention_backward"):
            # grad_out, q, k, v, (out or lse), (lse or delta), indices, routed_by, start, cols, region_h, region_w
            return 2 * _triton_attention_flops(args[1], args[3], args[6], args[10], args[11])
        if name == "biformer::triton_region_route":  # region sums of q and k, then the affinity products
            q, rows, cols = args[0], args[2], args[3]
            return 2 * q.numel() + 2 * q.shape[0] * (rows * cols) ** 2 * q.shape[3] * q.shape[4]
        if name == "aten::convolution_backward" and not args[7]:  # torch's formula ignores groups
            grad_out, weight, output_mask = args[0], args[2], args[10]
            per_product = 2 * grad_out.numel() * math.prod(weight.shape[1:])
            return per_product * (int(output_mask[0]) + int(output_mask[1]))
        formula = flop_registry.get(func.overloadpacket)
        return int(formula(*args, **kwargs, out_val=out)) if formula else 0

    def _sync(self, func, name: str, args: tuple, kwargs: dict):
        tally = self.trace.categories[self.categories.current()]
        tally.syncs += SYNC_OPS[name]
        tally.launches += 1
        self.trace.ops[name] += 1
        try:
            return func(*args, **kwargs)
        except Exception:  # fake tensors cannot know a data-dependent size: stand in for the value
            if name == "aten::bincount":
                minlength = kwargs.get("minlength", args[2] if len(args) > 2 else 0)
                return torch.zeros(minlength, dtype=torch.long, device=args[0].device)
            if name == "aten::_local_scalar_dense":
                return 0
            raise


def _run_backward(loss: Tensor, categories: _Categories, node_categories: dict[Any, str]) -> None:
    """loss.backward() without torch's engine (see the module docstring), in dependency order."""
    dependencies, seen, stack = Counter(), {loss.grad_fn}, [loss.grad_fn]
    while stack:
        for successor, _ in stack.pop().next_functions:
            if successor is None:
                continue
            dependencies[successor] += 1
            if successor not in seen:
                seen.add(successor)
                stack.append(successor)
    inputs: dict[Any, dict[int, Tensor]] = {loss.grad_fn: {0: torch.ones_like(loss)}}
    inherited = {loss.grad_fn: "loss"}
    ready = [loss.grad_fn]
    while ready:
        node = ready.pop()
        category = node_categories.get(node, inherited.get(node, "other"))
        categories.backward_node_category = category
        received = inputs.pop(node, {})
        grads = tuple(received.get(i) for i in range(len(node._input_metadata)))
        if type(node).__name__ == "AccumulateGrad":
            _accumulate(node.variable, grads[0])
            outputs = ()
        else:
            outputs = node.apply(*grads) if hasattr(node, "_forward_cls") else node(*grads)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        for (successor, position), grad in zip(node.next_functions, outputs):
            if successor is None:
                continue
            inherited.setdefault(successor, category)
            if grad is not None:
                metadata = successor._input_metadata[position]
                if tuple(grad.shape) != tuple(metadata.shape):
                    grad = grad.sum_to_size(metadata.shape)
                if grad.dtype != metadata.dtype:
                    grad = grad.to(metadata.dtype)
                slot = inputs.setdefault(successor, {})
                slot[position] = grad if position not in slot else slot[position] + grad
            dependencies[successor] -= 1
            if dependencies[successor] == 0:
                ready.append(successor)
    categories.backward_node_category = None


def _accumulate(leaf: Tensor, grad: Tensor | None) -> None:
    if grad is None:
        return
    leaf.grad = grad.detach() if leaf.grad is None else leaf.grad + grad


def _to_fake_cuda(model: nn.Module) -> None:
    """Every parameter and buffer replaced by an uninitialised fake CUDA tensor (call inside the fake mode)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cuda"),
                                                        p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device="cuda")


@contextlib.contextmanager
def _as_on_a_gpu() -> Iterator[None]:
    """What code asks of the machine answered as a CUDA machine would: the Triton backends available."""
    available = {name: replace(BACKENDS[name], unavailable=None) for name in ("triton", "triton_region")}
    with mock.patch.dict(BACKENDS, available):
        yield


def _autocast(dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """CUDA autocast made without a CUDA device (torch.autocast checks for one when it is made)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    with mock.patch("torch.cuda.is_available", lambda: True), \
            mock.patch("torch.cuda.is_bf16_supported", lambda *args, **kwargs: True):
        return torch.autocast("cuda", dtype=dtype)


def trace_model(model: nn.Module, mode: str, batch: int, img_size: int = 224, dtype: torch.dtype = torch.bfloat16,
                backend: str | None = None, fused_sdpa: bool = True, frames: int | None = None) -> Trace:
    """The CUDA work of one inference forward (mode "infer") or training step ("train") of `model` on images, or
    on clips of `frames` frames (B, 3, T, H, W).

    The model's parameters are replaced by fake CUDA tensors: pass a model built for this."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    trace, categories = Trace(), _Categories()
    autocast = _autocast(dtype)
    with FakeTensorMode(), _as_on_a_gpu(), use_backend(model, backend):
        _to_fake_cuda(model)
        images = torch.empty(batch, 3, *(() if frames is None else (frames,)), img_size, img_size, device="cuda")
        if mode == "infer":
            model.eval()
            with torch.inference_mode(), autocast, _FunctionLevel(categories, fused_sdpa), _Counter(trace, categories):
                model(images)
            return trace
        labels = torch.zeros(batch, dtype=torch.long, device="cuda")  # class 0: valid for any head
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, foreach=True)
        model.train()
        for traced in (False, True):  # the first step makes the momentum buffers
            nodes = _FunctionLevel(categories, fused_sdpa)
            with _Counter(trace if traced else Trace(), categories):  # it also stands in for data-dependent sizes
                with nodes, autocast:
                    logits = model(images)
                    loss = F.cross_entropy(logits, labels)
                _run_backward(loss, categories, nodes.of_node)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return trace


def bra_layers(model: nn.Module) -> int:
    return sum(isinstance(module, BiLevelRoutingAttention) for module in model.modules())


def summary_row(label: str, mode: str, trace: Trace, bra_layers: int) -> dict[str, Any]:
    total, routing = trace.total(), trace.categories.get("routing", Tally())
    return {
        "model": label, "mode": mode, "launches": total.launches, "gbytes": round(total.bytes / 1e9, 2),
        "gflops": round(total.flops / 1e9, 1), "host_syncs": total.syncs,
        "casts": trace.categories.get("cast", Tally()).launches, "routing_launches": routing.launches,
        "routing_per_layer": round(routing.launches / bra_layers, 2) if bra_layers else None,
        "bra_layers": bra_layers,
    }


def as_json(trace: Trace) -> dict[str, Any]:
    total = trace.total()
    return {
        "total": vars(total),
        "categories": {name: vars(tally) for name, tally in sorted(trace.categories.items())},
        "ops": dict(trace.ops.most_common()),
    }
