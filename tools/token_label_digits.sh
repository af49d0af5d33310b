#!/usr/bin/env bash
# Token labelling on the bundled digits: a biformer_nano student trained with a biformer_tiny teacher's token
# labels, against the same command without them; one shared budget, seeds 0-2.
#
#   bash tools/token_label_digits.sh RUNS_DIR
#
# 1. trains the teacher (biformer_tiny, 30 epochs at 64 px) and labels the training images with it (its 2x2 map
#    at 64 px, top 5 classes per cell);
# 2. trains the student (biformer_nano, 10 epochs at 64 px: a 2x2 final token grid) three ways per seed: without
#    token labels, with them, and with them and MixToken;
# 3. prints each arm's final and best validation top-1 and final validation loss, median (range) over the
#    seeds. Every run resumes where it
#    stopped, so the script can be restarted.
set -euo pipefail
runs=${1:?give the folder for the runs}
python -m biformer train --data digits --model biformer_tiny --epochs 30 --img-size 64 --smoothing 0.1 --no-tensorboard \
  --resume --output "$runs/teacher" | tail -2
python -m biformer label --teacher "$runs/teacher/best.safetensors" --data digits --output "$runs/labels"
shared="--data digits --model biformer_nano --img-size 64 --epochs 10 --smoothing 0.1 --no-tensorboard"
for seed in 0 1 2; do
  for arm in plain token_labels token_labels_mixtoken; do
    out="$runs/${arm}_seed$seed"
    extra=()
    [ "$arm" != plain ] && extra+=(--token-label "$runs/labels")
    [ "$arm" = token_labels_mixtoken ] && extra+=(--mixtoken)
    python -m biformer train $shared --seed "$seed" "${extra[@]}" --resume --output "$out" | grep "^final"
  done
done
python - "$runs" <<'PY'
import json, statistics, sys
from pathlib import Path
runs = Path(sys.argv[1])
for arm in ("plain", "token_labels", "token_labels_mixtoken"):
    rows = [[json.loads(line) for line in (runs / f"{arm}_seed{seed}" / "metrics.jsonl").read_text().splitlines()]
            for seed in range(3)]
    final = [run[-1]["val_top1"] for run in rows]
    best = [max(row["val_top1"] for row in run) for run in rows]
    loss = [run[-1]["val_loss"] for run in rows]
    show = lambda v, digits=2: f"{statistics.median(v):.{digits}f} ({min(v):.{digits}f}-{max(v):.{digits}f})"
    print(f"{arm:<24} final top-1 {show(final)}   best top-1 {show(best)}   final val loss {show(loss, 4)}")
teacher = [json.loads(line) for line in (runs / "teacher" / "metrics.jsonl").read_text().splitlines()]
print(f"teacher biformer_tiny     final top-1 {teacher[-1]['val_top1']:.2f}")
PY
