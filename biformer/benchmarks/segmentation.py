"""`biformer bench segmentation`: peak memory (RSS) of segmentation on CPU, each case in a fresh process.

Two cases, each measured in its own child Python process so that the process's peak RSS
(`getrusage(RUSAGE_SELF).ru_maxrss`) is the case's alone; the RSS right after the model was built
and the input made (`VmRSS` in /proc/self/status) is the "loaded" figure the increase is taken over.
  inference: a segmentation model in eval mode under torch.no_grad, batch 1 at Cityscapes' 1024x2048
    with its 19 classes; target: peak RSS (absolute) at most 2.5 GB.
  training: a BiFormer dense backbone (n_win 7) in train mode, forward and backward of the sum of its
    maps' means at 2x3x600x500; target: at most 2.2 GB over the loaded model. Measured with our BRA
    backends and with the original release's gather algorithm (backend "original"), which a user of
    the original code reported at 5.8 GB over its loaded model (closest here: BiFormer-S's, the default).
Linux only (/proc and getrusage's KiB). MB here is 2**20 bytes, GB 10**9 (the targets are 2384 and 2098 MB).

Shape legend: B batch, H/W input height/width.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable

from .processes import peak_rss, run_in_child

INFERENCE_MODEL = "upernet_biformer_small"
INFERENCE_INPUT = (1, 3, 1024, 2048)  # a Cityscapes image
CITYSCAPES_CLASSES = 19
INFERENCE_TARGET_MB = 2.5e9 / 2**20  # 2.5 GB peak RSS, absolute
# the variant whose original-algorithm figure is closest to the 5.8 GB a user of the original code reported
TRAINING_MODEL = "biformer_small"  # original: 5845 MB over loaded; biformer_tiny: 2935 MB
TRAINING_INPUT = (2, 3, 600, 500)
TRAINING_N_WIN = 7
TRAINING_TARGET_MB = 2.2e9 / 2**20  # 2.2 GB over the loaded model
ORIGINAL = "original"  # the release's BRA algorithm (biformer.ops backend)

COLUMNS = ("case", "model", "backend", "input", "loaded_mb", "peak_rss_mb", "over_loaded_mb", "target", "meets")
CASES = ("inference", "training")


@dataclass(frozen=True)
class SegmentationCase:
    """One measurement: `case` "inference" (a segmentation model) or "training" (a BiFormer backbone)."""

    case: str
    model: str
    input: tuple[int, int, int, int]  # (B, 3, H, W)
    backend: str | None = None  # BRA backend to force; None: automatic dispatch
    classes: int = CITYSCAPES_CLASSES  # inference only
    n_win: int = TRAINING_N_WIN  # training only (the segmentation model keeps its default, 8)

    @property
    def target_mb(self) -> tuple[str, float] | None:
        """(which figure, limit) for the acceptance configurations; None for other cases."""
        if self.case == "inference" and (self.model, self.input) == (INFERENCE_MODEL, INFERENCE_INPUT):
            return "peak_rss_mb", INFERENCE_TARGET_MB
        if (self.case == "training" and self.input == TRAINING_INPUT and self.n_win == TRAINING_N_WIN
                and self.backend != ORIGINAL):
            return "over_loaded_mb", TRAINING_TARGET_MB
        return None


def default_cases(case: str = "all", model: str | None = None,
                  input: tuple[int, int, int, int] | None = None) -> list[SegmentationCase]:
    """The cases to measure: `case` inference, training or all; model/input replace the defaults.

    Training runs twice: with our backends and with the original algorithm.
    """
    cases = []
    if case in ("inference", "all"):
        cases.append(SegmentationCase("inference", model or INFERENCE_MODEL, input or INFERENCE_INPUT))
    if case in ("training", "all"):
        backbone = model if case == "training" and model else TRAINING_MODEL
        cases += [SegmentationCase("training", backbone, input or TRAINING_INPUT, backend=backend)
                  for backend in (None, ORIGINAL)]
    return cases


def measure(case: SegmentationCase, threads: int | None = None) -> dict[str, Any]:
    """Build, load and run `case` in this process; its peak RSS is this process's (run it in a fresh one)."""
    import torch

    from ..dense import create_backbone, create_segmentation_model
    from ..ops import use_backend

    def prepare() -> Callable[[], None]:
        if case.case == "inference":
            model = create_segmentation_model(case.model, case.classes).eval()
        else:
            model = create_backbone(case.model, n_win=case.n_win).train()
        images = torch.randn(case.input)

        def run() -> None:
            with use_backend(model, case.backend):
                if case.case == "inference":
                    with torch.no_grad():
                        model(images)
                else:
                    sum(feature.mean() for feature in model(images)).backward()

        return run

    return peak_rss(prepare, threads)


def _child_main() -> None:
    """Entry point of the child process: the case (and threads) as JSON in argv[1], the result as JSON on stdout."""
    request = json.loads(sys.argv[1])
    case = SegmentationCase(**{**request["case"], "input": tuple(request["case"]["input"])})
    print(json.dumps(measure(case, request["threads"])))


def measure_in_child(case: SegmentationCase, threads: int | None = None, timeout: float | None = None) -> dict[str, Any]:
    """`measure(case)` in a fresh Python process; the table row of the case. RuntimeError if the child fails."""
    return _row(case, run_in_child(__name__, dict(case=asdict(case), threads=threads), str(case), timeout))


def _row(case: SegmentationCase, result: dict[str, Any]) -> dict[str, Any]:
    target = case.target_mb
    row = dict(case=case.case, model=case.model, backend=case.backend or "auto",
               input="x".join(map(str, case.input)), **result)
    if target is not None:
        figure, limit = target
        row.update(target=f"{figure} <= {limit:.0f}", meets="yes" if row[figure] <= limit else "NO")
    return row


def bench_segmentation(cases: list[SegmentationCase], threads: int | None = None) -> list[dict[str, Any]]:
    """One row per case, each measured in its own fresh process, one after another."""
    return [measure_in_child(case, threads) for case in cases]
