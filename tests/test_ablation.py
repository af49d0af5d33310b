"""`biformer ablate`: the configurations it compares, its table, CSV and plot, reruns, torchrun, FLOPs ordering."""
import csv
import json
import os
import subprocess
import sys
from dataclasses import fields

import pytest
import timm
from test_distributed import free_port

from biformer.benchmarks import ablation
from biformer.benchmarks.ablation import AblationOptions, Configuration, configurations
from biformer.analysis.flops import count_flops
from biformer.cli import main
from biformer.commands.ablate import DEFAULTS
from biformer.errors import UserError
from biformer.models.mixers import FullAttention, WindowAttention


def test_cli_defaults_are_the_options_defaults():
    options = AblationOptions()
    expected = {spec.name: getattr(options, spec.name) for spec in fields(options)}
    cli = {key: value for key, value in DEFAULTS.items() if key not in ("attention", "topk")}
    cli.update(attentions=tuple(DEFAULTS["attention"].split(",")), topks=tuple(map(int, DEFAULTS["topk"].split(","))))
    assert cli == expected


def test_configurations_scale_the_layouts_topk_schedule():
    configs = configurations("biformer_stl", ("window", "bra", "full"), (1, 4))
    assert configs == [
        Configuration("window", ("attention=window",)),
        Configuration("bra-k1", ("attention=bra", "topks=1,4,16,global_input")),
        Configuration("bra-k4", ("attention=bra", "topks=4,16,64,global_input")),
        Configuration("full", ("attention=full",)),
    ]
    # biformer_nano routes 4 regions in every stage: its ratios are 1:1:1
    assert configurations("biformer_nano", ("bra",), (2,))[0].model_kwargs == ("attention=bra", "topks=2,2,2,global_input")


@pytest.mark.parametrize("model, attentions, topks, message", [
    ("biformer_stl", ("bra", "deformable"), (1,), "--attention bra,deformable"),
    ("biformer_stl", ("bra",), (0,), "--topk 0"),
    ("resnet18", ("bra",), (1,), "--model 'resnet18'"),
    ("no_such_model", ("bra",), (1,), "--model 'no_such_model'"),
])
def test_bad_configurations_are_named(model, attentions, topks, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        configurations(model, attentions, topks)


def test_mixers_are_built_where_bra_was():
    model = timm.create_model("biformer_stl_nano", attention="window")
    mixers = [block.attn for stage in model.stages[:3] for block in stage.blocks]
    assert all(isinstance(m, WindowAttention) and m.window_size == 4 for m in mixers)
    assert [m.shifted for m in mixers[:2]] == [False, True]  # shifted in every other block, as Swin
    assert not isinstance(model.stages[3].blocks[0].attn, WindowAttention)  # the last stage stays global
    full = timm.create_model("biformer_stl_nano", attention="full")
    assert isinstance(full.stages[0].blocks[0].attn, FullAttention)
    with pytest.raises(ValueError, match="attention must be one of bra, window, stripe, grid, full"):
        timm.create_model("biformer_stl_nano", attention="axial")


def test_flops_ordering_at_224_window_bra_full():
    """The paper's complexity analysis: windows < BRA (routing plus 64 keys a query, against 49) < full."""
    gflops = {attention: count_flops(timm.create_model("biformer_stl", attention=attention), (224, 224)).total_paper
              for attention in ("window", "bra", "full")}
    assert gflops["window"] < gflops["bra"] < gflops["full"]


QUICK = ["--data", "digits", "--model", "biformer_stl_nano", "--img-size", "32", "--epochs", "1", "--batch-size", "64",
         "--warmup-epochs", "0", "--repeats", "1", "--device", "cpu"]


@pytest.mark.slow
def test_ablate_table_csv_plot_and_a_rerun_that_trains_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ablate"
    args = ["ablate", *QUICK, "--attention", "bra,grid", "--topk", "1,4", "--seeds", "2", "--output", str(out)]
    assert main(args) == 0
    first = capsys.readouterr().out
    table = first[first.index("attention  params_m"):]
    with open(out / "ablation.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["attention"] for row in rows] == ["bra-k1", "bra-k4", "grid"]
    assert all(row["seeds"] == "2" and float(row["gflops"]) > 0 and float(row["train_img_s"]) > 0 for row in rows)
    for row in rows:  # mean and std over the two seeds' final val top-1
        seeds = [json.loads((out / row["attention"] / f"seed{s}" / "result.json").read_text())["val_top1"]
                 for s in (0, 1)]
        assert float(row["top1_mean"]) == pytest.approx(sum(seeds) / 2)
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("biformer.training.engine.train", no_training)
    monkeypatch.setattr(ablation, "bench_models", no_training)  # the measurements are reused too
    assert main(args) == 0
    second = capsys.readouterr().out
    assert second[second.index("attention  params_m"):] == table
    assert second.count("done before") == 6

    # the same folders with another recipe are refused, not mixed into the table
    assert main([*args[:-2], "--lr", "1e-3", "--output", str(out)]) == 2
    assert "holds a finished run with other settings (--lr " in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_spreads_the_runs_over_the_ranks(tmp_path):
    out = tmp_path / "ablate"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "biformer", "ablate", *QUICK, "--attention", "bra,window", "--topk", "1", "--seeds", "1",
         "--output", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = {label: json.loads((out / label / "seed0" / "result.json").read_text())["rank"]
             for label in ("bra-k1", "window")}
    assert ranks == {"bra-k1": 0, "window": 1}
    assert result.stdout.count("attention  params_m") == 1  # rank 0 alone writes the table
    assert (out / "ablation.csv").exists()
