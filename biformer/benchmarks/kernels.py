"""`biformer bench kernels`: the Triton attention kernels judged without a GPU.

For each Triton backend and BiFormer-S stage (224 px), and each of its kernels (triton_region's routing and inverse
routing too): the useful share of the forward's computed score
entries (from the backend's tiling: valid entries, each query token with each token of its routed regions,
over the entries its tiles compute), and the registers and spills of every kernel compiled offline for a
Hopper GPU (sm_90, Triton's own ptxas; nothing runs). The compile sees plain pointer and stride arguments,
without the divisible-by-16 specialisation the runtime adds where they allow it, so its figures are those of the
unspecialised kernel.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from ..ops.backends import triton_attention, triton_region
from ..ops.functional import region_grid

BACKENDS = ("triton", "triton_region")
COLUMNS = ("backend", "stage", "kernel", "dtype", "useful_fraction", "registers", "spill_bytes", "shared_bytes")
SM90 = 90
# BiFormer-S at 224 px: map side, heads, head dim, n_win, topk of its three BRA stages
STAGES = {"stage1": (56, 2, 32, 7, 1), "stage2": (28, 4, 32, 7, 4), "stage3": (14, 8, 32, 7, 16)}
_POINTER_DTYPES = {"LSE": "fp32", "DELTA": "fp32", "LOGITS": "fp32", "IDX": "i64",
                   "INDICES": "i64", "ROUTED_BY": "i64", "ROUTED_BY_START": "i64", "START": "i64"}
_INT_ARGUMENTS = ("H", "W", "B")
_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Stage:
    side: int
    heads: int
    head_dim: int
    n_win: int
    topk: int

    @property
    def grid(self):
        return region_grid((self.side, self.side), self.n_win)

    def tensors(self, dtype: torch.dtype, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """q (shape only, on the meta device) and the routing indices."""
        q = torch.empty(batch, self.side, self.side, self.heads, self.head_dim, dtype=dtype, device="meta")
        indices = torch.empty(batch, self.grid.num_regions, self.topk, dtype=torch.long, device="meta")
        return q, indices


def missing_compiler() -> str | None:
    """Why kernels cannot be compiled here (None if they can): Triton and its bundled ptxas are needed."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(SM90)
    except Exception as error:  # no triton, or a triton without its CUDA backend
        return f"Triton's CUDA compiler is not usable here ({type(error).__name__}: {error})"
    return None


def useful_fraction(backend: str, stage: Stage) -> float:
    if backend == "triton":
        computed, valid = triton_attention.score_tiling(stage.grid, stage.topk)
    else:
        computed, valid = triton_region.score_tiling(stage.grid, stage.topk, stage.head_dim)
    return valid / computed


def _kernel_launches(backend: str, stage: Stage, dtype: torch.dtype) -> dict[str, tuple[Any, dict, int]]:
    """kernel name -> (jit function, constexprs, num_warps), as the backend launches them for `stage`."""
    q, indices = stage.tensors(dtype)
    grid = stage.grid
    if backend == "triton":
        from ..ops.backends import _triton_kernels as kernels

        geometry = triton_attention._Geometry(q, q, indices, grid.cols, grid.region_h, grid.region_w)
        shared = geometry.constants(True, dtype)
        return {
            "forward": (kernels._routed_attention_fwd, {**shared, **geometry.query_tile_constants()}, 4),
            "dq": (kernels._routed_attention_bwd_dq, {**shared, **geometry.query_tile_constants()}, 4),
            "dkv": (kernels._routed_attention_bwd_dkv, {**shared, **geometry.key_tile_constants()}, 4),
        }
    from ..ops.backends import _triton_region_kernels as kernels

    geometry = triton_region.VolumeGeometry.of(grid)
    constants, tiling = triton_region._constants(q, q, indices, geometry, True)
    warps = constants.pop("num_warps")
    routing = triton_region.routing_constants(geometry, stage.heads, stage.head_dim, stage.topk)
    return {
        "forward": (kernels._region_attention_fwd, {**constants, **tiling.routed_key_constants()}, warps),
        "dq": (kernels._region_attention_bwd_dq, {**constants, **tiling.routed_key_constants()}, warps),
        "dkv": (kernels._region_attention_bwd_dkv, constants, warps),
        "route": (kernels._route_fused, {**routing, "MASKED": True}, triton_region.ROUTING_WARPS),
        "inverse": (kernels._inverse_routing,
                    triton_region.inverse_routing_constants(grid.num_regions, stage.topk), 4),
    }


def _signature(fn, constexprs: dict, dtype: torch.dtype) -> dict[str, str]:
    """Triton argument types by our kernels' naming: upper-case names are pointers, strides and H, W, B int32."""
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for its constexprs {missing}")
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "scale":
            signature[name] = "fp32"
        elif name.isupper() and name not in _INT_ARGUMENTS:
            signature[name] = "*" + _POINTER_DTYPES.get(name, _TRITON_DTYPES[dtype])
        else:
            signature[name] = "i32"
    return signature


def compile_sm90(fn, constexprs: dict, dtype: torch.dtype, num_warps: int) -> dict[str, int]:
    """Registers per thread, spill bytes and shared memory of `fn` compiled for sm_90 (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    signature = _signature(fn, constexprs, dtype)
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()})
    # the other options at Triton's defaults (num_stages 3), as the backends launch the kernels
    compiled = triton.compile(source, target=GPUTarget("cuda", SM90, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as folder:
        ptx = f"{folder}/kernel.ptx"
        with open(ptx, "w") as handle:
            handle.write(compiled.asm["ptx"])
        report = subprocess.run([get_ptxas(SM90).path, "-v", "--gpu-name", "sm_90a", ptx, "-o", f"{folder}/k.cubin"],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return {"registers": registers, "spill_bytes": spills, "shared_bytes": compiled.metadata.shared}


def kernel_rows(backends: tuple[str, ...], dtypes: tuple[torch.dtype, ...]) -> list[dict[str, Any]]:
    rows = []
    for backend in backends:
        for stage_name, shape in STAGES.items():
            stage = Stage(*shape)
            fraction = useful_fraction(backend, stage)
            for dtype in dtypes:
                for kernel, (fn, constexprs, warps) in _kernel_launches(backend, stage, dtype).items():
                    rows.append({"backend": backend, "stage": stage_name, "kernel": kernel,
                                 "dtype": str(dtype).removeprefix("torch."),
                                 "useful_fraction": round(fraction, 3) if kernel == "forward" else None,
                                 **compile_sm90(fn, constexprs, dtype, warps)})
    return rows
