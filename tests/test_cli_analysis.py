"""The analysis commands end to end: flops, complexity, convert, visualize."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import biformer  # noqa: F401  (registers the models)
from biformer.analysis.visualize import COLUMNS, DIM, MARGIN, SCALE_BAR_HEIGHT, TITLE_HEIGHT

SCALE_BAND = TITLE_HEIGHT + SCALE_BAR_HEIGHT + MARGIN  # the colour scale under the panels, with its caption
from biformer.checkpoints import load_checkpoint
from biformer.cli import main


def test_flops_prints_stages_kinds_and_what_is_not_counted(capsys):
    assert main(["flops", "biformer_nano", "--img-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "biformer_nano at 64x64" in out and "paper convention" in out
    for part in ("stem", "stages.0", "stages.3", "region attention", "routing", "not counted"):
        assert part in out


@pytest.mark.parametrize("argv,message", [
    (["flops", "no_such_model"], "is no model of any task"),
    (["flops", "biformer_nano", "--img-size", "1", "2", "3"], "--img-size"),
    (["complexity", "--output", "plot.jpg"], ".png"),
    (["complexity", "--size", "7", "7", "--topk", "50"], "no region count divides 7x7"),
])
def test_bad_arguments_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_complexity_writes_plot_table_and_csv(tmp_path, capsys):
    png, csv = tmp_path / "c.png", tmp_path / "c.csv"
    assert main(["complexity", "--size", "16", "16", "--dim", "32", "--topk", "4", "--repeats", "1",
                 "--output", str(png), "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "fewest FLOPs" in out and "S* = " in out
    with Image.open(png) as image:
        assert image.format == "PNG"
    assert len(csv.read_text().splitlines()) == 1 + 4  # S = 2, 4, 8, 16


@pytest.mark.slow
def test_convert_round_trip_is_bitwise_exact(golden_dir, tmp_path, capsys):
    golden = golden_dir / "biformer_tiny" / "weights.safetensors"
    ours, release, back = tmp_path / "ours.safetensors", tmp_path / "release.pth", tmp_path / "back.safetensors"
    assert main(["convert", str(golden), str(ours)]) == 0  # original layout -> ours (model inferred)
    assert main(["convert", str(ours), str(release)]) == 0  # .safetensors -> .pth: original layout
    assert main(["convert", str(release), str(back), "--to", "original", "--model", "biformer_tiny"]) == 0
    original = load_file(golden)
    converted = load_file(ours)
    assert "stem.0.weight" in converted and "downsample_layers.0.0.weight" not in converted
    # our layout loads strictly and gives the original's logits
    model = load_checkpoint(timm.create_model("biformer_tiny").eval(), ours)
    io = load_file(golden_dir / "biformer_tiny" / "io.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(io["x224.input"]), io["x224.logits"], atol=1e-4, rtol=0)
    for restored in (torch.load(release, weights_only=True)["model"], load_file(back)):
        assert restored.keys() == original.keys()
        for key, value in original.items():
            assert restored[key].dtype == value.dtype and restored[key].shape == value.shape
            assert torch.equal(restored[key].view(torch.int16), value.view(torch.int16)), key
    assert "biformer_tiny" in capsys.readouterr().out
    (tmp_path / "plain").touch()  # written files get the permissions of any new file, not mkstemp's 0600
    assert ours.stat().st_mode == release.stat().st_mode == (tmp_path / "plain").stat().st_mode


class NotATensor:
    pass


def test_convert_refuses_pickled_objects(tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": NotATensor()}, evil)
    assert main(["convert", str(evil), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("biformer convert: error:") and "refused for safety" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [evil]  # nothing written


def test_convert_refuses_wrong_model(golden_dir, tmp_path, capsys):
    golden = golden_dir / "biformer_tiny" / "weights.safetensors"
    assert main(["convert", str(golden), str(tmp_path / "x.safetensors"), "--model", "biformer_small"]) == 2
    assert "does not fit biformer_small" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_visualize_a_checkpoint_of_our_trainer_on_a_digit(tmp_path, capsys):
    """Model, input size and normalisation come from the checkpoint's metadata, as `train` writes them."""
    from biformer.checkpoints import save_weights

    model = timm.create_model("biformer_nano", num_classes=10)
    checkpoint = tmp_path / "best.safetensors"
    save_weights(checkpoint, model, {"model": "biformer_nano", "classes": [str(i) for i in range(10)], "epoch": 1,
                                     "img_size": 48, "mean": [0.1] * 3, "std": [0.3] * 3, "crop_pct": 1.0})
    out = tmp_path / "digit.png"
    assert main(["visualize", "--checkpoint", str(checkpoint), "--image", "digits:3", "--query", "20", "30",
                 "--block", "0.0", "--grid", "0", "--panel-size", "96", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    # stage 1 of a 48x48 input: a 12x12 map (stride 4) in 4x4 regions of 3x3 tokens
    assert "biformer_nano stage 1 block 1: 4x4 regions of 3x3 tokens (stride 4)" in printed
    with Image.open(out) as image:
        assert image.size == (MARGIN + COLUMNS * (96 + MARGIN), TITLE_HEIGHT + 96 + 2 * MARGIN + SCALE_BAND)


def test_visualize_draws_the_routed_regions(tmp_path, capsys):
    torch.manual_seed(1)
    model = timm.create_model("biformer_nano", num_classes=10).eval()
    checkpoint = tmp_path / "nano.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, checkpoint)
    size, panel_scale, query = 64, 2, (40, 20)
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "random.png")
    out = tmp_path / "routing.png"
    assert main(["visualize", "--model", "biformer_nano", "--checkpoint", str(checkpoint), "--image",
                 str(tmp_path / "random.png"), "--img-size", str(size), "--query", *map(str, query),
                 "--block", "1.0", "--panel-size", str(size * panel_scale), "--grid", "2", "--output", str(out)]) == 0
    capsys.readouterr()

    # routing of the query's region, from the model itself: stage 1 has an 8x8 map (stride 8) cut into
    # 4x4 regions of 2x2 tokens, i.e. 16x16-pixel regions
    layer = model.stages[1].blocks[0].attn
    inputs = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)
    inputs = (inputs - torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]) / torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    layer.record_routing = True
    with torch.no_grad():
        model(inputs[None])
    region_px, per_side = 16, 4
    query_region = (query[1] // region_px) * per_side + query[0] // region_px
    routed = set(layer.last_routing.routing.indices[0, query_region].tolist())
    assert len(routed) == 4

    panel = size * panel_scale
    with Image.open(out) as image:
        rows = 1 + math.ceil(4 / COLUMNS)  # top row + a 2x2 query grid
        assert image.size == (MARGIN + COLUMNS * (panel + MARGIN),
                              rows * (TITLE_HEIGHT + panel + MARGIN) + MARGIN + SCALE_BAND)
        drawn = np.asarray(image.convert("RGB"))
    # the routed-regions panel is row 0, column 1: routed regions in full colour, the others dimmed
    left, top = MARGIN + (panel + MARGIN), TITLE_HEIGHT + MARGIN
    shown = drawn[top:top + panel, left:left + panel]
    original = pixels.repeat(panel_scale, 0).repeat(panel_scale, 1)
    dimmed = (pixels * DIM).astype(np.uint8).repeat(panel_scale, 0).repeat(panel_scale, 1)
    border = 2 * panel_scale  # outlines
    for region in range(per_side * per_side):
        if region == query_region:
            continue  # holds the query marker
        r, c = divmod(region, per_side)
        box = np.s_[r * region_px * panel_scale + border:(r + 1) * region_px * panel_scale - border,
                    c * region_px * panel_scale + border:(c + 1) * region_px * panel_scale - border]
        expected = original if region in routed else dimmed
        assert np.array_equal(shown[box], expected[box]), f"region {region} ({'routed' if region in routed else 'not routed'})"


@pytest.mark.slow
def test_every_file_convert_writes_loads_in_predict_and_visualize(golden_dir, tmp_path, capsys):
    """`convert` writes our weight files (JSON metadata naming the model): eval, predict and visualize read
    them, in either layout, and the release .pth with --model."""
    golden = golden_dir / "biformer_tiny" / "weights.safetensors"
    ours, back, release = tmp_path / "ours.safetensors", tmp_path / "back.safetensors", tmp_path / "release.pth"
    assert main(["convert", str(golden), str(ours)]) == 0
    assert main(["convert", str(ours), str(back), "--to", "original"]) == 0
    assert main(["convert", str(ours), str(release)]) == 0
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    predictions = []
    for checkpoint, model in ((ours, []), (back, []), (back, ["--model", "biformer_tiny"]),
                              (release, ["--model", "biformer_tiny"])):
        capsys.readouterr()
        assert main(["predict", str(image), "--checkpoint", str(checkpoint), *model, "--json", "--topk", "3"]) == 0, \
            capsys.readouterr().err
        predictions.append(capsys.readouterr().out)
    assert len(set(predictions)) == 1  # the same weights whatever the file
    assert main(["visualize", "--checkpoint", str(back), "--query", "10", "10", "--grid", "0", "--panel-size", "64",
                 "--img-size", "64", "--output", str(tmp_path / "v.png")]) == 0


@pytest.fixture
def read_only_folder(tmp_path, monkeypatch):
    """A folder whose files cannot be created, as on a read-only file system (root writes anywhere else)."""
    import errno
    import tempfile

    folder = tmp_path / "read_only"
    folder.mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return folder


@pytest.mark.parametrize("command", [
    ["visualize", "--model", "biformer_nano", "--img-size", "32", "--query", "1", "1", "--output", "{folder}/v.png"],
    ["complexity", "--size", "8", "8", "--dim", "16", "--no-time", "--output", "{folder}/c.png"],
    ["complexity", "--size", "8", "8", "--dim", "16", "--no-time", "--output", "{tmp}/c.png", "--csv", "{folder}/c.csv"],
    ["convert", "{golden}", "{folder}/ours.safetensors"],
    ["bench", "op", "--shape", "8,8,16,1,2,2", "--repeats", "1", "--csv", "{folder}/b.csv"],
])
def test_unwritable_output_is_one_line_and_exit_2(command, read_only_folder, tmp_path, capsys):
    golden = Path(__file__).resolve().parents[2] / "shared" / "golden" / "biformer_tiny" / "weights.safetensors"
    argv = [word.format(folder=read_only_folder, tmp=tmp_path, golden=golden) for word in command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"biformer {command[0]}: error: ") and "Read-only file system" in err, err
    assert "Traceback" not in err and list(read_only_folder.iterdir()) == []


@pytest.mark.slow
def test_complexity_progress_writes_no_escape_codes_when_redirected(tmp_path):
    result = subprocess.run([sys.executable, "-m", "biformer", "complexity", "--size", "16", "16", "--dim", "32",
                             "--topk", "4", "--repeats", "2", "--output", str(tmp_path / "c.png")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for stream in (result.stdout, result.stderr):
        assert "\x1b[" not in stream and "\r" not in stream, repr(stream[-500:])
