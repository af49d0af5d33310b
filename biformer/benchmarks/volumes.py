"""`biformer bench volumes`: peak memory (RSS) and volumes/s of 3-D segmentation models on CPU, batch 1, one input
channel and 14 classes (BTCV's), each (model, side, mode) in a fresh process: ours (`unet_biformer3d_*`) against
MONAI's SwinUNETR (feature size 48, and 24: "swinunetr-48", "swinunetr-24") and UNet ("monai_unet": its tutorials'
16..256 channels, residual units).

A case: the model built, a side^3 volume made (the "loaded" RSS), one untimed run, then `repeats` timed runs
(volumes/s from their median); the peak RSS is the process's (`getrusage`), so it includes the untimed run.
"inference": eval mode under torch.no_grad; "training": cross-entropy on random labels, backward, an SGD step.
Linux only. MB = 2**20 bytes.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from .processes import peak_rss, run_in_child

CLASSES = 14  # BTCV's, the data set SwinUNETR reports on
SIDES = (96, 128)
MODES = ("inference", "training")
DEFAULT_MODELS = ("unet_biformer3d_tiny", "swinunetr-48", "swinunetr-24", "monai_unet")
COLUMNS = ("model", "side", "mode", "params_m", "loaded_mb", "peak_rss_mb", "volumes_per_s", "threads")


def check_name(name: str) -> None:
    """ValueError unless `name` is a volume model (`biformer.dense.volumes.is_volume_model`)."""
    from ..dense.volumes import VOLUME_MODEL_FORMS, is_volume_model

    if not is_volume_model(name):
        raise ValueError(f"unknown volume model {name!r}: {VOLUME_MODEL_FORMS}")


def build(name: str, classes: int = CLASSES):
    """Model `name` (see `check_name`): ours, or MONAI's SwinUNETR or UNet."""
    from ..dense.volumes import create_volume_model

    check_name(name)
    return create_volume_model(name, classes, 1)


@dataclass(frozen=True)
class VolumeCase:
    model: str
    side: int
    mode: str
    repeats: int = 2


def measure(case: VolumeCase, threads: int | None = None) -> dict[str, Any]:
    """Build and run `case` in this process; its peak RSS is this process's (run it in a fresh one)."""
    import torch
    import torch.nn.functional as F

    seconds: list[float] = []
    built: dict[str, int] = {}

    def prepare() -> Callable[[], None]:
        model = build(case.model)
        volume = torch.randn(1, 1, case.side, case.side, case.side)
        labels = torch.randint(0, CLASSES, (1, case.side, case.side, case.side))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step() -> None:
            if case.mode == "inference":
                with torch.no_grad():
                    model.eval()(volume)
            else:
                F.cross_entropy(model.train()(volume), labels).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        def run() -> None:
            step()  # untimed: the first run allocates
            for _ in range(case.repeats):
                start = time.perf_counter()
                step()
                seconds.append(time.perf_counter() - start)

        built["params"] = sum(p.numel() for p in model.parameters())
        return run

    memory = peak_rss(prepare, threads)
    return dict(params_m=built["params"] / 1e6, loaded_mb=memory["loaded_mb"], peak_rss_mb=memory["peak_rss_mb"],
                volumes_per_s=1 / statistics.median(seconds), threads=memory["threads"])


def _child_main() -> None:
    """Entry point of the child process: the case (and threads) as JSON in argv[1], the result as JSON on stdout."""
    request = json.loads(sys.argv[1])
    print(json.dumps(measure(VolumeCase(**request["case"]), request["threads"])))


def bench_volumes(models: list[str], sides: list[int], modes: list[str], repeats: int = 2,
                  threads: int | None = None) -> list[dict[str, Any]]:
    """One row per (model, side, mode), each measured in its own fresh process, one after another."""
    rows = []
    for side in sides:
        for mode in modes:
            for model in models:
                case = VolumeCase(model, side, mode, repeats)
                result = run_in_child(__name__, dict(case=asdict(case), threads=threads), f"{model} {side}^3 {mode}")
                rows.append(dict(model=model, side=side, mode=mode, **result))
    return rows
