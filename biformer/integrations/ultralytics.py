"""Bi-Level Routing Attention in Ultralytics YOLO: blocks that YOLO YAMLs can name, and YAMLs that use them.

    pip install "biformer[ultralytics]"

Importing this module registers the blocks with the installed ultralytics (`register()`; `unregister()` undoes it),
so that a YAML can name them, a trainer that re-parses the YAML finds them, and a checkpoint holding them (best.pt)
loads in any process that can import biformer. Ultralytics is AGPL-3.0: a model built from its code and these
blocks falls under its licence.

| YAML name | what it is | YAML arguments |
| --- | --- | --- |
| `BRABlock` | channel-preserving residual block: x + BRA(norm(x)), then x + MLP(norm(x)) | `[c2, heads, n_win, topk]` |
| `C2fBRA` | YOLOv8's C2f with BRA blocks as its inner blocks | `[c2, heads, n_win, topk, e]` |
| `C3k2BRA` | YOLO11's C3k2 with BRA blocks as its inner blocks | `[c2, heads, n_win, topk, e]` |
| `BiLevelRoutingAttention` | the tutorials' layer: the attention alone, its channels taken from the input | `[]` |

All are NCHW in and out and run on maps of any size (a map smaller than n_win uses fewer regions). `heads` defaults to
one head per 32 channels (BiFormer's head width), n_win to 7, topk to 4. The YAML string `c2` stands for the previous
layer's channels. `C2fBRA` and `C3k2BRA` get their input channels, width and depth scaling as ultralytics' own blocks
do: ultralytics builds the host block (C2f, C3k2) and this module swaps it for the BRA version of the same size.
"""
from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..data.cache import cache_root
from ..errors import UserError
from ..files import atomic_output
from ..models.biformer import Block
from ..ops import BiLevelRoutingAttention as RoutedAttention

try:
    import ultralytics
    from ultralytics.nn import tasks
    from ultralytics.nn.modules import C2f, C3k2
    import yaml  # ultralytics' own dependency
except ImportError as error:
    if error.name is None or not error.name.startswith("ultralytics"):
        raise
    raise ImportError("biformer's YOLO integration needs ultralytics: pip install 'biformer[ultralytics]'") from error

__all__ = ["BRABlock", "C2fBRA", "C3k2BRA", "TutorialRoutingAttention", "bra_yaml", "model_file", "register",
           "unregister", "write_bra_yaml"]

SUPPORTED_SERIES = "8.4"  # parse_model's rows and its host blocks (C2f, C3k2) as this module knows them
HEAD_WIDTH = 32  # channels per head when a YAML leaves `heads` out, as in BiFormer
WHERE = ("sppf", "neck", "p3", "p4", "p5")


class IntegrationError(UserError, ValueError):
    """A YAML, argument or installed ultralytics that this integration cannot use; the message names the fix."""


def _heads(channels: int, heads: int | None, block: str) -> int:
    heads = max(channels // HEAD_WIDTH, 1) if heads is None else heads
    if not isinstance(heads, int) or heads < 1 or channels % heads:
        raise IntegrationError(
            f"{block}: {channels} channels do not divide into heads={heads!r}; give a head count that divides "
            f"{channels} (e.g. {max(d for d in range(1, 9) if channels % d == 0)}) in the YAML arguments, or null "
            f"for one head per {HEAD_WIDTH} channels")
    return heads


class BRABlock(nn.Module):
    """x + BRA(norm(x)), then x + MLP(norm(x)) (BiFormer's block without its position conv); (B, C, H, W) in and out.

    Args:
        c: channels in and out (the YAML's `c2`: the previous layer's).
        heads: attention heads, dividing c; None: one per 32 channels.
        n_win: regions per side; topk: routed key regions per query region.
        mlp_ratio: the MLP's hidden width over c (BiFormer's 3).
        backend: force a BRA backend (see `biformer.ops.available_backends()`); None dispatches automatically.
    """

    def __init__(self, c: int, heads: int | None = None, n_win: int = 7, topk: int = 4, mlp_ratio: float = 3.0,
                 backend: str | None = None) -> None:
        super().__init__()
        attention = RoutedAttention(c, _heads(c, heads, "BRABlock"), n_win, topk, backend=backend)
        self.block = Block(c, attention, mlp_ratio, pos_embed=False, drop_path=0.0)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        return self.block(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _bra_blocks(c: int, n: int, heads: int | None, n_win: int, topk: int) -> nn.ModuleList:
    """The n inner blocks of a C2f-style block of hidden width c, as BRA blocks."""
    return nn.ModuleList(BRABlock(c, heads, n_win, topk) for _ in range(n))


class C2fBRA(C2f):
    """C2f (split, n inner blocks each feeding the next, concatenate, fuse) with BRA blocks as its inner blocks."""

    def __init__(self, c1: int, c2: int, n: int = 1, heads: int | None = None, n_win: int = 7, topk: int = 4,
                 e: float = 0.5) -> None:
        super().__init__(c1, c2, n, e=e)
        self.m = _bra_blocks(self.c, n, heads, n_win, topk)


class C3k2BRA(C3k2):
    """C3k2 (YOLO11's C2f) with BRA blocks as its inner blocks."""

    def __init__(self, c1: int, c2: int, n: int = 1, heads: int | None = None, n_win: int = 7, topk: int = 4,
                 e: float = 0.5) -> None:
        super().__init__(c1, c2, n, e=e)
        self.m = _bra_blocks(self.c, n, heads, n_win, topk)


class TutorialRoutingAttention(nn.Module):
    """The YAML name `BiLevelRoutingAttention` of the tutorials: BRA with its local context conv and no residual,
    (B, C, H, W) in and out, built at its first forward from the input's channels (ultralytics passes a foreign
    layer its YAML arguments only). Arguments follow the original layer's order after `dim`.

    Args:
        dim: the channels, if the YAML gives them (a patched parse_model's); they must match the input's.
        n_win, num_heads, topk: as in BiFormer's BiLevelRoutingAttention.
    """

    def __init__(self, dim: int | None = None, n_win: int = 7, num_heads: int = 8, topk: int = 4) -> None:
        super().__init__()
        self.dim, self.n_win, self.num_heads, self.topk = dim, n_win, num_heads, topk
        self.attention: RoutedAttention | None = None

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        if self.attention is None:
            self._build(x)
        return self.attention(x)

    def _build(self, x: Tensor) -> None:
        channels = x.shape[1]
        if self.dim is not None and self.dim != channels:
            raise IntegrationError(
                f"BiLevelRoutingAttention was given dim={self.dim} but its input has {channels} channels; write its "
                "YAML arguments as [] to take the channels from the input")
        heads = _heads(channels, self.num_heads, "BiLevelRoutingAttention")
        with torch.inference_mode(False):  # trainable parameters even if the first forward runs under inference mode
            self.attention = RoutedAttention(channels, heads, self.n_win, self.topk, channels_last=False).to(x.device)


# registration: the names a YAML can use, and the parse_model wrapper that sizes C2fBRA / C3k2BRA

YAML_NAMES: dict[str, type[nn.Module]] = {
    "BRABlock": BRABlock, "C2fBRA": C2fBRA, "C3k2BRA": C3k2BRA, "BiLevelRoutingAttention": TutorialRoutingAttention,
}
_HOSTS = {"C2fBRA": "C2f", "C3k2BRA": "C3k2"}  # our block -> the ultralytics block that parse_model sizes for it
_original_parse_model = getattr(tasks.parse_model, "__wrapped__", tasks.parse_model)  # ours if reloaded


def _check_version() -> None:
    version = ultralytics.__version__
    if not version.startswith(SUPPORTED_SERIES + "."):
        raise IntegrationError(
            f"ultralytics {version} is not a version biformer's YOLO integration knows (it supports "
            f"{SUPPORTED_SERIES}.x): pip install 'ultralytics>={SUPPORTED_SERIES},<8.5'")


def _bra_row_options(name: str, args: list) -> tuple[list, dict[str, Any]]:
    """A C2fBRA / C3k2BRA row's arguments [c2, heads, n_win, topk, e] -> (the host block's, the BRA options)."""
    if not 1 <= len(args) <= 5:
        raise IntegrationError(f"{name} takes the YAML arguments [c2, heads, n_win, topk, e] (all but c2 optional), "
                               f"got {args!r}")
    c2, heads, n_win, topk, e = [*args, *(None, 7, 4, 0.5)[len(args) - 1:]]
    host_args = [c2, False, 1, e] if _HOSTS[name] == "C2f" else [c2, False, e]  # shortcut / c3k: inner blocks only
    return host_args, {"heads": heads, "n_win": n_win, "topk": topk, "e": e}


@functools.wraps(_original_parse_model)
def parse_model(d: dict, ch: int, verbose: bool = True) -> tuple[nn.Sequential, list[int]]:
    """ultralytics' parse_model, with each C2fBRA / C3k2BRA row built as its host block and then swapped for ours."""
    d = copy.deepcopy(d)  # the caller keeps the YAML it gave (a trainer re-parses it)
    swaps: dict[int, tuple[type[nn.Module], dict[str, Any]]] = {}
    for index, row in enumerate(d.get("backbone", []) + d.get("head", [])):
        if len(row) == 4 and row[2] in _HOSTS:
            name = row[2]
            row[2], (row[3], options) = _HOSTS[name], _bra_row_options(name, list(row[3]))
            swaps[index] = (YAML_NAMES[name], options)
    model, save = _original_parse_model(d, ch, verbose)
    for index, (block, options) in swaps.items():
        host = model[index]
        swapped = block(host.cv1.conv.in_channels, host.cv2.conv.out_channels, len(host.m), **options)
        swapped.i, swapped.f = host.i, host.f
        swapped.type = f"{block.__module__}.{block.__qualname__}"
        swapped.np = sum(p.numel() for p in swapped.parameters())
        model[index] = swapped
    return model, save


def register() -> None:
    """Make the YAML names resolvable in ultralytics' parse_model (idempotent)."""
    _check_version()
    for name, block in YAML_NAMES.items():
        setattr(tasks, name, block)
    tasks.parse_model = parse_model


def unregister() -> None:
    """Undo `register()`: ultralytics' own parse_model, and none of our names."""
    tasks.parse_model = _original_parse_model
    for name, block in YAML_NAMES.items():
        if getattr(tasks, name, None) is block:
            delattr(tasks, name)


# YAMLs with BRA, generated from the installed ultralytics' own

def _host_name(rows: list[list]) -> str:
    names = {row[2] for row in rows}
    if "C3k2" in names:
        return "C3k2"
    if "C2f" in names:
        return "C2f"
    raise IntegrationError("the base YAML has neither C2f nor C3k2 blocks to put BRA into; use a YOLOv8 or YOLO11 "
                           "detection YAML such as yolov8n.yaml or yolo11n.yaml")


def _output_strides(rows: list[list]) -> list[float]:
    """Each row's output stride, from its strided convs, upsamplings and concatenations."""
    strides: list[float] = []
    for index, (source, _, module, args) in enumerate(rows):
        first = source[0] if isinstance(source, list) else source
        stride = 1.0 if index == 0 and first == -1 else strides[first if first >= 0 else index + first]
        if module in ("Conv", "ADown", "SCDown", "AConv", "GhostConv") and len(args) > 2 and isinstance(args[2], int):
            stride *= args[2]
        elif module == "nn.Upsample":
            stride /= args[1]
        strides.append(stride)
    return strides


def _insert_row(rows: list[list], at: int, row: list) -> list[list]:
    """`rows` with `row` inserted at index `at` and every `from` that points at or past it renumbered."""
    def renumber(source: int, index: int) -> int:
        absolute = source if source >= 0 else index + source
        moved = absolute + (absolute >= at)
        new_index = index + (index >= at)
        return moved if source >= 0 else moved - new_index

    out = []
    for index, (source, repeats, module, args) in enumerate(rows):
        sources = [renumber(s, index) for s in (source if isinstance(source, list) else [source])]
        out.append([sources if isinstance(source, list) else sources[0], repeats, module, args])
    return out[:at] + [row] + out[at:]


def bra_yaml(base: str = "yolov8n.yaml", where: str | Sequence[str] = ("sppf", "neck")) -> dict:
    """A YOLO model dict with BRA, from the installed ultralytics' YAML `base` (its scale letter picks the scale).

    where: any of "sppf" (a BRABlock after SPPF), "neck" (the head's C2f / C3k2 become C2fBRA / C3k2BRA), "p3",
    "p4", "p5" (the C2f / C3k2 blocks at that stride, in backbone and head).
    """
    places = (where,) if isinstance(where, str) else tuple(where)
    unknown = [place for place in places if place not in WHERE]
    if unknown or not places:
        raise IntegrationError(f"where={where!r}: choose one or more of {', '.join(WHERE)}")
    try:
        d = tasks.yaml_model_load(base)
    except FileNotFoundError as error:
        raise IntegrationError(f"no ultralytics model YAML {base!r}; give one of its detection YAMLs such as "
                               "yolov8n.yaml or yolo11n.yaml") from error
    d.pop("yaml_file", None)
    rows = d["backbone"] + d["head"]
    n_backbone = len(d["backbone"])
    host = _host_name(rows)
    bra_name = {"C2f": "C2fBRA", "C3k2": "C3k2BRA"}[host]
    strides = _output_strides(rows)
    levels = {f"p{level}": 2.0**level for level in (3, 4, 5)}
    for index, (_, _, module, args) in enumerate(rows):
        at_level = any(strides[index] == levels[place] for place in places if place in levels)
        if module == host and (at_level or ("neck" in places and index >= n_backbone)):
            e = args[2] if host == "C3k2" and len(args) > 2 else 0.5
            rows[index] = [rows[index][0], rows[index][1], bra_name, [args[0], None, 7, 4, e]]
    if "sppf" in places:
        sppf = next((i for i, row in enumerate(rows) if row[2] == "SPPF"), None)
        if sppf is None:
            raise IntegrationError(f"{base} has no SPPF layer to put a BRABlock after; choose where from "
                                   f"{', '.join(p for p in WHERE if p != 'sppf')}")
        rows = _insert_row(rows, sppf + 1, [-1, 1, "BRABlock", ["c2"]])
        n_backbone += sppf < n_backbone
    d["backbone"], d["head"] = rows[:n_backbone], rows[n_backbone:]
    return d


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).removesuffix("...\n").strip()


GENERATED_NAME = re.compile(r"^(?P<base>yolo[\w.]*?)-bra(?P<where>(-[a-z0-9]+)*)\.yaml$")


def write_bra_yaml(name: str, folder: str | Path) -> Path:
    """Write the YAML that the model name `name` stands for, `<base>-bra[-<where>...].yaml` (e.g.
    yolov8n-bra.yaml: BRA after SPPF and in the neck; yolo11s-bra-p5.yaml), into `folder`; return its path."""
    match = GENERATED_NAME.match(name)
    if match is None:
        raise IntegrationError(f"{name!r} is no generated model name; write it as <ultralytics YAML>-bra[-where].yaml, "
                               f"e.g. yolov8n-bra.yaml or yolo11n-bra-neck.yaml, with where from {', '.join(WHERE)}")
    where = tuple(match["where"].split("-")[1:]) or ("sppf", "neck")
    base = f"{match['base']}.yaml"
    model = bra_yaml(base, where)
    lines = [f"# {name}: ultralytics {ultralytics.__version__}'s {base} with BRA ({', '.join(where)}), "
             "written by biformer.integrations.ultralytics"]
    for key, value in model.items():  # one flow-style line per layer and per scale, as ultralytics writes its YAMLs
        if isinstance(value, list):
            lines += [f"{key}:", *(f"  - {_flow(row)}" for row in value)]
        elif isinstance(value, dict):
            lines += [f"{key}:", *(f"  {_flow(k)}: {_flow(v)}" for k, v in value.items())]
        else:
            lines.append(f"{key}: {_flow(value)}")
    path = Path(folder) / name
    with atomic_output(path) as temp:
        temp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def model_file(name: str) -> str:
    """What a `model=` value names: the value itself where such a file exists or it is no generated name, else the
    generated YAML (see `write_bra_yaml`), written into the cache ($BIFORMER_CACHE/yolo-models)."""
    if Path(name).exists() or not GENERATED_NAME.match(Path(name).name):
        return name
    folder = cache_root() / "yolo-models"
    folder.mkdir(parents=True, exist_ok=True)
    return str(write_bra_yaml(Path(name).name, folder))


register()
