"""BRA inside Ultralytics YOLO: YAMLs, sizes, training, checkpoints, ONNX, precision and mistakes (CPU, offline)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from environment import restore_environment

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics checks nothing online
# importing ultralytics sets OMP_NUM_THREADS=1, KINETO_LOG_LEVEL and more in os.environ: collected with the other
# tests, this module must not hand them to every subprocess the suite starts
_ENVIRONMENT = dict(os.environ)
pytest.importorskip("ultralytics", reason="the YOLO integration needs the ultralytics extra")

import ultralytics  # noqa: E402
from ultralytics import YOLO  # noqa: E402
from ultralytics.nn.modules import C2f, C3k2, Detect  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

restore_environment(_ENVIRONMENT)

from biformer.cli import main  # noqa: E402
from biformer.export import openvino_core  # noqa: E402
from biformer.integrations import ultralytics as integration  # noqa: E402
from biformer.integrations.ultralytics import (  # noqa: E402
    BRABlock, C2fBRA, C3k2BRA, IntegrationError, TutorialRoutingAttention, bra_yaml, register, write_bra_yaml,
)

TRAIN_OPTIONS = {"epochs": 1, "imgsz": 64, "batch": 8, "workers": 0, "plots": False, "device": "cpu", "seed": 0,
                 "deterministic": False, "amp": False, "verbose": False}


def layers_of(model: torch.nn.Module, kind: type) -> list[torch.nn.Module]:
    return [module for module in model.modules() if isinstance(module, kind)]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """12 train and 6 val scenes of digit-scenes in the YOLO layout, and their data YAML."""
    patch = pytest.MonkeyPatch()
    patch.setenv("BIFORMER_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        from biformer.data.yolo import digit_scenes_yolo

        full = digit_scenes_yolo().parent
    finally:
        patch.undo()
    root = tmp_path_factory.mktemp("tiny")
    for split, count in (("train", 12), ("val", 6)):
        for kind in ("images", "labels"):
            (root / kind / split).mkdir(parents=True)
        for image in sorted((full / "images" / split).iterdir())[:count]:
            shutil.copy(image, root / "images" / split / image.name)
            label = Path("labels", split, image.with_suffix(".txt").name)
            shutil.copy(full / label, root / label)
    (root / "data.yaml").write_text(f"path: {json.dumps(str(root))}\ntrain: images/train\nval: images/val\n"
                                    "names: {0: '0', 1: '1', 2: '2', 3: '3', 4: '4', 5: '5', 6: '6', 7: '7', 8: '8', "
                                    "9: '9'}\n")
    return root / "data.yaml"


# the YOLO layout of digit-scenes: the COCO files' boxes, normalised


def test_digit_scenes_yolo_labels_are_the_coco_boxes(tmp_path, monkeypatch):
    monkeypatch.setenv("BIFORMER_CACHE", str(tmp_path))
    from biformer.data.scenes import digit_scenes_coco
    from biformer.data.yolo import digit_scenes_yolo

    root = digit_scenes_yolo().parent
    coco = json.loads(digit_scenes_coco()["val"].annotations.read_text())
    image = coco["images"][0]
    expected = sorted(
        [a["category_id"] - 1, (a["bbox"][0] + a["bbox"][2] / 2) / image["width"],
         (a["bbox"][1] + a["bbox"][3] / 2) / image["height"], a["bbox"][2] / image["width"], a["bbox"][3] / image["height"]]
        for a in coco["annotations"] if a["image_id"] == image["id"])
    lines = (root / "labels" / "val" / image["file_name"]).with_suffix(".txt").read_text().split("\n")
    got = sorted([int(line.split()[0]), *map(float, line.split()[1:])] for line in lines if line)
    assert len(got) == len(expected) >= 2
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-6)
    assert len(list((root / "images" / "train").iterdir())) == len(list((root / "labels" / "train").iterdir())) == 480
    assert "val: images/val" in (root / "data.yaml").read_text()


# YAMLs: where BRA goes, and the channels it gets at each scale


@pytest.mark.parametrize("scale", ["n", "s"])
def test_yolov8_bra_yaml_channels_follow_the_scale(scale):
    plain = DetectionModel(f"yolov8{scale}.yaml", verbose=False)
    model = DetectionModel(bra_yaml(f"yolov8{scale}.yaml", ("sppf", "neck")), verbose=False)
    plain_layers, layers = list(plain.model), list(model.model)
    sppf = next(i for i, layer in enumerate(plain_layers) if type(layer).__name__ == "SPPF")
    assert isinstance(layers[sppf + 1], BRABlock)  # inserted after SPPF, keeping its channels
    width = layers[sppf].cv2.conv.out_channels
    assert width == {"n": 256, "s": 512}[scale]
    assert layers[sppf + 1].block.attn.dim == width and layers[sppf + 1].block.attn.num_heads == width // 32
    # every later layer is the plain model's, one place on; the neck's C2f became C2fBRA of the same size
    for plain_layer, layer in zip(plain_layers[sppf + 1:], layers[sppf + 2:]):
        if isinstance(plain_layer, C2f):
            assert type(layer) is C2fBRA
            assert (layer.cv1.conv.in_channels, layer.cv2.conv.out_channels, len(layer.m)) == \
                   (plain_layer.cv1.conv.in_channels, plain_layer.cv2.conv.out_channels, len(plain_layer.m))
            assert all(block.block.attn.dim == plain_layer.c for block in layer.m)
        else:
            assert type(layer) is type(plain_layer)
    assert isinstance(layers[-1], Detect)
    assert layers[-1].f == [i + 1 for i in plain_layers[-1].f]  # Detect reads the same layers, renumbered
    assert len(layers_of(model, C2fBRA)) == 4 and not layers_of(plain, BRABlock)


@pytest.mark.parametrize("scale", ["n", "s"])
def test_yolo11_neck_becomes_c3k2bra_of_the_same_size(scale):
    plain = DetectionModel(f"yolo11{scale}.yaml", verbose=False)
    model = DetectionModel(bra_yaml(f"yolo11{scale}.yaml", "neck"), verbose=False)
    swapped = 0
    for index, (plain_layer, layer) in enumerate(zip(plain.model, model.model)):
        if isinstance(layer, C3k2BRA):
            swapped += 1
            assert type(plain_layer) is C3k2 and index >= 11  # the head only
            assert (layer.cv1.conv.in_channels, layer.cv2.conv.out_channels, len(layer.m), layer.c) == \
                   (plain_layer.cv1.conv.in_channels, plain_layer.cv2.conv.out_channels, len(plain_layer.m),
                    plain_layer.c)
        else:
            assert type(layer) is type(plain_layer)
    assert swapped == 4


def test_levels_pick_the_blocks_at_that_stride():
    rows = bra_yaml("yolov8n.yaml", "p5")
    names = [row[2] for row in rows["backbone"] + rows["head"]]
    # the backbone's last C2f (stride 32, index 8) and the head's last (index 21), nothing else
    assert [i for i, name in enumerate(names) if name == "C2fBRA"] == [8, 21]
    assert "BRABlock" not in names


def test_written_yaml_is_the_generated_model(tmp_path):
    path = write_bra_yaml("yolov8s-bra-sppf.yaml", tmp_path)
    model = YOLO(str(path)).model
    assert len(layers_of(model, BRABlock)) == 1 and not layers_of(model, C2fBRA)
    assert model.model[10].block.attn.dim == 512  # the s scale, from the file's name as ultralytics reads it
    assert path.read_text().count("\n  - [") == len(bra_yaml("yolov8s.yaml", "sppf")["backbone"]) + 13


# any map size, fp16/bf16


@pytest.mark.slow
@pytest.mark.parametrize("size", [(640, 640), (480, 640), (160, 160)])
def test_forward_at_any_size(size):
    torch.manual_seed(0)
    model = DetectionModel(bra_yaml("yolov8n.yaml", ("sppf", "neck")), verbose=False).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, *size))[0]
    anchors = sum((size[0] // stride) * (size[1] // stride) for stride in (8, 16, 32))
    assert out.shape == (1, 84, anchors) and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_follows_float32(dtype):
    torch.manual_seed(0)
    block = BRABlock(64, n_win=4).eval()
    x = torch.randn(2, 64, 12, 10)
    with torch.no_grad():
        expected = block(x)
        got = block.to(dtype)(x.to(dtype))
    assert got.dtype == dtype
    scale = expected.abs().max()
    assert (got.float() - expected).abs().max() / scale < (2e-2 if dtype == torch.bfloat16 else 4e-3)


def test_whole_yolo_model_runs_in_bfloat16_autocast():
    torch.manual_seed(0)
    model = DetectionModel(bra_yaml("yolo11n.yaml", "neck"), verbose=False).eval()
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        expected = model(x)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)[0]
    assert torch.isfinite(got).all()
    assert (got.float() - expected).abs().max() / expected.abs().max() < 5e-2


# training, checkpoints and export through ultralytics


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """yolov8n with BRA after SPPF and C2fBRA in the neck, one epoch on the tiny data."""
    folder = tmp_path_factory.mktemp("yolo")
    model = YOLO(str(write_bra_yaml("yolov8n-bra.yaml", folder)))
    model.train(data=str(tiny_data), project=str(folder), name="run", **TRAIN_OPTIONS)
    return model, folder / "run" / "weights" / "best.pt"


@pytest.mark.slow
def test_one_epoch_keeps_the_bra_layers_through_the_trainers_rebuild(trained, tiny_data):
    model, best = trained
    trainer_model = model.trainer.model  # the trainer builds its own model from the YAML
    assert trainer_model is not None and len(layers_of(trainer_model, C2fBRA)) == 4
    assert len(layers_of(trainer_model, BRABlock)) == 1 + 4 * 1  # after SPPF, and one per C2fBRA (n: depth 1)
    metrics = model.val(data=str(tiny_data), imgsz=64, batch=8, workers=0, plots=False, verbose=False)
    assert 0.0 <= metrics.box.map50 <= 1.0 and best.is_file()


@pytest.mark.slow
def test_best_pt_loads_in_a_fresh_process_without_register(trained, tiny_data, tmp_path):
    _, best = trained
    script = (
        "from ultralytics import YOLO\n"
        f"model = YOLO({str(best)!r})\n"
        "names = {type(m).__name__ for m in model.model.modules()}\n"
        "assert {'C2fBRA', 'BRABlock'} <= names, names\n"
        f"model.val(data={str(tiny_data)!r}, imgsz=64, batch=8, workers=0, plots=False, verbose=False)\n"
        # training on from it re-parses its YAML in this process
        f"model.train(data={str(tiny_data)!r}, project={str(tmp_path)!r}, name='again', **{TRAIN_OPTIONS!r})\n"
        "assert sum(type(m).__name__ == 'C2fBRA' for m in model.trainer.model.modules()) == 4\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "YOLO_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True])
def test_onnx_through_ultralytics_matches_pytorch(trained, tmp_path, dynamic):
    ort = pytest.importorskip("onnxruntime")
    _, best = trained
    copy = tmp_path / "best.pt"
    shutil.copy(best, copy)
    model = YOLO(str(copy))
    onnx_file = model.export(format="onnx", imgsz=96, simplify=False, dynamic=dynamic)
    session = ort.InferenceSession(onnx_file)
    network = YOLO(str(copy)).model.float().eval()
    inputs = [torch.rand(1, 3, 96, 96)] + ([torch.rand(2, 3, 64, 160), torch.rand(1, 3, 32, 32)] if dynamic else [])
    for x in inputs:
        with torch.no_grad():
            expected = network(x)[0].numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True])
def test_openvino_through_ultralytics_matches_pytorch(trained, tmp_path, dynamic):
    """`biformer yolo export format=openvino`: ultralytics converts the PyTorch model itself (not the ONNX file);
    run here in OpenVINO at float32."""
    pytest.importorskip("openvino", reason="OPENVINO EXTRA NOT INSTALLED: its export not checked")
    _, best = trained
    copy = tmp_path / "best.pt"
    shutil.copy(best, copy)
    folder = Path(YOLO(str(copy)).export(format="openvino", imgsz=96, dynamic=dynamic, half=False))
    compiled = openvino_core().compile_model(str(folder / "best.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    network = YOLO(str(copy)).model.float().eval()
    inputs = [torch.rand(1, 3, 96, 96)] + ([torch.rand(2, 3, 64, 160)] if dynamic else [])
    for x in inputs:
        with torch.no_grad():
            expected = network(x)[0].numpy()
        got = compiled(x.numpy())[compiled.outputs[0]]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


@pytest.mark.slow
def test_tutorial_yaml_line_builds_and_trains_unchanged(tiny_data, tmp_path):
    base = (Path(ultralytics.__file__).parent / "cfg" / "models" / "v8" / "yolov8.yaml").read_text()
    # the line the tutorials add after SPPF; later absolute layer indices move on by one, as they write them
    yaml_text = base.replace("  - [-1, 1, SPPF, [1024, 5]] # 9\n",
                             "  - [-1, 1, SPPF, [1024, 5]] # 9\n  - [-1, 1, BiLevelRoutingAttention, []] # 10\n")
    for old, new in (("[[-1, 12], 1", "[[-1, 13], 1"),
                     ("[[-1, 9], 1", "[[-1, 10], 1"), ("[[15, 18, 21], 1, Detect", "[[16, 19, 22], 1, Detect")):
        assert old in yaml_text
        yaml_text = yaml_text.replace(old, new)
    assert "BiLevelRoutingAttention, []" in yaml_text
    path = tmp_path / "yolov8n-tutorial.yaml"
    path.write_text(yaml_text)
    model = YOLO(str(path))
    layer = model.model.model[10]
    assert isinstance(layer, TutorialRoutingAttention) and layer.attention.dim == 256  # from its input, at n scale
    model.train(data=str(tiny_data), project=str(tmp_path), name="run", **TRAIN_OPTIONS)
    assert len(layers_of(model.trainer.model, TutorialRoutingAttention)) == 1
    assert (tmp_path / "run" / "weights" / "best.pt").is_file()


@pytest.mark.slow
def test_cli_generates_the_yaml_and_runs_ultralytics(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("BIFORMER_CACHE", str(tmp_path / "cache"))
    assert main(["yolo", "train", "model=yolo11n-bra-neck.yaml", f"data={tiny_data}", f"project={tmp_path}",
                 "name=cli", "epochs=1", "imgsz=64", "batch=8", "workers=0", "plots=False", "device=cpu"]) == 0
    best = tmp_path / "cli" / "weights" / "best.pt"
    assert (tmp_path / "cache" / "yolo-models" / "yolo11n-bra-neck.yaml").is_file()
    assert len(layers_of(YOLO(str(best)).model, C3k2BRA)) == 4


# mistakes: one line that names the fix


def test_heads_that_do_not_divide_the_channels():
    with pytest.raises(IntegrationError, match=r"BRABlock: 100 channels do not divide into heads=8; give a head count"):
        BRABlock(100, heads=8)
    with pytest.raises(IntegrationError, match="C2fBRA takes the YAML arguments"):
        integration._bra_row_options("C2fBRA", [])
    yaml = bra_yaml("yolov8n.yaml", "sppf")
    yaml["backbone"][-1][3] = ["c2", 7]  # 256 channels, 7 heads
    with pytest.raises(IntegrationError, match="256 channels do not divide into heads=7"):
        DetectionModel(yaml, verbose=False)


def test_unknown_where_and_base():
    with pytest.raises(IntegrationError, match="choose one or more of sppf, neck, p3, p4, p5"):
        bra_yaml("yolov8n.yaml", "backbone")
    with pytest.raises(IntegrationError, match="is no generated model name"):
        write_bra_yaml("yolov8n.yaml", ".")


def test_an_ultralytics_version_it_does_not_know(monkeypatch):
    monkeypatch.setattr(ultralytics, "__version__", "9.0.0")
    with pytest.raises(IntegrationError, match=r"ultralytics 9.0.0 is not a version .* pip install 'ultralytics>=8.4,<8.5'"):
        register()
    monkeypatch.undo()


def test_unregister_undoes_register():
    import ultralytics.nn.tasks as tasks

    try:
        integration.unregister()
        assert tasks.parse_model is integration._original_parse_model and not hasattr(tasks, "C2fBRA")
        with pytest.raises(KeyError, match="C2fBRA"):
            DetectionModel(bra_yaml("yolov8n.yaml", "neck"), verbose=False)
    finally:
        register()
        register()  # idempotent: one wrapper, not two
    assert tasks.parse_model is integration.parse_model and tasks.C2fBRA is C2fBRA
    assert len(layers_of(DetectionModel(bra_yaml("yolov8n.yaml", "neck"), verbose=False), C2fBRA)) == 4


def test_without_ultralytics_installed():
    script = ("import sys; sys.modules['ultralytics'] = None\n"
              "from biformer.cli import main\n"
              "sys.exit(main(['yolo', 'val']))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("biformer yolo: error: biformer's YOLO integration needs ultralytics: "
                                     "pip install 'biformer[ultralytics]'")


def test_tutorial_layer_given_other_channels_than_its_input():
    with pytest.raises(IntegrationError, match=r"given dim=128 but its input has 64 channels; write its YAML arguments as \[\]"):
        TutorialRoutingAttention(128)(torch.rand(1, 64, 8, 8))


# the benchmark: one command per run, finished runs read back; its multiply-adds against ultralytics' own count


def test_multiply_adds_of_a_plain_yolo_match_ultralytics_count():
    from ultralytics.utils.torch_utils import get_flops

    from biformer.analysis.flops import total_multiply_adds

    model = DetectionModel("yolov8n.yaml", verbose=False).fuse(verbose=False).eval()
    ours = 2 * total_multiply_adds(model, (640, 640)) / 1e9
    assert ours == pytest.approx(get_flops(model, 640), rel=1e-3)  # thop's count by module hooks: no attention here


@pytest.mark.slow
def test_bench_yolo_trains_each_run_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BIFORMER_CACHE", str(tmp_path / "cache"))
    args = ["bench", "yolo", "yolov8n.yaml", "yolov8n-bra-sppf.yaml", "--seeds", "0", "--epochs", "1",
            "--img-size", "32", "--rounds", "1", "--output", str(tmp_path / "runs"), "--csv", str(tmp_path / "t.csv")]
    assert main(args) == 0
    first = capsys.readouterr().out
    names = {"yolov8n", "yolov8n-bra-sppf"}
    rows = {line.split()[0]: line.split() for line in first.splitlines() if line.split()[:1] and line.split()[0] in names}
    assert set(rows) == names
    assert rows["yolov8n"][6] == "8.7"  # GFLOPs at 640, as ultralytics reports yolov8n
    assert float(rows["yolov8n-bra-sppf"][5]) > float(rows["yolov8n"][5])  # params_M: the BRA block's
    log = tmp_path / "runs" / "yolov8n-seed0.log"
    stamp = log.stat().st_mtime_ns
    assert main(args) == 0  # the finished runs are read back, not trained again
    assert log.stat().st_mtime_ns == stamp
    again = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
             if line.split()[:1] and line.split()[0] in names}
    assert {name: row[:7] for name, row in again.items()} == {name: row[:7] for name, row in rows.items()}
