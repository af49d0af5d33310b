"""`biformer bench`: smoke tests on tiny shapes, CSV output, and bad input."""
import csv

import pytest

from biformer.cli import main


def test_bench_op_table_and_csv(tmp_path, capsys):
    path = tmp_path / "op.csv"
    code = main(["bench", "op", "--shape", "tiny=8,8,16,2,4,2", "--shape", "9,11,16,2,3,4", "--batch", "2",
                 "--repeats", "2", "--warmup", "1", "--threads", "1", "--backends", "indexed", "dense",
                 "--csv", str(path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "fwd_bwd_speedup" in out and "tiny" in out
    rows = list(csv.DictReader(path.open()))
    assert [(r["shape"], r["backend"]) for r in rows] == [
        ("tiny", "indexed"), ("tiny", "dense"), ("9,11,16,2,3,4", "indexed"), ("9,11,16,2,3,4", "dense")]
    for row in rows:
        assert float(row["fwd_ms"]) > 0 and float(row["orig_fwd_bwd_ms"]) > 0
        assert float(row["max_abs_err"]) < 1e-4  # each backend is checked against the reference
        assert float(row["peak_mb"]) > 0  # fwd+bwd allocates at least the output and gradients


def test_bench_op_reports_a_backend_that_cannot_run(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code = main(["bench", "op", "--shape", "8,8,16,2,4,2", "--batch", "1", "--repeats", "1", "--warmup", "0",
                 "--no-memory", "--backends", "triton", "indexed"])
    assert code == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "indexed" in out


@pytest.mark.parametrize("argv, message", [
    (["bench", "op", "--shape", "8,8,16"], "is not [NAME=]SIZES,DIM,HEADS,N_WIN,TOPK: 1 to 3 sizes"),
    (["bench", "op", "--shape", "8,8,16,3,4,2"], "HEADS must divide DIM"),
    (["bench", "op", "--shape", "8,8,16,2,9,2"], "asks for more regions along an axis than the 8x8 map has tokens"),
    (["bench", "op", "--shape", "4,8,8,16,2,2x2,2"], "with N_WIN one int or one per size"),
    (["bench", "op", "--shape", "4,8,8,16,2,2x2x2,9"], "TOPK 9 exceeds the 8 regions"),
    (["bench", "op", "--backends", "nope"], "unknown backend"),
    (["bench", "op", "--repeats", "0"], "--repeats"),
    (["bench", "op", "--csv", "/no/such/folder/x.csv"], "does not exist"),
    (["bench", "model", "biformer_tiny:fast"], "unknown option"),
    (["bench", "model", "--backend", "nope"], "unknown --backend"),
    (["bench", "model", "no_such_model"], "unknown model"),
    (["bench", "model", "resnet18:backend=indexed"], "BiFormer models only"),
    (["bench", "export", "no_such_model"], "unknown model"),
    (["bench", "export", "--img-size", "16"], "--img-size must be at least 32"),
    (["bench", "deploy", "biformer_nano", "resnet18"], "--reference swin_tiny_patch4_window7_224 is not among the models"),
    (["bench", "deploy", "--img-size", "16"], "--img-size must be at least 32"),
])
def test_bench_bad_input(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("biformer bench: error:") and message in err


def test_bench_model_smoke(tmp_path, capsys):
    path = tmp_path / "model.csv"
    code = main(["bench", "model", "biformer_nano", "biformer_nano:backend=reference", "--img-size", "32",
                 "--batch", "2", "--repeats", "1", "--warmup", "0", "--threads", "1", "--csv", str(path)])
    assert code == 0
    rows = list(csv.DictReader(path.open()))
    assert [r["model"] for r in rows] == ["biformer_nano", "biformer_nano:backend=reference"]
    for row in rows:
        assert float(row["infer_img_s"]) > 0 and float(row["train_img_s"]) > 0 and float(row["gflops"]) > 0
        assert float(row["infer_gflop_s"]) == pytest.approx(float(row["gflops"]) * float(row["infer_img_s"]))


@pytest.mark.slow
def test_bench_export_smoke(tmp_path, capsys):
    path, kept = tmp_path / "export.csv", tmp_path / "onnx"
    code = main(["bench", "export", "biformer_nano", "resnet18", "--img-size", "32", "--batches", "1", "2",
                 "--rounds", "2", "--warmup", "0", "--threads", "1", "--keep", str(kept), "--csv", str(path)])
    assert code == 0
    rows = list(csv.DictReader(path.open()))
    assert [(r["model"], r["batch"]) for r in rows] == [("biformer_nano", "1"), ("biformer_nano", "2"),
                                                        ("resnet18", "1"), ("resnet18", "2")]
    for row in rows:
        assert float(row["onnxruntime_ms"]) > 0 and float(row["eager_ms"]) > 0
        low, high = map(float, row["ort_range"].split("-"))
        assert low <= float(row["onnxruntime_ms"]) <= high
    assert sorted(p.name for p in kept.iterdir()) == ["biformer_nano_b1.onnx", "biformer_nano_b2.onnx",
                                                      "resnet18_b1.onnx", "resnet18_b2.onnx"]


@pytest.mark.slow
def test_bench_deploy_times_every_runtime_against_the_reference(tmp_path, capsys):
    pytest.importorskip("openvino", reason="OPENVINO EXTRA NOT INSTALLED: bench deploy not checked")
    path = tmp_path / "deploy.csv"
    assert main(["bench", "deploy", "biformer_nano", "resnet18", "--reference", "resnet18", "--img-size", "32",
                 "--batches", "1", "2", "--rounds", "2", "--warmup", "1", "--threads", "1", "--csv", str(path)]) == 0
    rows = list(csv.DictReader(path.open()))
    assert [(r["runtime"], r["batch"], r["model"]) for r in rows] == [
        (runtime, batch, model) for runtime in ("eager", "compiled", "onnxruntime", "openvino")
        for batch in ("1", "2") for model in ("biformer_nano", "resnet18")]
    by_key = {(r["runtime"], r["batch"], r["model"]): r for r in rows}
    for (runtime, batch, model), row in by_key.items():
        low, high = map(float, row["range"].split("-"))  # one decimal; the median three significant digits
        assert 0 < low <= float(row["ms"]) * 1.005 + 0.05 and float(row["ms"]) <= high * 1.005 + 0.05
        reference_ms = float(by_key[runtime, batch, "resnet18"]["ms"])
        assert float(row["vs_reference"]) == pytest.approx(reference_ms / float(row["ms"]), rel=0.03, abs=0.01)
    assert all(float(by_key[runtime, batch, "resnet18"]["vs_reference"]) == 1
               for runtime, batch, _ in by_key)


@pytest.mark.slow
def test_bench_export_profile_sums_kernel_time_by_op_type(capsys):
    assert main(["bench", "export", "--profile", "biformer_nano", "--img-size", "32", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "kernel time by operator type" in out
    rows = [line.split() for line in out.splitlines()[3:] if line.strip()]
    shares = [float(row[2].rstrip("%")) for row in rows]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.5
    assert {"MatMul", "Gemm", "FusedMatMul"} & {row[0] for row in rows}  # the attention and projections


@pytest.mark.slow
def test_cpu_peak_memory_measures_without_profiler_log_lines():
    import subprocess
    import sys

    script = (
        "import torch; from biformer.measure import peak_memory_bytes; "
        "print(peak_memory_bytes(lambda: torch.empty(1 << 20), torch.device('cpu')))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert int(done.stdout) >= 4 << 20  # the 1 Mi-float tensor was seen
    assert "profiler_start" not in done.stderr and "USDT" not in done.stderr, done.stderr


def _load_tool(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_bound_tool_frees_bra_and_reads_its_attention_shapes():
    import timm
    import torch

    tool = _load_tool("bra_training_bound")
    torch.manual_seed(0)
    model = timm.create_model("biformer_nano").eval()
    images = torch.randn(2, 3, 32, 32)
    # nano at 32x32: stage maps 8x8, 4x4, 2x2 (one region per side where the map is smaller than n_win)
    shapes = tool.attention_shapes(model, images)
    layers = [m for m in model.modules() if isinstance(m, tool.BiLevelRoutingAttention)]
    assert len(shapes) == len(layers) > 0
    for (regions, heads, tokens, keys, dim), layer in zip(shapes, layers):
        assert heads == layer.num_heads and dim == layer.dim // heads and keys % tokens == 0

    layer = layers[0]
    x = torch.randn(2, 5, 6, layer.dim)
    with tool.free_bra(), torch.no_grad():
        free = layer(x)
    v = layer.qkv(x).unflatten(-1, (3, -1)).unbind(3)[2]  # out = v, then lepe and the projection as usual
    want = layer.proj(v + layer.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    torch.testing.assert_close(free, want)
    with torch.no_grad():
        assert not torch.allclose(layer(x), free)  # the real op is back


def test_bench_model_times_clip_models_beside_torchvisions(capsys):
    assert main(["bench", "model", "biformer3d_nano", "r3d_18", "--frames", "4", "--img-size", "32", "--batch", "1",
                 "--repeats", "1", "--warmup", "0", "--threads", "1", "--no-memory", "--no-train"]) == 0
    out = capsys.readouterr().out
    assert "clips of 4 frames 32x32" in out and "biformer3d_nano" in out and "r3d_18" in out
    assert main(["bench", "model", "biformer_nano", "--frames", "4", "--img-size", "32", "--batch", "1",
                 "--repeats", "1", "--warmup", "0", "--no-memory", "--no-train"]) == 2
    assert "measure image and clip models (--frames) apart" in capsys.readouterr().err
