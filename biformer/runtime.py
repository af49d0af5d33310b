"""Where a run executes: device, mixed precision, random seeds and DistributedDataParallel under torchrun."""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import UserError


@dataclass(frozen=True)
class DistEnv:
    """The distributed environment of this process: its rank among `world` processes (1: it runs alone) and its
    device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files and prints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether other processes take part: then results are reduced across them."""
        return self.world > 1


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """--device, or the GPU if there is one; a bare "cuda" means this process's GPU under torchrun."""
    if device in (None, "cuda") and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    target = torch.device(device or "cpu")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available; use --device cpu")
    return target


def init_distributed(device: str | None, *, join: bool = True) -> DistEnv:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPUs, gloo on CPU. join=False: this process alone
    (on its own GPU), also under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    target = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if world == 1 or not join:
        return DistEnv(0, 1, target)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), world, target)


def distributed_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """`model` wrapped in DistributedDataParallel under torchrun; itself in a lone process.

    The gradients live in DDP's communication buckets (gradient_as_bucket_view), so the backward
    adds into them whatever strides it produces and nothing is copied. Otherwise DDP copies each
    gradient into its bucket and warns that "grad strides do not match bucket view strides": the
    depthwise conv weights (C, 1, k, k) are stored contiguous while their gradients, computed
    from channels-last activations, come with channels-last strides. That is the same memory
    order (dim 1 has size 1), so autograd keeps such a gradient as it is, but DDP compares the
    strides. The gradients must exist before wrapping for DDP to turn them into bucket views, and
    the optimizer must zero them in place from then on (zero_grad(set_to_none=False)).
    """
    if not env.distributed:
        return model
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    return DistributedDataParallel(model, gradient_as_bucket_view=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    if not env.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def resolve_amp(amp: str, device: torch.device) -> str:
    """--amp auto: bfloat16 on CPU and on GPUs that have it, float16 on older GPUs."""
    if amp == "auto":
        return "bf16" if device.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16"
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a GPU; use --amp bf16 (or --amp) on CPU")
    return amp


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
