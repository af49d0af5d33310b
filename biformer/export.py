"""Exported models: ONNX (dynamo or TorchScript-based exporter), TorchScript traces and torch.export programs,
at a fixed input size or with batch, height and width free, written atomically and checked against eager PyTorch.

Under every exporter and tracer, BRA runs its portable formulation (`biformer.ops.backends.portable`), whose
region grid follows the input's size inside the graph. Two settings of torch.export, which the dynamo ONNX
exporter runs, make one graph serve every size: size-oblivious reasoning about backed sizes (a symbolic size is
not asked whether it is 0 or 1) and guards that become runtime asserts instead of errors (the asserts it keeps
hold for every size in range). A trace (torch.jit.trace, and the TorchScript-based ONNX exporter, which traces)
records sizes as they are computed from the input's: BRA and the segmentation models' padding keep every size
they derive as a traced value, so a traced file also serves every size (`dynamic` names the ONNX file's axes).

Volume models (`unet_biformer3d_*`, MONAI's) take (B, C, D, H, W) volumes of their C modalities. A dynamic export
of ours frees batch, depth, height and width, through torch.export as unbounded sizes (the models pad each axis to
a multiple of 32 inside, which bounded sizes cannot express); MONAI's take multiples of their downsampling only and
export at a fixed size.

Shape legend: B batch, H/W input height/width, T a clip's frames (clip models, biformer3d_*, take (B, 3, T, H, W)),
C a volume's modalities, D its depth.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import UserError
from .files import atomic_output

FORMATS = ("onnx", "torchscript", "exported", "openvino")
SUFFIX_FORMATS = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".pt2": "exported", ".xml": "openvino"}
ONNX_BASED = ("onnx", "openvino")  # the formats written through an ONNX exporter (OpenVINO converts its file)
# The smallest side of a static export: BiFormer's stem and three downsamplings make a 32 px input a single
# token at the last stage. A dynamic export needs maps of at least 2x2 there (see `smallest_dynamic_side`).
MIN_SIDE, MIN_DYNAMIC_SIDE, MAX_SIDE = 32, 33, 4096
MAX_BATCH = 1024
# a clip model's stem merges frame pairs: a dynamic export keeps at least 2 merged frames (as it keeps maps of more
# than one pixel)
MIN_DYNAMIC_FRAMES, MAX_FRAMES = 4, 1024
# the ONNX opsets each exporter writes our models at (torch 2.14): the TorchScript-based one from 14 (attention,
# scaled_dot_product_attention, has no translation before) to its last, 20; the dynamo one from torchlib's 18
# (below it writes 18 regardless) to 23
OPSETS = {"legacy": (14, 20), "dynamo": (18, 23)}
TOLERANCE = 1e-4  # max abs difference from eager PyTorch, float32, relative to outputs of magnitude up to 1


def dynamic_shapes(min_side: int = MIN_DYNAMIC_SIDE, clip: bool = False, volume: bool = False
                   ) -> tuple[dict[int, torch.export.Dim], ...]:
    """Batch, height and width (from `min_side` px) of a (B, 3, H, W) input free; of a clip (B, 3, T, H, W), also
    its frames; of a volume (B, C, D, H, W), batch and every spatial axis without bounds."""
    if volume:
        return ({axis: torch.export.Dim.DYNAMIC for axis in (0, 2, 3, 4)},)
    frames = {2: torch.export.Dim("frames", min=MIN_DYNAMIC_FRAMES, max=MAX_FRAMES)} if clip else {}
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH), **frames,
             2 + clip: torch.export.Dim("height", min=min_side, max=MAX_SIDE),
             3 + clip: torch.export.Dim("width", min=min_side, max=MAX_SIDE)},)


class _ConvolutionInputs(TorchDispatchMode):
    """Records the (H, W) of every convolution's input."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.sizes.append(tuple(args[0].shape[2:]))
        return func(*args, **(kwargs or {}))


def smallest_dynamic_side(model: nn.Module, clip: bool = False) -> int:
    """The smallest input side at which every convolution of `model` (a clip model's, given clips) sees a map of
    more than one pixel per side: below it, torch.export's convolutions take another path for 1-pixel maps, which
    one graph cannot hold. For BiFormer with the overlapping conv stem that is 33 px, with the patch stem (the STL
    layout) 64 px."""
    frames = (MIN_DYNAMIC_FRAMES,) if clip else ()

    def more_than_one_pixel(side: int) -> bool:
        recorder = _ConvolutionInputs()
        try:
            with torch.no_grad(), recorder:
                model(torch.zeros(1, 3, *frames, side, side))
        except RuntimeError:  # too small for the model at all
            return False
        return all(min(size) > 1 for size in recorder.sizes)

    low, high = MIN_DYNAMIC_SIDE, MIN_DYNAMIC_SIDE  # small sides first: they cost little to run
    while not more_than_one_pixel(high):
        if high >= MAX_SIDE:
            raise ValueError(f"the model has a 1-pixel map at every input side up to {MAX_SIDE}: no dynamic export")
        low, high = high + 1, min(2 * high, MAX_SIDE)
    while low < high:  # the answer lies in low..high
        middle = (low + high) // 2
        low, high = (low, middle) if more_than_one_pixel(middle) else (middle + 1, high)
    return low


@contextlib.contextmanager
def one_graph_for_every_size() -> Iterator[None]:
    """Inside: torch.export reasons about sizes size-obliviously (pass it
    prefer_deferred_runtime_asserts_over_guards=True as well; the ONNX exporter does)."""
    with fx_config.patch(backed_size_oblivious=True):
        yield


@dataclass(frozen=True)
class Volume:
    """What a volume model's input holds besides its height and width: (B, channels, depth, H, W)."""

    channels: int
    depth: int


@dataclass(frozen=True)
class ExportSettings:
    """How to export: `format` one of FORMATS; `dynamic`: batch, height and width free (a clip's frames and a
    volume's depth too; checked at other sizes); `legacy`: ONNX through the TorchScript-based exporter (what
    Ultralytics and mmdeploy use); `opset`: the ONNX opset (None: the exporter's default)."""

    format: str = "onnx"
    dynamic: bool = False
    legacy: bool = False
    opset: int | None = None

    def not_supported_reasons(self) -> list[str]:
        reasons = []
        if self.format not in FORMATS:
            reasons.append(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.legacy and self.format not in ONNX_BASED:
            reasons.append("legacy is the TorchScript-based ONNX exporter: it needs format 'onnx' (or 'openvino', "
                           "which converts the ONNX file)")
        if self.opset is not None and self.format not in ONNX_BASED:
            reasons.append("opset is for ONNX files (and the ONNX file an OpenVINO model is converted from)")
        elif self.opset is not None:
            exporter = "legacy" if self.legacy else "dynamo"
            low, high = OPSETS[exporter]
            if not low <= self.opset <= high:
                other = OPSETS["dynamo" if self.legacy else "legacy"]
                reasons.append(f"opset {self.opset} is outside {low}..{high}, the opsets the {exporter} exporter writes "
                               f"these models at (the {'dynamo' if self.legacy else 'legacy'} one: "
                               f"{other[0]}..{other[1]})")
        return reasons

    def accepted_sizes(self, batch: int, height: int, width: int, min_side: int, frames: int | None = None,
                       volume: Volume | None = None) -> str:
        """The input sizes the exported file takes, for the summary (frames: a clip model's)."""
        if volume is not None and self.dynamic:
            modalities = "1 modality" if volume.channels == 1 else f"{volume.channels} modalities"
            return f"dynamic: batch, depth, height and width free ({modalities})"
        if volume is not None:
            return f"{batch}x{volume.channels}x{volume.depth}x{height}x{width} only"
        if not self.dynamic:
            return f"{batch}x3x{f'{frames}x' if frames else ''}{height}x{width} only"
        clip = f", frames {MIN_DYNAMIC_FRAMES}..{MAX_FRAMES}" if frames else ""
        return f"dynamic: batch 1..{MAX_BATCH}{clip}, height and width {min_side}..{MAX_SIDE} px"


def format_for_path(path: str | os.PathLike, requested: str | None = None) -> str:
    """The format a file name asks for by its suffix, or `requested` (--format); UserError for a suffix that names
    none without --format, or another format than --format."""
    suffix = Path(path).suffix.lower()
    if requested is not None:
        if suffix in SUFFIX_FORMATS and SUFFIX_FORMATS[suffix] != requested:
            raise UserError(f"{os.fspath(path)!r} is named as {SUFFIX_FORMATS[suffix]!r} ({suffix}) but --format is "
                            f"{requested!r}: name the file {next(s for s, f in SUFFIX_FORMATS.items() if f == requested)}"
                            " or leave --format out")
        return requested
    if suffix not in SUFFIX_FORMATS:
        known = ", ".join(f"{suffix} ({name})" for suffix, name in SUFFIX_FORMATS.items())
        raise UserError(f"cannot tell the format of {os.fspath(path)!r} from its suffix; name it {known} or "
                        f"pass --format")
    return SUFFIX_FORMATS[suffix]


def check_size(height: int, width: int, smallest: int = MIN_SIDE) -> None:
    """UserError unless each side is within smallest..MAX_SIDE pixels."""
    if min(height, width) < smallest or max(height, width) > MAX_SIDE:
        why = "" if smallest == MIN_SIDE else \
            " (a dynamic export of this model starts at maps of 2x2 at the last stage)"
        raise UserError(f"--img-size {height} {width}: each side must be within {smallest}..{MAX_SIDE} "
                        f"pixels{why}; choose a size in range")


def flat_outputs(value: Any) -> list[Tensor]:
    """A model's output (a tensor, or lists, tuples and dicts of them, as a backbone's feature maps) as a flat
    list in order: the order the exporters number their outputs in."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [tensor for item in value for tensor in flat_outputs(item)]


def _onnx_names(model: nn.Module, example: Tensor, dynamic: bool) -> dict[str, Any]:
    """The input and output names of an ONNX export, and for a dynamic trace the axes its sizes free: the batch,
    and the height and width of images and of every map among the outputs."""
    with torch.no_grad():
        outputs = flat_outputs(model(example))
    names = ["output"] if len(outputs) == 1 else [f"output_{index}" for index in range(len(outputs))]

    def map_axes(rank: int, name: str = "") -> dict[int, str]:  # of (B, C, H, W) or (B, C, T, H, W) maps
        axes = (f"{name}_{axis}" if name else axis for axis in ("width", "height", "frames"))
        return dict(zip(range(rank - 1, 1, -1), axes)) if rank >= 4 else {}

    axes = {name: {0: "batch", **map_axes(output.dim(), name)} for name, output in zip(names, outputs)}
    return {"input_names": ["images"], "output_names": names,
            "dynamic_axes": {"images": {0: "batch", **map_axes(example.dim())}, **axes} if dynamic else None}


def write(model: nn.Module, example: Tensor, path: str | os.PathLike, settings: ExportSettings,
          min_side: int = MIN_DYNAMIC_SIDE, volume: bool = False) -> None:
    """Export `model` (in eval mode) at `example`'s size to `path` (not atomically: see `export`); a dynamic
    export takes sides from `min_side` px (see `smallest_dynamic_side`); volume: `example` is a volume batch."""
    reasons = settings.not_supported_reasons()
    if reasons:
        raise ValueError("; ".join(reasons))
    model, path = model.eval(), os.fspath(path)
    names = _onnx_names(model, example, settings.dynamic and settings.legacy)
    with torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings name each Python value a trace keeps fixed (channel counts, checks): the file is checked
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if settings.format == "openvino":  # converted from the ONNX file our checks cover
            import openvino

            onnx_path = f"{os.path.splitext(path)[0]}.onnx"
            try:
                write(model, example, onnx_path, replace(settings, format="onnx"), min_side, volume)
                # float32 weights as exported (OpenVINO halves them to float16 by default: outside the 1e-4 check)
                openvino.save_model(openvino.convert_model(onnx_path), path, compress_to_fp16=False)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(onnx_path)
        elif settings.format == "torchscript":
            # check_trace runs the model again and compares: `export` checks the file itself
            torch.jit.save(torch.jit.trace(model, example, strict=False, check_trace=False), path)
        elif settings.format == "onnx" and settings.legacy:
            torch.onnx.export(model, (example,), path, dynamo=False, opset_version=settings.opset, **names)
        else:
            shapes = dynamic_shapes(min_side, example.dim() == 5, volume) if settings.dynamic else None
            with one_graph_for_every_size():
                if settings.format == "exported":
                    program = torch.export.export(model, (example,), dynamic_shapes=shapes,
                                                  prefer_deferred_runtime_asserts_over_guards=True)
                    with open(path, "wb") as file:  # a file object: torch.export.save wants .pt2 names otherwise
                        torch.export.save(program, file)
                else:
                    onnx_program = torch.onnx.export(model, (example,), dynamo=True, opset_version=settings.opset,
                                                     dynamic_shapes=shapes, verbose=False,
                                                     input_names=names["input_names"],
                                                     output_names=names["output_names"])
                    onnx_program.save(path)


@functools.cache
def openvino_core() -> Any:
    """The process's one OpenVINO runtime core. OpenVINO expects one per application, and processes that created
    a core per model crashed later (Ultralytics' test runner segfaulted after about 20 loads, each with its own)."""
    import openvino

    return openvino.Core()


def load(path: str | os.PathLike, format: str) -> Callable[[Tensor], list[Tensor]]:
    """A function running the exported file at `path` (ONNX files in ONNX Runtime, on the CPU): images in, the
    flat list of outputs out."""
    path = os.fspath(path)
    if format == "openvino":
        # float32 arithmetic for the check: on CPUs with bfloat16 units the plugin would otherwise choose them
        compiled = openvino_core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return lambda images: [torch.from_numpy(compiled(images.numpy())[output]) for output in compiled.outputs]
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda images: [torch.from_numpy(array) for array in session.run(None, {name: images.numpy()})]
    if format == "torchscript":
        module = torch.jit.load(path)
    else:
        with open(path, "rb") as file:
            module = torch.export.load(file).module()
    return lambda images: flat_outputs(module(images))


def verification_inputs(batch: int, height: int, width: int, dynamic: bool, min_side: int = MIN_DYNAMIC_SIDE,
                        frames: int | None = None, depth: int | None = None) -> list[tuple[int, ...]]:
    """(B, H, W), a clip's (B, T, H, W) or a volume's (B, D, H, W), of the example an export traces (the first) and
    of the inputs it is checked on: the example; with `dynamic`, also batch 1 at sides not divisible by 32 (nor
    BiFormer's maps by the 7 regions per side) and 3 more frames or slices, and batch 3 of a small input whose
    third-stage map is smaller than 7x7 (regions of one token, fewer regions than n_win) of the fewest frames
    (MIN_DYNAMIC_FRAMES) or a third of the depth. A dynamic export's example has a batch of at least 2 (and a clip
    at least the fewest frames): at batch 1 torch.export would fix it (CPU convolutions choose their memory format
    by whether the batch is 1)."""
    axis = frames or depth
    extra = (lambda count: (count,)) if axis else (lambda count: ())  # noqa: E731
    if not dynamic:
        return [(batch, *extra(axis), height, width)]
    first = max(axis or 0, MIN_DYNAMIC_FRAMES) if frames else axis
    fewest = MIN_DYNAMIC_FRAMES if frames else max(1, (axis or 0) // 3)
    return [(max(batch, 2), *extra(first), height, width),
            (1, *extra((first or 0) + 3), height * 7 // 8 // 8 * 8 + 4, width * 4 // 3 // 8 * 8 + 4),
            (3, *extra(fewest), max(min_side, height * 3 // 7), max(min_side, width * 4 // 7))]


@dataclass(frozen=True)
class Check:
    """An exported file run on one input beside eager PyTorch."""

    input_shape: tuple[int, ...]  # (B, 3, H, W), (B, 3, T, H, W) or (B, C, D, H, W)
    max_error: float  # max abs difference over all outputs
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_error <= self.tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "MISMATCH"
        return (f"input {tuple(self.input_shape)}: max abs error {self.max_error:.2e} "
                f"(tolerance {self.tolerance:.1e}) {verdict}")


def compare(run: Callable[[Tensor], list[Tensor]], model: nn.Module, images: Tensor) -> Check:
    """Run `images` through the exported `run` and eager `model`; the tolerance scales with the outputs'
    magnitude above 1 (float32 rounding is relative)."""
    with torch.no_grad():
        expected = flat_outputs(model(images))
    got = run(images)
    if len(got) != len(expected) or any(a.shape != b.shape for a, b in zip(got, expected)):
        return Check(tuple(images.shape), float("inf"), 0.0)

    def largest(x: Tensor) -> float:  # 0 for an empty output (a detector that found nothing)
        return x.float().abs().max().item() if x.numel() else 0.0

    error = max(largest(a.float() - b.float()) for a, b in zip(got, expected))
    scale = max(1.0, *(largest(b) for b in expected))
    return Check(tuple(images.shape), error, TOLERANCE * scale)


@contextlib.contextmanager
def _staged_output(path: str | os.PathLike) -> Iterator[Path]:
    """`atomic_output`, for an OpenVINO model too: the weights file the converter writes beside the temporary
    .xml (the same name, .bin) takes its final name just before the .xml does, and goes if anything fails."""
    with atomic_output(path) as partial:
        weights = partial.with_suffix(".bin")
        try:
            yield partial
            if weights.exists():
                os.replace(weights, Path(path).with_suffix(".bin"))
        finally:
            with contextlib.suppress(FileNotFoundError):
                weights.unlink()


class ExportMismatchError(UserError):
    """An exported file whose outputs differ from eager PyTorch's beyond the tolerance."""


def export(model: nn.Module, path: str | os.PathLike, settings: ExportSettings, height: int, width: int,
           batch: int = 1, seed: int = 0, on_stage: Callable[[str], None] | None = None, frames: int | None = None,
           volume: Volume | None = None) -> tuple[list[Check], str]:
    """Export `model` at (batch, 3, height, width) (a clip model: (batch, 3, frames, height, width); a volume model:
    (batch, volume.channels, volume.depth, height, width)) to `path`, then load the file and check it against eager
    PyTorch on `verification_inputs` (random images from `seed`); (the checks, the input sizes the file takes).
    The file appears only once every check passed: ExportMismatchError (listing the checks) otherwise, and no
    file. A dynamic file's smallest side is the model's (`smallest_dynamic_side`): at BiFormer's 32 px the last
    stage is one pixel, whose convolutions torch.export cannot hold in the graph of the larger sizes (a volume
    model's height and width start at 33: padded to 32 voxels, its deepest norm would see one). on_stage is
    told each stage as it starts (an export with free sizes takes minutes on a CPU)."""
    stage = on_stage or (lambda text: None)
    if settings.dynamic and volume is None:
        stage("finding the smallest input side the model's graph holds")
    if volume is not None:  # padded to multiples of 32 inside: from 33 px on, the deepest map holds 2 voxels or more
        min_side = MIN_DYNAMIC_SIDE
    else:
        min_side = smallest_dynamic_side(model, frames is not None) if settings.dynamic else MIN_SIDE
    check_size(height, width, min_side)
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(*shape[:1], volume.channels if volume else 3, *shape[1:], generator=generator)
              for shape in verification_inputs(batch, height, width, settings.dynamic, min_side, frames,
                                               volume and volume.depth)]
    onnx_exporter = "the legacy ONNX exporter" if settings.legacy else "the dynamo ONNX exporter"
    exporter = {"onnx": onnx_exporter, "openvino": f"{onnx_exporter}, then OpenVINO's converter",
                "torchscript": "torch.jit.trace", "exported": "torch.export"}[settings.format]
    with _staged_output(path) as partial:
        stage(f"exporting with {exporter} at {tuple(inputs[0].shape)}" + (", sizes free" if settings.dynamic else ""))
        write(model, inputs[0], partial, settings, min_side, volume is not None)
        stage(f"checking the file against eager PyTorch on {len(inputs)} input(s)")
        run = load(partial, settings.format)
        checks = [compare(run, model, images) for images in inputs]
        if not all(check.passed for check in checks):
            raise ExportMismatchError(f"the exported file differs from eager PyTorch, so {os.fspath(path)!r} was not "
                                      f"written: " + "; ".join(map(str, checks)))
    return checks, settings.accepted_sizes(batch, height, width, min_side, frames, volume)

