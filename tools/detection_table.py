"""The README's digit-scenes detection table from `biformer train` output folders: per model, the median and
range (min-max) over its runs (one per seed) of the last epoch's COCO AP and of the epochs' summed time.

Usage: python tools/detection_table.py RUN_DIR [RUN_DIR ...]
"""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from biformer.checkpoints.files import read_metadata

COLUMNS = {"val_bbox_ap": "box AP", "val_bbox_ap50": "box AP50", "val_bbox_ap75": "box AP75",
           "val_segm_ap": "mask AP", "val_segm_ap50": "mask AP50"}


def spread(values: list[float], digits: int) -> str:
    if not values:
        return ""
    median = f"{statistics.median(values):.{digits}f}"
    return median if len(values) == 1 else f"{median} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main(folders: list[str]) -> None:
    runs = defaultdict(list)  # model -> last metrics row of each run, with its summed epoch time
    for folder in map(Path, folders):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        last = {**rows[-1], "minutes": sum(row["epoch_time_s"] for row in rows) / 60}
        runs[read_metadata(folder / "last.safetensors")["model"]].append(last)
    print(f"| model | runs | {' | '.join(COLUMNS.values())} | epochs' time (min) |")
    print("| --- " * (len(COLUMNS) + 3) + "|")
    for model, rows in runs.items():
        cells = [spread([row[key] for row in rows if key in row], 2) for key in COLUMNS]
        print(f"| {model} | {len(rows)} | {' | '.join(cells)} | {spread([row['minutes'] for row in rows], 1)} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
