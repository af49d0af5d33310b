#!/usr/bin/env bash
# 3-D segmentation models on the embedded synthetic volumes (balls and boxes), one shared command and budget for
# every model, seeds 0-2:
#
#   bash tools/volume_compare.sh RUNS_DIR
#
# 1. trains the image model the inflated arm starts from: biformer_tiny classifying 2-D slices of the training
#    volumes (tools/volume_slices.py: empty / ball / box / both; no validation volume is sliced), 10 epochs at 64 px;
# 2. trains each arm per seed with the same options (64^3 crops, 10 epochs, batch 2, lr 1e-3, gradient clipping at
#    1): unet_biformer3d_tiny from scratch, unet_biformer3d_tiny inflated from step 1 (--pretrained), MONAI's
#    SwinUNETR (feature size 24) and UNet;
# 3. prints each arm's final validation Dice (mean over the foreground classes), median (range) over the seeds, with
#    parameters and GFLOPs (multiply-adds) of one 96^3 volume.
# Speed is measured apart, alone:
#   python -m biformer bench volumes unet_biformer3d_tiny swinunetr-24 monai_unet --sides 96
# Every run resumes where it stopped, so the script can be restarted.
set -euo pipefail
runs=${1:?give the folder for the runs}
if [ ! -d "$runs/slices" ]; then  # written aside, then renamed: an interrupted run leaves no half folder behind
  rm -rf "$runs/slices.partial"
  python tools/volume_slices.py "$runs/slices.partial"
  mv "$runs/slices.partial" "$runs/slices"
fi
python -m biformer train --data "$runs/slices" --model biformer_tiny --epochs 10 --img-size 64 --smoothing 0.1 \
  --no-tensorboard --resume --output "$runs/slices_tiny" | grep "^final"
shared="--data synthetic-volumes --img-size 64 --epochs 10 --batch-size 2 --lr 1e-3 --clip-grad 1.0 --no-tensorboard"
for arm in monai_unet unet_biformer3d_tiny unet_biformer3d_tiny_inflated swinunetr-24; do  # the cheapest first
  for seed in 0 1 2; do
    extra=(--model "${arm%_inflated}")
    [ "$arm" = unet_biformer3d_tiny_inflated ] && extra+=(--pretrained "$runs/slices_tiny/best.safetensors")
    python -m biformer train $shared --seed "$seed" "${extra[@]}" --resume --output "$runs/${arm}_seed$seed" \
      | grep "^final"
  done
done
python - "$runs" <<'PY'
import json, statistics, sys
from pathlib import Path
from biformer.analysis.flops import total_multiply_adds
from biformer.dense.volumes import create_volume_model
runs = Path(sys.argv[1])
for arm in ("unet_biformer3d_tiny", "unet_biformer3d_tiny_inflated", "swinunetr-24", "monai_unet"):
    final = [json.loads((runs / f"{arm}_seed{seed}" / "metrics.jsonl").read_text().splitlines()[-1])["val_dice"]
             for seed in range(3)]
    model = create_volume_model(arm.removesuffix("_inflated"), 3).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    gflops = total_multiply_adds(model, (96, 96, 96), in_chans=1) / 1e9
    show = f"{statistics.median(final):.2f} ({min(final):.2f}-{max(final):.2f})"
    print(f"{arm:<30} val Dice {show}   params {params:.1f} M   {gflops:.1f} GFLOPs per 96^3 volume")
image = json.loads((runs / "slices_tiny" / "metrics.jsonl").read_text().splitlines()[-1])
print(f"image biformer_tiny (slices) final top-1 {image['val_top1']:.2f}")
PY
