"""`biformer bench detection`: peak memory and images/s of every model and mode, unknown models refused."""
import pytest

from biformer.cli import main


@pytest.mark.slow
def test_bench_detection_measures_every_model_and_mode(capsys, tmp_path):
    csv = tmp_path / "bench.csv"
    assert main(["bench", "detection", "retinanet_resnet18", "maskrcnn_resnet50_fpn", "--size", "64", "96",
                 "--rounds", "1", "--threads", "1", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "retinanet_resnet18" in out and "maskrcnn_resnet50_fpn" in out and "1x3x64x96" in out
    lines = csv.read_text().splitlines()
    assert len(lines) == 1 + 4  # two models x inference, training
    header = lines[0].split(",")
    for line in lines[1:]:
        row = dict(zip(header, line.split(",")))
        assert float(row["peak_rss_mb"]) >= float(row["loaded_mb"]) > 0 and float(row["images_per_s"]) > 0


def test_bench_detection_refuses_unknown_models(capsys):
    assert main(["bench", "detection", "maskrcnn_nonexistent_net"]) == 2
    assert "neither a detection model of ours" in capsys.readouterr().err
