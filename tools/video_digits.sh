#!/usr/bin/env bash
# Clip models on the embedded moving digits (10 classes: 5 digits x 2 directions), one shared command and budget
# for every model, seeds 0-2:
#
#   bash tools/video_digits.sh RUNS_DIR
#
# 1. trains the image model the inflated arm starts from: biformer_tiny on the bundled digits, 10 epochs at 64 px;
# 2. trains each arm per seed with the same options (8 frames 2 apart, 32 px, 20 epochs, batch 16, lr 5e-4, gradient
#    clipping at 1): biformer3d_tiny from scratch, biformer3d_tiny inflated from step 1 (--pretrained; its head
#    starts afresh, since the file's classes, the digits 0-9, are not the clips'), torchvision's swin3d_t and r3d_18;
# 3. prints each arm's final validation top-1, median (range) over the seeds, with parameters and GFLOPs per clip;
# 4. times the four models on clips of the same size (inference and a training step, batch 8, interleaved rounds).
# Every run resumes where it stopped, so the script can be restarted.
set -euo pipefail
runs=${1:?give the folder for the runs}
python -m biformer train --data digits --model biformer_tiny --epochs 10 --img-size 64 --smoothing 0.1 --no-tensorboard \
  --resume --output "$runs/image_tiny" | tail -1
shared="--data moving-digits --img-size 32 --frames 8 --frame-stride 2 --epochs 20 --batch-size 16 --lr 5e-4 --clip-grad 1.0 --smoothing 0.1 --no-tensorboard"
for seed in 0 1 2; do
  for arm in biformer3d_tiny biformer3d_tiny_inflated swin3d_t r3d_18; do
    extra=(--model "${arm%_inflated}")
    [ "$arm" = biformer3d_tiny_inflated ] && extra+=(--pretrained "$runs/image_tiny/best.safetensors")
    python -m biformer train $shared --seed "$seed" "${extra[@]}" --resume --output "$runs/${arm}_seed$seed" | grep "^final"
  done
done
python - "$runs" <<'PY'
import json, statistics, sys
from pathlib import Path
from biformer.analysis.flops import total_multiply_adds
from biformer.tasks.video import create_clip_model
runs = Path(sys.argv[1])
for arm in ("biformer3d_tiny", "biformer3d_tiny_inflated", "swin3d_t", "r3d_18"):
    rows = [[json.loads(line) for line in (runs / f"{arm}_seed{seed}" / "metrics.jsonl").read_text().splitlines()]
            for seed in range(3)]
    final = [run[-1]["val_top1"] for run in rows]
    model = create_clip_model(arm.removesuffix("_inflated"), 10).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    gflops = total_multiply_adds(model, (8, 32, 32)) / 1e9
    show = lambda v: f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"
    print(f"{arm:<26} val top-1 {show(final)}   params {params:.1f} M   {gflops:.3f} GFLOPs per clip")
image = [json.loads(line) for line in (runs / "image_tiny" / "metrics.jsonl").read_text().splitlines()]
print(f"image biformer_tiny (digits) final top-1 {image[-1]['val_top1']:.2f}")
PY
python -m biformer bench model biformer3d_tiny swin3d_t r3d_18 --frames 8 --img-size 32 --batch 8 --repeats 5 --no-memory
