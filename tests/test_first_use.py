"""What a new user met on a fresh clone: data loss in `convert`, metadata lost on the way, fine-tuning with another
checkpoint's statistics, exported files given as checkpoints, the start-up table and the run folder of a dry run,
a warm-up longer than the run, a predict run with nothing predicted. Each test failed before its fix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from biformer.checkpoints.weights import read_metadata
from biformer.cli import main
from biformer.data.digits import digit_image

DIGITS = ["--data", "digits", "--model", "biformer_nano", "--img-size", "32", "--no-tensorboard"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """best.safetensors of a one-epoch biformer_nano on the digits."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *DIGITS, "--epochs", "1", "--warmup-epochs", "0", "--output", str(out)]) == 0
    return out / "best.safetensors"


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"biformer {command}: error:") and "Traceback" not in err and err.count("\n") == 1, err
    return err


# 1. convert onto its own input

@pytest.mark.slow
def test_convert_refuses_to_write_over_its_input(trained, tmp_path, capsys):
    copy = tmp_path / "weights.safetensors"
    copy.write_bytes(trained.read_bytes())
    link = tmp_path / "link.safetensors"
    link.symlink_to(copy)
    for output in (copy, link):
        assert main(["convert", str(copy), str(output)]) == 2
        assert "is the input file" in one_line_error(capsys, "convert")
    assert copy.read_bytes() == trained.read_bytes()


# 3. convert keeps what the trainer recorded

@pytest.mark.slow
def test_convert_keeps_the_training_metadata_both_ways(trained, tmp_path, capsys):
    release, back = tmp_path / "release.pth", tmp_path / "back.safetensors"
    assert main(["convert", str(trained), str(release)]) == 0
    assert main(["convert", str(release), str(back)]) == 0
    source = read_metadata(trained)
    for converted in (release, back):
        metadata = read_metadata(converted)
        for key in ("classes", "img_size", "mean", "std", "crop_pct", "task", "model"):
            assert metadata[key] == source[key], (converted, key)
    assert any(key.startswith("downsample_layers") for key in torch.load(release, weights_only=True)["model"])
    image = tmp_path / "seven.png"
    digit_image(7).resize((32, 32)).save(image)
    capsys.readouterr()
    answers = []
    for weights in (trained, release, back):
        assert main(["predict", str(image), "--checkpoint", str(weights), "--json"]) == 0
        answers.append(json.loads(capsys.readouterr().out)["predictions"])
    assert answers[0] == answers[1] == answers[2]  # the same preprocessing, so the same probabilities


# 9. an exported model given where a checkpoint belongs

def test_exported_models_are_named_as_such(tmp_path, capsys):
    image = tmp_path / "x.png"
    digit_image(1).save(image)
    scripted = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    onnx, program = tmp_path / "model.onnx", tmp_path / "model.pt2"
    onnx.write_bytes(b"\x08\x07")  # the kind is told by the name: no model is read
    program.write_bytes(b"PK")
    for path, kind in ((onnx, "an ONNX model"), (program, "a torch.export program"), (scripted, "a TorchScript")):
        for argv in (["predict", str(image), "--checkpoint", str(path)], ["predict", str(image), "--checkpoint",
                     str(path), "--model", "biformer_nano"], ["eval", "--checkpoint", str(path)]):
            assert main(argv) == 2
            assert kind in one_line_error(capsys, argv[0]), argv


# 8. a warm-up longer than the run

def test_a_warm_up_longer_than_the_run_is_refused_when_given_and_noted_otherwise(tmp_path, capsys):
    assert main(["train", *DIGITS, "--epochs", "1", "--warmup-epochs", "5", "--dry-run", "--output",
                 str(tmp_path / "given")]) == 2
    message = one_line_error(capsys, "train")
    assert "--warmup-epochs 5" in message and "peaks at" in message and not (tmp_path / "given").exists()
    # the default warm-up (2 epochs) of a one-epoch trial run: trained, with the real peak said at start-up
    assert main(["train", *DIGITS, "--epochs", "1", "--dry-run", "--output", str(tmp_path / "default")]) == 0
    out = capsys.readouterr().out
    assert "note: the warm-up of" in out and "(warm-up: default)" in out
    peak = float(out.split("the lr peaks at ")[1].split(",")[0])
    assert 0 < peak < 2e-3  # below --lr 0.002: about half of it after one of two warm-up epochs
    # a caller's settings (ablate's, a Python user's) are noted too: only what a user typed is refused
    from biformer.config import TrainConfig
    from biformer.recipes import resolve
    from biformer.runtime import DistEnv
    from biformer.training.engine import Callbacks, setup

    config = TrainConfig(data="digits", model="biformer_nano", epochs=1, warmup_epochs=5, dry_run=True,
                         tensorboard=False, output=tmp_path / "python")
    setup(resolve(config), DistEnv(), Callbacks())
    assert "--warmup-epochs 5) is longer than the run" in capsys.readouterr().out


# 11. predict with nothing predicted

def test_predict_with_no_readable_image_is_a_user_error(trained, tmp_path, capsys):
    for name in ("a.png", "b.jpg"):
        (tmp_path / name).write_bytes(b"not an image")
    assert main(["predict", str(tmp_path), "--checkpoint", str(trained)]) == 2
    err = capsys.readouterr().err
    assert "skipping unreadable image" in err and "none of the 2 image(s) could be predicted (" in err


# 12. typed options at their default values, 13. the files of a dry run

def test_typed_options_read_as_given_and_a_dry_run_writes_no_metrics(tmp_path, capsys):
    out = tmp_path / "dry"
    assert main(["train", "--data", "digits", "--model", "biformer_nano", "--dry-run", "--output", str(out)]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[-1] for line in table.splitlines() if line.startswith("--")}
    assert rows["--data"] == rows["--model"] == "given" and rows["--epochs"] == rows["--lr"] == "default"
    options = json.loads((out / "config.json").read_text())["options"]
    assert options["data"]["source"] == options["model"]["source"] == "given"
    assert sorted(path.name for path in out.iterdir()) == ["config.json", "schedule.csv"]


# 15. help

def test_every_option_has_help_and_says_its_default_at_most_once():
    import argparse

    from biformer.cli import build_parser

    def options(parser: argparse.ArgumentParser, path: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from options(sub, f"{path} {name}")
            elif action.option_strings and action.dest != "help":
                yield path, action, parser.formatter_class(path)._get_help_string(action)

    commands = build_parser([])._subparsers._group_actions[0].choices
    checked = 0
    for command in commands:
        for path, action, text in options(build_parser([command]), "biformer"):
            assert action.help, f"{path} {action.option_strings[0]} has no help"
            assert text.count("default:") <= 1, f"{path} {action.option_strings[0]}: {text}"
            checked += 1
    assert checked > 150
    help_text = {action.dest: parser.formatter_class("x")._get_help_string(action)
                 for parser in [build_parser(["eval"])._subparsers._group_actions[0].choices["eval"]]
                 for action in parser._actions}
    assert help_text["workers"].endswith("(default: %(default)s)")  # a default of 0 is said (0 == False in Python)


# 2. fine-tuning with the pretrained checkpoint's normalization

def normalize_of(transform) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from torchvision.transforms import Normalize

    found = [step for step in transform.transforms if isinstance(step, Normalize)]
    assert len(found) == 1, transform
    return tuple(float(value) for value in found[0].mean), tuple(float(value) for value in found[0].std)


@pytest.mark.slow
def test_a_fine_tune_normalizes_as_its_pretrained_checkpoint_unless_told(trained, tmp_path, capsys):
    from biformer.config import TrainConfig
    from biformer.recipes import resolve
    from biformer.runtime import DistEnv
    from biformer.training.engine import Callbacks, setup
    from tiny_data import make_image_folder

    folder = make_image_folder(tmp_path / "folder")  # a class folder: ImageNet's statistics by default
    common = dict(data=str(folder), model="biformer_nano", img_size=32, batch_size=2, tensorboard=False, dry_run=True)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for options, expected, source in (
        ({}, imagenet, f"--data {folder}'s"),
        ({"pretrained": str(trained)}, ((0.5,) * 3, (0.5,) * 3), f"--pretrained {trained}"),  # trained on digits
        ({"pretrained": str(trained), "mean": (0.2,) * 3, "std": (0.3,) * 3}, ((0.2,) * 3, (0.3,) * 3), "given"),
    ):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        run, _ = setup(resolve(TrainConfig(**common, **options, output=out)), DistEnv(), Callbacks())
        for split in (run.splits.train, run.splits.val):
            mean, std = normalize_of(split.transform)
            assert mean == pytest.approx(expected[0]) and std == pytest.approx(expected[1])
        table = capsys.readouterr().out
        for name, values in zip(("--mean", "--std"), expected):
            row = next(line for line in table.splitlines() if line.startswith(name + " "))
            assert str(list(values)) in row and row.endswith(source), row
        recorded = json.loads((out / "config.json").read_text())["options"]["mean"]
        assert recorded == {"value": list(expected[0]), "source": source}


# 10. another task's checkpoint as --pretrained

@pytest.mark.slow
def test_pretrained_weights_of_another_task_name_both_tasks(tmp_path, capsys):
    from biformer.checkpoints.weights import save_weights
    from biformer.dense import create_segmentation_model

    segmenter = tmp_path / "segmenter.safetensors"
    save_weights(segmenter, create_segmentation_model("sfpn_biformer_nano", 3),
                 {"model": "sfpn_biformer_nano", "task": "segmentation"})
    for model in ("biformer_nano", "fcos_biformer_nano"):
        assert main(["train", "--model", model, "--pretrained", str(segmenter), "--dry-run", "--output",
                     str(tmp_path / model)]) == 2
        message = one_line_error(capsys, "train")
        assert "holds a segmentation model (sfpn_biformer_nano)" in message and "missing keys" not in message
        assert not (tmp_path / model).exists()


# 4. opsets out of range, 5. a suffix that contradicts --format, 6. the sizes a dynamic file takes

@pytest.mark.parametrize("argv, fragments", [
    (["--opset", "5", "--legacy"], ("opset 5 is outside 14..20", "legacy exporter")),
    (["--opset", "5"], ("opset 5 is outside 18..23", "dynamo exporter")),
    (["--opset", "24"], ("opset 24 is outside 18..23",)),
], ids=["legacy-5", "dynamo-5", "dynamo-24"])
def test_export_checks_the_opset_up_front(argv, fragments, tmp_path, capsys):
    assert main(["export", str(tmp_path / "m.onnx"), "--model", "biformer_nano", "--img-size", "64", *argv]) == 2
    message = one_line_error(capsys, "export")
    assert all(fragment in message for fragment in fragments), message
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_suffix_of_another_format(tmp_path, capsys):
    assert main(["export", str(tmp_path / "m.pt2"), "--format", "onnx", "--legacy", "--model", "biformer_nano"]) == 2
    assert "named as 'exported' (.pt2) but --format is 'onnx'" in one_line_error(capsys, "export")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_export_says_which_sizes_the_file_takes(tmp_path, capsys):
    assert main(["export", str(tmp_path / "m.pt2"), "--model", "biformer_nano", "--img-size", "64", "--dynamic"]) == 0
    assert "dynamic: batch 1..1024, height and width 33..4096 px" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "s.onnx"), "--model", "biformer_nano", "--img-size", "64"]) == 0
    assert "1x3x64x64 only" in capsys.readouterr().out


# ~ in --opt=~/x (the shell expands it at a word's start only)

def test_a_tilde_after_an_equals_sign_is_the_home_folder(trained, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "weights.safetensors").write_bytes(trained.read_bytes())
    digit_image(4).resize((32, 32)).save(home / "four.png")
    monkeypatch.setenv("HOME", str(home))
    assert main(["predict", "~/four.png", "--checkpoint=~/weights.safetensors", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["image"] == str(home / "four.png")
    assert main(["eval", "--checkpoint=~/weights.safetensors", "--data=~/nowhere"]) == 2
    assert str(home / "nowhere") in one_line_error(capsys, "eval")


# 17. flops of every model the package builds

@pytest.mark.slow
def test_flops_counts_segmentation_and_detection_models_by_name_and_checkpoint(trained, tmp_path, capsys):
    from biformer.checkpoints.weights import save_weights
    from biformer.dense import create_segmentation_model

    def total(out: str) -> float:  # "... , 5.0G FLOPs (paper convention ..." -> 5.0e9
        figure = out.split("parameters, ")[1].split(" FLOPs")[0]
        return float(figure[:-1]) * {"K": 1e3, "M": 1e6, "G": 1e9}[figure[-1]]

    counted = {}
    for model in ("sfpn_biformer_nano", "fcos_biformer_nano", "maskrcnn_biformer_nano"):
        assert main(["flops", model, "--img-size", "64"]) == 0
        out = capsys.readouterr().out
        assert f"{model} at 64x64" in out and "backbone" in out and "region attention" in out, out
        counted[model] = total(out)
    assert all(value > 0 for value in counted.values())
    segmenter = tmp_path / "segmenter.safetensors"
    save_weights(segmenter, create_segmentation_model("sfpn_biformer_nano", 150),
                 {"model": "sfpn_biformer_nano", "task": "segmentation", "classes": [str(i) for i in range(150)],
                  "img_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3})
    assert main(["flops", "--checkpoint", str(segmenter)]) == 0  # its own size and classes (ADE20K's 150 here)
    assert total(capsys.readouterr().out) == counted["sfpn_biformer_nano"]
    assert main(["flops", "--checkpoint", str(trained)]) == 0
    assert "biformer_nano at 32x32" in capsys.readouterr().out  # the size the checkpoint was trained at


# 14. progress where a bar cannot show, and an export's stages

def test_a_piped_run_says_how_far_it_is(tmp_path, capsys, monkeypatch):
    from biformer import progress

    monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 0.0)  # a line at every step (capsys is no terminal)
    assert main(["train", *DIGITS, "--iters", "4", "--val-every", "2", "--warmup-iters", "0", "--batch-size", "8",
                 "--output", str(tmp_path / "run")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iters: step")]
    assert [line.split(",")[0] for line in lines] == [f"iters: step {step}/4" for step in (1, 2, 3, 4)]


def test_the_iters_bar_counts_the_runs_steps(tmp_path, monkeypatch):
    """The bar of the second --val-every round starts where the first ended, out of the run's steps."""
    import tqdm as tqdm_module

    from biformer.training import engine

    bars = []

    class Recorded(tqdm_module.tqdm):
        def __init__(self, *args, **kwargs):
            bars.append((kwargs.get("desc"), kwargs.get("initial"), kwargs.get("total")))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(engine, "tqdm", Recorded)
    assert main(["train", *DIGITS, "--iters", "4", "--val-every", "2", "--warmup-iters", "0", "--batch-size", "8",
                 "--output", str(tmp_path / "run")]) == 0
    assert [bar for bar in bars if bar[0] == "iters"] == [("iters", 0, 4), ("iters", 2, 4)]


@pytest.mark.slow
def test_export_says_each_stage_as_it_starts(tmp_path, capsys):
    assert main(["export", str(tmp_path / "m.onnx"), "--model", "biformer_nano", "--img-size", "64", "--dynamic"]) == 0
    stages = [line for line in capsys.readouterr().out.splitlines() if line.endswith(" ...")]
    assert stages == ["finding the smallest input side the model's graph holds ...",
                      "exporting with the dynamo ONNX exporter at (2, 3, 64, 64), sizes free ...",
                      "checking the file against eager PyTorch on 3 input(s) ..."], stages


# the resume of the flaky detection test: a resumed run computes on the thread count the run started with

def test_a_resumed_run_computes_on_the_thread_count_it_started_with(tmp_path, capsys):
    from biformer.training import run_folder

    argv = ["train", *DIGITS, "--iters", "2", "--warmup-iters", "0", "--batch-size", "8", "--output", str(tmp_path)]
    assert main(argv) == 0
    state = torch.load(tmp_path / run_folder.STATE, weights_only=True)
    assert state["threads"] == torch.get_num_threads()
    state["threads"] = torch.get_num_threads() + 1  # as if started on a machine with another count
    torch.save(state, tmp_path / run_folder.STATE)
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert f"resuming on {state['threads']} CPU thread(s)" in capsys.readouterr().out
    assert torch.get_num_threads() == state["threads"]  # (the suite's fixture restores the count afterwards)
