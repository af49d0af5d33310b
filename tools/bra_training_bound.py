"""How fast would BRA have to be for biformer_small to train as fast as swin_tiny on this machine?

One interleaved run (median of rounds) of three training steps (forward, cross-entropy, backward,
SGD step): biformer_small as it is, biformer_small with every BRA layer's routing and attention
replaced by a free identity (out = v: what the rest of the model costs), and swin_tiny. The gap
between swin_tiny and the free-BRA model is the time BRA may take per step. Beside it: the
attention FLOPs BRA does per step and the rate they would need, against what ATen reaches on the
same attention shapes with the data already gathered into contiguous (region, head, token, dim)
tensors (SDPA forward+backward, no routing, no gather) and on one large float32 matmul.

    python tools/bra_training_bound.py --threads 2 --batch 8 --rounds 5
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import timm
import torch
import torch.nn.functional as F

import biformer  # noqa: F401  (registers the models)
import biformer.ops.module as bra_module
from biformer.measure import interleaved_median_seconds
from biformer.ops import BiLevelRoutingAttention


@contextlib.contextmanager
def free_bra() -> Iterator[None]:
    """Every BiLevelRoutingAttention layer skips routing and attention: its output is v."""
    real = bra_module.bi_level_routing_attention
    bra_module.bi_level_routing_attention = lambda q, k, v, *args, **kwargs: v
    try:
        yield
    finally:
        bra_module.bi_level_routing_attention = real


def attention_shapes(model: torch.nn.Module, images: torch.Tensor) -> list[tuple[int, int, int, int, int]]:
    """(query regions, heads, tokens per region, routed keys, head dim) of each BRA layer's attention."""
    shapes = []

    def record(layer: BiLevelRoutingAttention, args: tuple) -> None:
        batch, height, width, _ = args[0].shape  # the model's BRA layers are channels-last
        rows, cols = min(layer.n_win[0], height), min(layer.n_win[1], width)
        tokens = -(-height // rows) * -(-width // cols)
        keys = min(layer.topk, rows * cols) * tokens
        shapes.append((batch * rows * cols, layer.num_heads, tokens, keys, layer.dim // layer.num_heads))

    layers = [m for m in model.modules() if isinstance(m, BiLevelRoutingAttention)]
    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return shapes


def median_ms(fn: Callable[[], object], repeats: int = 7) -> float:
    return interleaved_median_seconds({"run": fn}, torch.device("cpu"), repeats, warmup=1)["run"] * 1e3


def attention_flop(shape: tuple[int, int, int, int, int]) -> float:
    """Forward QK^T and PV plus a backward of four matmuls of the same size, 2 flops per multiply-add."""
    regions, heads, tokens, keys, dim = shape
    return 6 * 2 * regions * heads * tokens * keys * dim


def sdpa_ms(shape: tuple[int, int, int, int, int]) -> float:
    """ATen SDPA forward+backward of one layer's attention on pre-gathered contiguous tensors."""
    regions, heads, tokens, keys, dim = shape
    q = torch.randn(regions, heads, tokens, dim, requires_grad=True)
    k, v = (torch.randn(regions, heads, keys, dim, requires_grad=True) for _ in range(2))
    grad = torch.randn(regions, heads, tokens, dim)
    return median_ms(lambda: F.scaled_dot_product_attention(q, k, v).backward(grad))


def matmul_gflop_s(size: int = 2048) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / median_ms(lambda: a @ b) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, labels = torch.randn(args.batch, 3, 224, 224), torch.randint(0, 1000, (args.batch,))
    models = {name: timm.create_model(name).train() for name in ("biformer_small", "swin_tiny_patch4_window7_224")}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for name, m in models.items()}

    def step(name: str) -> None:
        F.cross_entropy(models[name](images), labels).backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    variants = {
        "biformer_small": ("biformer_small", contextlib.nullcontext),
        "biformer_small, BRA free": ("biformer_small", free_bra),
        "swin_tiny": ("swin_tiny_patch4_window7_224", contextlib.nullcontext),
    }
    times: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(args.rounds):
        for label, (name, context) in variants.items():
            with context():
                step(name)  # warm: the first step after another model allocates afresh
                start = time.perf_counter()
                step(name)
                times[label].append(time.perf_counter() - start)
    step_ms = {label: statistics.median(t) * 1e3 for label, t in times.items()}
    for label, ms in step_ms.items():
        print(f"{label:26s} {ms:7.0f} ms/step  {args.batch / ms * 1e3:6.2f} img/s")

    shapes = attention_shapes(models["biformer_small"], images)
    gflop = sum(map(attention_flop, shapes)) / 1e9
    budget = step_ms["swin_tiny"] - step_ms["biformer_small, BRA free"]
    print(f"BRA now: {step_ms['biformer_small'] - step_ms['biformer_small, BRA free']:.0f} ms/step; "
          f"budget to train as fast as swin_tiny: {budget:.0f} ms/step")
    if budget > 0:
        print(f"BRA attention: {gflop:.1f} GFLOP/step: {gflop / budget * 1e3:.0f} GFLOP/s needed to fit the budget")
    print("ATen SDPA on the same attention, pre-gathered (regions, heads, tokens, keys, head dim):")
    total = 0.0
    for shape in sorted(set(shapes), key=shapes.index):
        ms, layers = sdpa_ms(shape), shapes.count(shape)
        total += ms * layers
        print(f"  {str(shape):26s} x{layers:2d} layers: {ms:6.2f} ms/layer  {attention_flop(shape) / ms / 1e6:5.0f} GFLOP/s")
    print(f"  total {total:.0f} ms/step; one {2048}^3 float32 matmul: {matmul_gflop_s():.0f} GFLOP/s")

if __name__ == "__main__":
    main()
