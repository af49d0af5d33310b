"""`biformer bench model`: whole-model throughput and memory, BiFormer beside timm peers of similar FLOPs."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..measure import interleaved_median_seconds, megabytes, peak_memory_bytes
from ..ops import BiLevelRoutingAttention, use_backend

# BiFormer-T (2.2 GFLOPs) and -S (4.5) with timm models of about the same FLOPs.
DEFAULT_MODELS = (
    "biformer_tiny", "biformer_small", "swin_tiny_patch4_window7_224", "convnext_tiny", "pvt_v2_b1", "pvt_v2_b2",
    "deit_small_patch16_224",
)

COLUMNS = (
    "model", "params_m", "gflops", "infer_img_s", "train_img_s", "infer_gflop_s", "train_gflop_s", "infer_peak_mb",
    "train_peak_mb",
)


@dataclass(frozen=True)
class ModelEntry:
    """A timm model name, with the BRA backend to force (biformer models) and whether to torch.compile it."""

    name: str
    backend: str | None = None
    compile: bool = False

    @classmethod
    def parse(cls, text: str, backend: str | None = None, compile: bool = False) -> "ModelEntry":
        """'MODEL[:backend=NAME][:compile]'; the options given here override the defaults passed in."""
        name, *options = text.split(":")
        for option in options:
            if option == "compile":
                compile = True
            elif option.startswith("backend="):
                backend = option.removeprefix("backend=")
            else:
                raise ValueError(f"model {text!r}: unknown option {option!r}; use MODEL[:backend=NAME][:compile]")
        return cls(name, backend, compile)

    @property
    def label(self) -> str:
        options = [f"backend={self.backend}"] * (self.backend is not None) + ["compile"] * self.compile
        return ":".join([self.name, *options])


def read_flops_table(path: str) -> dict[str, float]:
    """MODEL,GFLOPS rows (multiply-adds per image, in billions), a header line allowed."""
    table = {}
    with open(path, newline="") as file:
        for line, row in enumerate(csv.reader(file), start=1):
            if not row or row[0].strip().lower() in ("model", ""):
                continue
            try:
                table[row[0].strip()] = float(row[1])
            except (IndexError, ValueError):
                raise ValueError(f"{path}:{line}: expected MODEL,GFLOPS, got {','.join(row)!r}") from None
    return table


def build_models(entries: list[ModelEntry], device: torch.device) -> dict[ModelEntry, nn.Module]:
    """Each entry's model (random weights); ValueError for an unknown model, or a backend for one without BRA."""
    return {entry: _build(entry, device) for entry in entries}


def _build(entry: ModelEntry, device: torch.device) -> nn.Module:
    import timm
    import torchvision

    from ..tasks.video import torchvision_video_models

    if timm.is_model(entry.name):
        model = timm.create_model(entry.name, pretrained=False).to(device)
    elif entry.name in torchvision_video_models():
        model = torchvision.models.get_model(entry.name).to(device)
    else:
        raise ValueError(f"unknown model {entry.name!r}; see timm.list_models() (or torchvision's video models: "
                         f"{', '.join(torchvision_video_models())})")
    if entry.backend is not None and not any(isinstance(m, BiLevelRoutingAttention) for m in model.modules()):
        raise ValueError(f"{entry.label}: backend= applies to BiFormer models only; {entry.name} has no BRA layer")
    return model


def _gflops(model: nn.Module, size: tuple[int, ...]) -> float:
    """Multiply-adds of one image's (or clip's) forward, in billions (the paper convention)."""
    from ..analysis.flops import total_multiply_adds

    return total_multiply_adds(model, size) / 1e9


def bench_models(
    entries: dict[ModelEntry, nn.Module],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    batch: int = 8,
    img_size: int = 224,
    repeats: int = 5,
    warmup: int = 2,
    train: bool = True,
    memory: bool = True,
    flops: dict[str, float] | None = None,
    frames: int | None = None,
) -> list[dict[str, Any]]:
    """One row per entry: inference and training-step img/s (medians of interleaved rounds), peaks, GFLOP/s.
    With `frames`, every model takes clips (B, 3, frames, H, W), and the rates count clips.

    Inference: eval mode, no autograd. Training step: train mode, forward, cross-entropy,
    backward, SGD step. Half dtypes run under autocast. GFLOP/s counts multiply-adds once; a
    training step is taken as 3x the forward's FLOPs (forward + the backward's two products).
    """
    size = (img_size, img_size) if frames is None else (frames, img_size, img_size)
    torch.manual_seed(0)
    images = torch.randn(batch, 3, *size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    models, gflops, inference, steps = {}, {}, {}, {}
    for entry, model in entries.items():
        gflops[entry.label] = flops[entry.name] if flops and entry.name in flops else _gflops(model, size)
        runner = torch.compile(model) if entry.compile else model
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        models[entry.label] = model

        def infer(model=model, runner=runner, backend=entry.backend) -> None:
            model.eval()
            with use_backend(model, backend), torch.inference_mode(), autocast:
                runner(images)

        def step(model=model, runner=runner, optimizer=optimizer, backend=entry.backend) -> None:
            model.train()
            with use_backend(model, backend), autocast:
                logits = runner(images)
                loss = F.cross_entropy(logits, labels % logits.shape[-1])  # any head size
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        inference[entry.label], steps[entry.label] = infer, step
    infer_s = interleaved_median_seconds(inference, device, repeats, warmup, desc="inference")
    train_s = interleaved_median_seconds(steps, device, repeats, warmup, desc="training") if train else {}
    rows = []
    for label, model in models.items():
        infer_rate = batch / infer_s[label]
        train_rate = batch / train_s[label] if train else None
        rows.append(dict(
            model=label,
            params_m=sum(p.numel() for p in model.parameters()) / 1e6,
            gflops=gflops[label],
            infer_img_s=infer_rate,
            train_img_s=train_rate,
            infer_gflop_s=gflops[label] * infer_rate,
            train_gflop_s=None if train_rate is None else 3 * gflops[label] * train_rate,
            infer_peak_mb=megabytes(peak_memory_bytes(inference[label], device)) if memory else None,
            train_peak_mb=megabytes(peak_memory_bytes(steps[label], device)) if memory and train else None,
        ))
    return rows
