"""`biformer ablate`: BRA against hand-crafted sparse attentions in one layout, trained with one recipe.

A configuration is a token mixer for the stages with a positive top-k (`BiFormer(attention=...)`),
BRA once per top-k. `--topk K` is the first stage's top-k; the later BRA stages keep the variant's
ratios (STL's 1:4:16, which holds the keys per query constant while regions shrink 4x a stage),
each capped at its stage's region count. Every configuration trains once per seed through the
training engine into OUTPUT/<configuration>/seed<k>/. A finished run leaves `result.json` there,
so a rerun skips it; a stopped one resumes from its last epoch. Parameters, FLOPs (the counter of
`biformer flops`, multiply-adds) and images/s (inference and a training step, all configurations
measured interleaved, random weights) are measured once and kept in OUTPUT/measurements.json.
The reported accuracy is val top-1 after the last epoch (no selection on the validation set),
mean and sample standard deviation over seeds.

Under torchrun the runs are dealt round-robin to the ranks, each training its own alone; rank 0
then measures and writes the table.
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..checkpoints.weights import read_metadata
from ..config import TrainConfig, builtin_defaults, parse_model_kwargs, setting_changes
from ..errors import UserError
from ..files import atomic_output
from ..measure import format_table, write_csv
from ..models.mixers import MIXERS
from ..recipes import resolve
from ..runtime import resolve_device
from ..training import run_folder
from .model import ModelEntry, bench_models

ATTENTIONS = ("bra", *MIXERS)
RESULT = "result.json"
MEASUREMENTS = "measurements.json"
COLUMNS = ("attention", "params_m", "gflops", "infer_img_s", "train_img_s", "top1_mean", "top1_std", "seeds")


@dataclass(frozen=True)
class Configuration:
    """One column of the comparison: a name and the model's keyword arguments (as --model-kwargs)."""

    label: str
    model_kwargs: tuple[str, ...]


@dataclass(frozen=True)
class AblationOptions:
    data: str = "digits"
    model: str = "biformer_stl"
    attentions: tuple[str, ...] = ATTENTIONS
    topks: tuple[int, ...] = (1, 4, 16)
    seeds: int = 3
    epochs: int = 30
    img_size: int = 224
    batch_size: int = 64
    lr: float = 2e-3
    warmup_epochs: int = 2
    output: Path = Path("runs/ablate")
    device: str | None = None
    workers: int = 0
    repeats: int = 5  # interleaved timing rounds


def configurations(model: str, attentions: tuple[str, ...], topks: tuple[int, ...]) -> list[Configuration]:
    """The configurations to compare; UserError for an unknown mixer, a bad top-k or a model without BiFormer's
    `attention=` argument."""
    import timm

    from ..models.biformer import BiFormer

    unknown = [name for name in attentions if name not in ATTENTIONS]
    if unknown or not attentions:
        raise UserError(f"--attention {','.join(attentions)}: choose from {','.join(ATTENTIONS)}")
    if "bra" in attentions and (not topks or any(k < 1 for k in topks)):
        raise UserError(f"--topk {','.join(map(str, topks))}: give one or more top-k values of at least 1")
    if not timm.is_model(model):
        base = None
    else:
        with torch.device("meta"):  # only its top-k schedule is read: no weights need initializing
            base = timm.create_model(model)
    if not isinstance(base, BiFormer):
        raise UserError(f"--model {model!r}: the ablation swaps BiFormer's token mixers; choose a biformer_* "
                        "variant (biformer_stl is the paper's layout, biformer_stl_nano its small version)")
    first = next(k for k in base.topks if isinstance(k, int))
    result = []
    for attention in dict.fromkeys(attentions):  # each once, in the order given
        if attention != "bra":
            result.append(Configuration(attention, (f"attention={attention}",)))
            continue
        for k in dict.fromkeys(topks):
            stage_topks = [max(1, round(k * t / first)) if isinstance(t, int) else t for t in base.topks]
            result.append(Configuration(f"bra-k{k}", ("attention=bra", "topks=" + ",".join(map(str, stage_topks)))))
    return result


def _json_normal(value: Any) -> Any:
    """value as it reads back from JSON (tuples become lists, paths text)."""
    return json.loads(json.dumps(value, default=str))


def train_configuration(options: AblationOptions, configuration: Configuration, seed: int) -> dict[str, Any]:
    """Train one (configuration, seed) run unless its folder holds the finished run; its result."""
    from ..training.engine import train

    folder = options.output / configuration.label / f"seed{seed}"
    resolved = resolve(TrainConfig(
        data=options.data, model=options.model, model_kwargs=configuration.model_kwargs, epochs=options.epochs,
        img_size=options.img_size, batch_size=options.batch_size, lr=options.lr,
        warmup_epochs=options.warmup_epochs, seed=seed, output=folder, device=options.device,
        workers=options.workers, tensorboard=False, resume=(folder / run_folder.STATE).exists(),
    ))
    settings = _json_normal(resolved.config.run_options())
    if (folder / RESULT).exists():
        result = json.loads((folder / RESULT).read_text())
        # as JSON reads them back, with options newer than the finished run at their defaults
        changed = setting_changes({**_json_normal(builtin_defaults()), **result["settings"]}, settings)
        if changed:
            raise UserError(f"{folder} holds a finished run with other settings ({', '.join(changed)}); "
                            "use the same settings, or another --output")
        print(f"{configuration.label} seed {seed}: done before, val top-1 {result['val_top1']:.2f}%", flush=True)
        return result
    print(f"== {configuration.label} seed {seed} ({' '.join(configuration.model_kwargs)}) -> {folder}", flush=True)
    row = train(resolved, alone=True)
    classes = read_metadata(folder / run_folder.WEIGHTS)["classes"]
    result = {"settings": settings, "val_top1": row["val_top1"], "num_classes": len(classes),
              "rank": int(os.environ.get("RANK", "0"))}
    with atomic_output(folder / RESULT) as temp:
        temp.write_text(json.dumps(result, indent=1))
    return result


def measure(options: AblationOptions, configurations: list[Configuration], num_classes: int) -> dict[str, dict]:
    """Parameters, GFLOPs and images/s per configuration, from OUTPUT/measurements.json when it was taken
    with the same settings, else measured now (interleaved) and saved there."""
    import timm

    device = resolve_device(options.device)
    settings = _json_normal({
        "model": options.model, "img_size": options.img_size, "batch": options.batch_size, "repeats": options.repeats,
        "device": str(device), "threads": torch.get_num_threads(), "num_classes": num_classes,
        "configurations": {c.label: c.model_kwargs for c in configurations},
    })
    path = options.output / MEASUREMENTS
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["settings"] == settings:
            return saved["rows"]
    parsed = {c.label: parse_model_kwargs(c.model_kwargs) for c in configurations}
    models = {ModelEntry(label): timm.create_model(options.model, num_classes=num_classes, **kwargs).to(device)
              for label, kwargs in parsed.items()}
    rows = bench_models(models, device, batch=options.batch_size, img_size=options.img_size,
                        repeats=options.repeats, warmup=1, memory=False)
    measured = {row["model"]: {key: row[key] for key in ("params_m", "gflops", "infer_img_s", "train_img_s")}
                for row in rows}
    with atomic_output(path) as temp:
        temp.write_text(json.dumps({"settings": settings, "rows": measured}, indent=1))
    return measured


def summarize(configurations: list[Configuration], results: dict[str, list[dict]],
              measured: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    for configuration in configurations:
        top1 = [result["val_top1"] for result in results[configuration.label]]
        rows.append({"attention": configuration.label, **measured[configuration.label],
                     "top1_mean": statistics.mean(top1), "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                     "seeds": len(top1)})
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The table as printed: top-1 as mean ± std."""
    shown = [{**row, "val top-1 %": f"{row['top1_mean']:.2f} ± {row['top1_std']:.2f}"} for row in rows]
    return format_table(shown, ("attention", "params_m", "gflops", "infer_img_s", "train_img_s", "val top-1 %",
                                "seeds"))


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy against GFLOPs (error bars: std over seeds), and throughput per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy, speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = "osD^vP*Xh"  # mixers of equal FLOPs share an x: marker and legend tell them apart
    for index, row in enumerate(rows):
        accuracy.errorbar(row["gflops"], row["top1_mean"], yerr=row["top1_std"], fmt=markers[index % len(markers)],
                          capsize=3, label=row["attention"], alpha=0.85)
    accuracy.legend(fontsize=8)
    accuracy.set(xlabel="GFLOPs per image (multiply-adds)", ylabel="val top-1 % (mean ± std over seeds)",
                 title="accuracy against FLOPs")
    accuracy.grid(alpha=0.3)
    positions = range(len(rows))
    speed.barh([p - 0.2 for p in positions], [row["infer_img_s"] for row in rows], height=0.4, label="inference")
    speed.barh([p + 0.2 for p in positions], [row["train_img_s"] for row in rows], height=0.4, label="training step")
    speed.set_yticks(list(positions), [row["attention"] for row in rows])
    speed.invert_yaxis()
    speed.set(xlabel="images/s", title="throughput")
    speed.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    figure.suptitle(title)
    figure.tight_layout()
    with atomic_output(path) as temp:
        figure.savefig(temp, format="png", dpi=110)
    plt.close(figure)


def run_ablation(options: AblationOptions) -> list[dict[str, Any]] | None:
    """Train every (configuration, seed) not done yet, then measure; the table's rows (None on ranks > 0)."""
    configs = configurations(options.model, options.attentions, options.topks)
    runs = [(configuration, seed) for configuration in configs for seed in range(options.seeds)]
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # only to wait for each other: every rank trains its runs alone
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    try:
        for index, (configuration, seed) in enumerate(runs):
            if index % world == rank:
                train_configuration(options, configuration, seed)
        if world > 1:
            dist.barrier()
        if rank != 0:
            return None
        results: dict[str, list[dict]] = {c.label: [] for c in configs}
        for configuration, seed in runs:
            result_path = options.output / configuration.label / f"seed{seed}" / RESULT
            results[configuration.label].append(json.loads(result_path.read_text()))
        measured = measure(options, configs, results[configs[0].label][0]["num_classes"])
    finally:
        if world > 1:
            dist.destroy_process_group()
    rows = summarize(configs, results, measured)
    write_csv(rows, COLUMNS, str(options.output / "ablation.csv"))
    plot(rows, options.output / "ablation.png",
         f"{options.model} on {options.data} at {options.img_size} px, {options.epochs} epochs, {options.seeds} seed(s)")
    return rows
