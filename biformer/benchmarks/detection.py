"""`biformer bench detection`: peak memory and speed of detection models on CPU, backbones side by side.

Two measurements of each model (batch 1 at 800x1333 unless told otherwise, 80 COCO classes):
  memory: peak RSS of inference (eval, no autograd) and of a training step (forward with targets, backward
    of the summed losses), each in a fresh child process: `getrusage`'s peak of that process alone, and the
    RSS right after the model was built and the input made (`loaded`). Target: maskrcnn_biformer_small's
    inference peak at most 3 GB.
  speed: one child process builds every model, runs each once to warm up, then times rounds in which every
    model runs inference and then a training step in turn, so a busy spell of the machine slows all alike;
    images/s is the median over the rounds, with the range.
A model is one of ours (`<head>_<backbone>`, e.g. maskrcnn_convnext_tiny, with the 800/1333 resize), or
torchvision's own `maskrcnn_resnet50_fpn` / `retinanet_resnet50_fpn` (randomly initialized, same resize).
The synthetic targets are five boxes with their rectangular masks. Linux only (/proc and getrusage's KiB);
MB = 2**20 bytes, GB = 10**9.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

from .processes import peak_rss, run_in_child

DEFAULT_MODELS = ("maskrcnn_biformer_small", "maskrcnn_resnet50_fpn", "maskrcnn_convnext_tiny")
TORCHVISION_MODELS = ("maskrcnn_resnet50_fpn", "retinanet_resnet50_fpn")
DEFAULT_SIZE = (800, 1333)  # (H, W): the recipe's resize of a 4:3 COCO image
COCO_CLASSES = 80
TARGET_MODEL = "maskrcnn_biformer_small"
TARGET_MB = 3e9 / 2**20  # its inference peak RSS: at most 3 GB
MODES = ("inference", "training")
COLUMNS = ("model", "mode", "input", "loaded_mb", "peak_rss_mb", "over_loaded_mb", "images_per_s", "range", "target",
           "meets")


def check_model_name(name: str) -> None:
    """ValueError unless `name` is one of ours or a torchvision model listed in TORCHVISION_MODELS."""
    from ..dense import DETECTION_HEADS, is_detection_model
    from ..dense.names import head_forms

    if name not in TORCHVISION_MODELS and not is_detection_model(name):
        raise ValueError(f"{name!r} is neither a detection model of ours ({head_forms(DETECTION_HEADS)}) "
                         f"nor one of torchvision's {', '.join(TORCHVISION_MODELS)}")


def build_detector(name: str, size: tuple[int, int]) -> Any:
    """Model `name` with COCO's 80 classes, resizing images so that their shorter side is min(size)."""
    import torchvision.models.detection as tv

    check_model_name(name)
    resize = dict(min_size=min(size), max_size=max(max(size), round(min(size) * 1333 / 800)))
    if name in TORCHVISION_MODELS:
        return getattr(tv, name)(weights=None, weights_backbone=None, num_classes=COCO_CLASSES + 1, **resize)
    from ..dense import create_detection_model

    return create_detection_model(name, COCO_CLASSES, **resize)


def synthetic_batch(size: tuple[int, int]) -> tuple[list[Any], list[dict[str, Any]]]:
    """One (3, H, W) image in [0, 1] and its targets: five boxes of classes 1-5 with rectangular masks."""
    import torch

    height, width = size
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, height, width, generator=generator)
    boxes = []
    masks = torch.zeros(5, height, width, dtype=torch.uint8)
    for index in range(5):
        x1, y1 = int(width * (0.05 + 0.17 * index)), int(height * (0.1 + 0.15 * index))
        x2, y2 = x1 + width // 8, y1 + height // 5
        boxes.append([x1, y1, x2, y2])
        masks[index, y1:y2, x1:x2] = 1
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.arange(1, 6), "masks": masks}
    return [image], [target]


def _run(model: Any, mode: str, images: list[Any], targets: list[dict[str, Any]]) -> None:
    import torch

    if mode == "inference":
        model.eval()
        with torch.no_grad():
            model(images)
    else:
        model.train()
        model.zero_grad(set_to_none=True)
        sum(model(images, targets).values()).backward()


def measure_memory(name: str, mode: str, size: tuple[int, int], threads: int | None) -> dict[str, Any]:
    """Peak RSS of one run of `mode` in this process (call it in a fresh one: `bench_detection` does)."""

    def prepare() -> Callable[[], None]:
        model = build_detector(name, size)
        images, targets = synthetic_batch(size)
        return lambda: _run(model, mode, images, targets)

    return peak_rss(prepare, threads)


def measure_speed(names: list[str], size: tuple[int, int], rounds: int, threads: int | None) -> dict[str, Any]:
    """{name: {mode: [seconds per round]}}: every model warmed up once, then `rounds` interleaved rounds."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    models = {name: build_detector(name, size) for name in names}
    images, targets = synthetic_batch(size)
    times: dict[str, dict[str, list[float]]] = {name: {mode: [] for mode in MODES} for name in names}
    for round_index in range(rounds + 1):  # round 0 warms up
        for name, model in models.items():
            for mode in MODES:
                start = time.perf_counter()
                _run(model, mode, images, targets)
                if round_index:
                    times[name][mode].append(time.perf_counter() - start)
    return {"times": times, "threads": torch.get_num_threads()}


def _child_main() -> None:
    import json
    import sys

    request = json.loads(sys.argv[1])
    size = tuple(request["size"])
    if request["what"] == "memory":
        result = measure_memory(request["model"], request["mode"], size, request["threads"])
    else:
        result = measure_speed(request["models"], size, request["rounds"], request["threads"])
    print(json.dumps(result))


def bench_detection(names: list[str], size: tuple[int, int] = DEFAULT_SIZE, rounds: int = 3,
                    threads: int | None = None, progress: Any = None) -> list[dict[str, Any]]:
    """A row per (model, mode): memory from a fresh process each, images/s from one interleaved run.

    progress: called with a line of text before each measurement (e.g. print), or None.
    """
    for name in names:
        check_model_name(name)
    say = progress or (lambda text: None)
    memory = {}
    for name in names:
        for mode in MODES:
            say(f"memory: {name} {mode}")
            memory[name, mode] = run_in_child(__name__, dict(what="memory", model=name, mode=mode, size=list(size),
                                                             threads=threads), f"{name} {mode}")
    say(f"speed: {len(names)} models, 1 warm-up and {rounds} interleaved rounds")
    speed = run_in_child(__name__, dict(what="speed", models=list(names), size=list(size), rounds=rounds,
                                        threads=threads), "speed")
    rows = []
    for name in names:
        for mode in MODES:
            rates = [1 / seconds for seconds in speed["times"][name][mode]]
            row = dict(model=name, mode=mode, input=f"1x3x{size[0]}x{size[1]}", **memory[name, mode],
                       images_per_s=statistics.median(rates), range=f"{min(rates):.3f}-{max(rates):.3f}")
            if (name, mode, size) == (TARGET_MODEL, "inference", DEFAULT_SIZE):
                row.update(target=f"peak_rss_mb <= {TARGET_MB:.0f}", meets="yes" if row["peak_rss_mb"] <= TARGET_MB else "NO")
            rows.append(row)
    return rows
