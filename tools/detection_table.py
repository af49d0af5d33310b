"""The README's digit-scenes detection table from `biformer train` output folders: per model, the median and
range (min-max) over its runs (one per seed) of the last epoch's COCO AP; runs started with --pretrained form a
row of their own.

Usage: python tools/detection_table.py RUN_DIR [RUN_DIR ...]
"""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from biformer.checkpoints.weights import read_metadata

COLUMNS = {"val_bbox_ap": "box AP", "val_bbox_ap50": "box AP50", "val_bbox_ap75": "box AP75",
           "val_segm_ap": "mask AP", "val_segm_ap50": "mask AP50"}


def spread(values: list[float]) -> str:
    """'median (min-max)' to 2 decimals; the value alone for one run, '' for none."""
    if not values:
        return ""
    median = f"{statistics.median(values):.2f}"
    return median if len(values) == 1 else f"{median} ({min(values):.2f}-{max(values):.2f})"


def main(folders: list[str]) -> None:
    runs = defaultdict(list)  # model (and start) -> the last metrics row of each run
    for folder in map(Path, folders):
        last = (folder / "metrics.jsonl").read_text().splitlines()[-1]
        model = read_metadata(folder / "last.safetensors")["model"]
        config = folder / "config.json"
        if config.exists() and json.loads(config.read_text())["options"].get("pretrained", {}).get("value"):
            model += " (pretrained)"
        runs[model].append(json.loads(last))
    print(f"| model | runs | {' | '.join(COLUMNS.values())} |")
    print("| --- " * (len(COLUMNS) + 2) + "|")
    for model, rows in runs.items():
        cells = [spread([row[key] for row in rows if key in row]) for key in COLUMNS]
        print(f"| {model} | {len(rows)} | {' | '.join(cells)} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
