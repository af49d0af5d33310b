"""Recipes, schedules, parameter groups, gradient accumulation and --iters runs (`biformer train`).

The oracles are written here: mmcv's step and poly formulas with its linear warm-up, timm's cosine scheduler, the
configs' weight-decay rules, and an uninterrupted run or a run without accumulation.
"""
import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from biformer.cli import main
from biformer.config import TrainConfig
from biformer.dense import create_detection_model
from biformer.errors import UserError
from biformer.optim.param_groups import parameter_groups
from biformer.recipes import RECIPES, resolve
from biformer.tasks.registry import TASKS

HOOKED_TRAIN = Path(__file__).with_name("hooked_train.py")
QUIET = ["--no-tensorboard"]


def read_schedule(folder: Path) -> tuple[list[str], list[dict[str, float]]]:
    lines = (folder / "schedule.csv").read_text().splitlines()
    comments = [line for line in lines if line.startswith("#")]
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    return comments, [{key: float(value) for key, value in row.items()} for row in rows]


def close(got: float, expected: float) -> bool:
    return abs(got - expected) <= 1e-9 * abs(expected) or got == expected


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------

def test_recipes_hold_the_original_configs():
    """The settings read from the release's configs, written out here (see each recipe's `source`)."""
    coco = {name: resolve(TrainConfig(model=f"{name}_biformer_small")).config for name in ("retinanet", "maskrcnn")}
    for config in coco.values():
        assert (config.epochs, config.sched, config.milestones, config.decay_rate, config.lr_per_epoch) == (
            12, "step", (8, 11), 0.1, True)
        assert (config.warmup_iters, config.warmup_rule, config.warmup_ratio) == (500, "mmcv", 0.001)
        assert (config.opt, config.lr, config.batch_size, config.img_size) == ("adamw", 1e-4, 2, 800)
    assert (coco["retinanet"].weight_decay, coco["retinanet"].decay_rule) == (1e-4, "all")
    assert (coco["maskrcnn"].weight_decay, coco["maskrcnn"].decay_rule) == (0.05, "mmcv")
    sfpn = resolve(TrainConfig(model="sfpn_biformer_small")).config
    assert (sfpn.iters, sfpn.sched, sfpn.warmup_iters, sfpn.warmup_ratio, sfpn.min_lr) == (
        80_000, "cosine", 1000, 0.1, 2e-4 * 1e-8)
    assert (sfpn.lr, sfpn.weight_decay, sfpn.decay_rule, sfpn.batch_size, sfpn.img_size) == (2e-4, 1e-4, "all", 4, 512)
    upernet = resolve(TrainConfig(model="upernet_biformer_base")).config
    assert (upernet.iters, upernet.sched, upernet.poly_power, upernet.min_lr) == (160_000, "poly", 1.0, 0.0)
    assert (upernet.warmup_iters, upernet.warmup_ratio, upernet.lr, upernet.weight_decay, upernet.decay_rule) == (
        1500, 1e-6, 6e-5, 0.01, "mmcv")
    in1k = resolve(TrainConfig(model="biformer_small", recipe="in1k")).config
    assert (in1k.epochs, in1k.warmup_epochs, in1k.min_lr, in1k.lr * in1k.warmup_ratio) == (300, 5, 1e-5, 1e-6)
    assert in1k.lr == pytest.approx(5e-4 * 128 * 8 / 512)  # main.py's rule at the README's 8 GPUs x 128
    assert (in1k.aa, in1k.reprob, in1k.mixup, in1k.cutmix, in1k.smoothing, in1k.aug_repeats) == (
        "rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0.1, 3)
    assert (in1k.drop_path, in1k.model_ema, in1k.ema_decay) == (0.15, True, 0.99996)
    assert resolve(TrainConfig(model="biformer_tiny", recipe="in1k")).config.drop_path == 0.1


def test_each_recipe_names_real_options_and_heads():
    options = {name for name, spec in TrainConfig.__dataclass_fields__.items() if spec.metadata.get("recipe")}
    heads = {task.name: set(task.heads) for task in TASKS}
    for recipe in RECIPES.values():
        assert set(recipe.settings_all) <= options, recipe.name
        for part, values in recipe.settings_by_part.items():
            assert set(values) <= options, (recipe.name, part)
        assert set(recipe.default_for) <= heads[recipe.task], recipe.name


def test_sources_and_alternatives():
    config = resolve(TrainConfig(model="maskrcnn_biformer_tiny", lr=2e-4, epochs=1)).config
    assert (config.sources["lr"], config.sources["sched"], config.sources["aa"]) == ("given", "recipe coco-1x", "default")
    assert config.milestones == (8, 11)  # an --epochs run keeps the recipe's epoch milestones
    by_iters = resolve(TrainConfig(model="maskrcnn_biformer_tiny", iters=40)).config
    assert by_iters.milestones == () and by_iters.epochs == 30 and by_iters.sources["epochs"] == "default"
    shorter = resolve(TrainConfig(model="upernet_biformer_tiny", iters=100)).config
    assert (shorter.iters, shorter.val_every) == (100, 16_000)  # same unit: the recipe's --val-every stays
    assert resolve(TrainConfig(model="upernet_biformer_tiny", epochs=2)).config.val_every is None
    assert resolve(TrainConfig(model="upernet_biformer_tiny", recipe="none")).config.sched == "cosine"
    with pytest.raises(UserError, match="--epochs and --iters are alternatives"):
        resolve(TrainConfig(epochs=2, iters=5)).config


# ---------------------------------------------------------------------------------------------
# schedules against mmcv's formulas and timm's scheduler
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_coco_1x_schedule_is_mmcv_step_with_linear_warmup(tmp_path):
    """mmdet's schedule_1x: lr x 0.1 ** (milestones passed by the epoch index), warm-up by iteration from 0.001."""
    out = tmp_path / "coco"
    assert main(["train", "--model", "maskrcnn_biformer_nano", "--data", "digit-scenes", "--batch-size", "8",
                 "--dry-run", "--output", str(out), *QUIET]) == 0
    summary = json.loads((out / "config.json").read_text())
    comments, rows = read_schedule(out)
    per_epoch, lr = summary["steps_per_epoch"], 1e-4
    assert len(rows) == summary["total_steps"] == 12 * per_epoch and per_epoch * 8 < 500 < per_epoch * 9
    for row in rows:
        step = int(row["step"])
        regular = lr * 0.1 ** sum(step // per_epoch >= milestone for milestone in (8, 11))
        expected = regular * (1 - (1 - step / 500) * (1 - 0.001)) if step < 500 else regular
        assert close(row["lr_group0"], expected) and close(row["lr_group1"], expected), row
        assert row["epoch"] == step // per_epoch + 1
    assert comments[0].startswith("# group 0: weight_decay 0.05,") and comments[1].startswith("# group 1: weight_decay 0.0,")


@pytest.mark.slow
def test_ade20k_upernet_schedule_is_mmcv_poly_with_linear_warmup(tmp_path):
    """mmseg's poly (power 1, min_lr 0) by iteration, warm-up over 1500 iterations from 1e-6 of the poly lr."""
    out = tmp_path / "upernet"
    assert main(["train", "--model", "upernet_biformer_nano", "--data", "digit-scenes", "--iters", "2000",
                 "--dry-run", "--output", str(out), *QUIET]) == 0
    _, rows = read_schedule(out)
    assert len(rows) == 2000
    for row in rows:
        step = int(row["step"])
        regular = (6e-5 - 0.0) * (1 - step / 2000) ** 1.0 + 0.0
        expected = regular * (1 - (1 - step / 1500) * (1 - 1e-6)) if step < 1500 else regular
        assert close(row["lr_group0"], expected), row


@pytest.mark.slow
def test_in1k_schedule_is_timms_epoch_stepped_cosine(tmp_path):
    from timm.scheduler import CosineLRScheduler

    out = tmp_path / "in1k"
    assert main(["train", "--model", "biformer_nano", "--data", "digits", "--recipe", "in1k", "--epochs", "12",
                 "--batch-size", "64", "--dry-run", "--output", str(out), *QUIET]) == 0
    summary = json.loads((out / "config.json").read_text())
    _, rows = read_schedule(out)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    timm_schedule = CosineLRScheduler(optimizer, t_initial=12, lr_min=1e-5, warmup_lr_init=1e-6, warmup_t=5,
                                      t_in_epochs=True)
    assert len(rows) == 12 * summary["steps_per_epoch"]
    for row in rows:
        epoch = int(row["epoch"]) - 1
        assert close(row["lr_group0"], timm_schedule._get_lr(epoch)[0]), row


# ---------------------------------------------------------------------------------------------
# parameter groups
# ---------------------------------------------------------------------------------------------

def test_maskrcnn_coco_1x_decay_rule():
    """mmdet's custom_keys: no decay for names containing norm, absolute_pos_embed or relative_position_bias_table;
    everything else decays, biases and BatchNorm layers with other names included."""
    config = resolve(TrainConfig(model="maskrcnn_biformer_small")).config
    model = create_detection_model("maskrcnn_biformer_small", 80)
    groups = parameter_groups(model, config.weight_decay, config.decay_rule)
    no_decay = {name for group in groups if group.weight_decay == 0 for name in group.names}
    expected = {name for name, _ in model.named_parameters()
                if "norm" in name or "absolute_pos_embed" in name or "relative_position_bias_table" in name}
    assert no_decay == expected and len(expected) > 0
    decayed = {name for group in groups if group.weight_decay == 0.05 for name in group.names}
    assert any(name.endswith(".bias") for name in decayed)
    # BatchNorm layers named without "norm" decay, as the original's downsample_layers.i.1 do: ours are stem.1, stem.4
    # and stages.i.downsample.1; its extra_norms.i (ours: norms.i) take none
    assert {"backbone.body.stem.1.weight", "backbone.body.stages.1.downsample.1.weight"} <= decayed
    assert "backbone.body.norms.0.weight" in no_decay


def test_in1k_decay_rule():
    """timm's rule: no decay for 1-D parameters, names ending in .bias and exact no_weight_decay() names."""
    import timm

    config = resolve(TrainConfig(model="biformer_small", recipe="in1k")).config
    model = timm.create_model("biformer_small")
    groups = parameter_groups(model, config.weight_decay, config.decay_rule)
    no_decay = {name for group in groups if group.weight_decay == 0 for name in group.names}
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    expected = {name for name, parameter in model.named_parameters()
                if parameter.ndim <= 1 or name.endswith(".bias") or name in skip}
    assert no_decay == expected
    assert any(name.endswith("pos_embed.weight") for group in groups if group.weight_decay for name in group.names)


# ---------------------------------------------------------------------------------------------
# accumulation, --iters resume, bad input
# ---------------------------------------------------------------------------------------------

# a ViT (LayerNorm only: no batch statistics) on the digits, one optimizer step
VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32", "patch_size=8", "--img-size", "32",
       "--data", "digits", "--iters", "1", "--recipe", "none", *QUIET]


def assert_same_weights(first: Path, second: Path, atol: float) -> None:
    expected, got = load_file(first / "last.safetensors"), load_file(second / "last.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=atol, rtol=0, msg=key)


@pytest.mark.slow
def test_accumulation_equals_the_larger_batch(tmp_path):
    assert main(["train", *VIT, "--batch-size", "8", "--output", str(tmp_path / "b8")]) == 0
    assert main(["train", *VIT, "--batch-size", "2", "--accum-steps", "4", "--output", str(tmp_path / "b2x4")]) == 0
    assert_same_weights(tmp_path / "b8", tmp_path / "b2x4", 1e-5)
    # the comparison can tell batches apart: batch 2 alone (a quarter of the samples) lands elsewhere
    assert main(["train", *VIT, "--batch-size", "2", "--output", str(tmp_path / "b2")]) == 0
    with pytest.raises(AssertionError):
        assert_same_weights(tmp_path / "b8", tmp_path / "b2", 1e-5)


@pytest.mark.slow
def test_accumulation_under_torchrun_equals_one_process(tmp_path):
    """2 ranks x batch 2 x 4 micro-steps = one process at batch 16: the same samples, one averaged gradient."""
    assert main(["train", *VIT, "--batch-size", "16", "--output", str(tmp_path / "alone")]) == 0
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531", "-m", "biformer",
         "train", *VIT, "--batch-size", "2", "--accum-steps", "4", "--output", str(tmp_path / "ranks")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "ranks" / "config.json").read_text())["global_batch"] == 16
    assert_same_weights(tmp_path / "alone", tmp_path / "ranks", 1e-5)


@pytest.mark.slow
def test_iters_run_killed_and_resumed_is_bitwise_equal(tmp_path):
    """Killed by SIGKILL after its first mid-epoch validation (step 10 of 89 per epoch), resumed at step 10."""
    common = ["--model", "biformer_nano", "--img-size", "32", "--data", "digits", "--iters", "30", "--val-every", "10",
              "--batch-size", "8", "--accum-steps", "2", "--model-ema", "--aa", "rand-m9-mstd0.5", "--reprob", "0.25",
              "--aug-repeats", "2", *QUIET]
    reference = tmp_path / "reference"
    assert main(["train", *common, "--output", str(reference)]) == 0
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, str(HOOKED_TRAIN), "--kill-at-step", "15", *common, "--output", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [row["iter"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [10]
    resumed = subprocess.run([sys.executable, "-m", "biformer", "train", *common, "--output", str(out), "--resume"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing at iter 11" in resumed.stdout
    for name in ("last.safetensors", "last_ema.safetensors"):
        expected, got = load_file(reference / name), load_file(out / name)
        assert all(torch.equal(expected[key], got[key]) for key in expected), name
    strip = lambda folder: [{k: v for k, v in json.loads(line).items() if not k.endswith(("_s", "_per_s"))}  # noqa: E731
                            for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert strip(out) == strip(reference) and [row["iter"] for row in strip(out)] == [10, 20, 30]


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "coco-2x"], "--recipe 'coco-2x' is not a recipe; choose one of in1k, in1k-tl, coco-1x, ade20k-sfpn, "
                              "ade20k-upernet or none"),
    (["--recipe", "coco-1x"], "--recipe coco-1x trains detection models; biformer_nano is a classification model: "
                              "use in1k, in1k-tl or none"),
    (["--scale-lr"], "--scale-lr scales --lr by the global batch over the recipe's: give --recipe"),
    (["--val-every", "5"], "--val-every counts steps of an --iters run"),
    (["--iters", "5", "--epochs", "2"], "--epochs and --iters are alternatives: give one"),
])
def test_recipe_mistakes_are_one_line_errors(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--data", "digits", "--output", str(out), *QUIET, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_recipes_command_lists_every_setting(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for recipe in RECIPES.values():
        assert f"{recipe.name}: {recipe.summary}" in out
    assert "--milestones (8, 11)" in out and "for maskrcnn: --weight-decay 0.05, --decay-rule 'mmcv'" in out
    assert main(["recipes", "coco-2x"]) == 2
    assert "recipe 'coco-2x' is not one of in1k, in1k-tl, coco-1x" in capsys.readouterr().err


@pytest.mark.slow
def test_a_segmentation_model_trains_by_iters_under_its_recipe(tmp_path, capsys):
    """sfpn_* under ade20k-sfpn (its default), shortened with --iters: validations by step, the recipe's schedule."""
    out = tmp_path / "sfpn"
    assert main(["train", "--model", "sfpn_biformer_nano", "--data", "digit-scenes", "--img-size", "64",
                 "--batch-size", "4", "--iters", "6", "--val-every", "3", "--output", str(out), *QUIET]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"--sched +'cosine'", printed) and "recipe ade20k-sfpn" in printed
    assert "note: recipe ade20k-sfpn trains with a global batch of 32" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["iter"] for row in rows] == [3, 6] and all("val_miou" in row for row in rows)
    _, schedule = read_schedule(out)
    # mmcv's CosineAnnealing over the 6 steps, inside the recipe's 1000-step linear warm-up from 0.1
    low = 2e-4 * 1e-8
    expected = [(low + 0.5 * (2e-4 - low) * (1 + math.cos(math.pi * step / 6))) * (1 - (1 - step / 1000) * (1 - 0.1))
                for step in range(6)]
    assert len(schedule) == 6 and all(close(row["lr_group0"], lr) for row, lr in zip(schedule, expected))
    assert rows[-1]["lr_group0"] == schedule[5]["lr_group0"]
