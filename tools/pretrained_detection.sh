#!/usr/bin/env bash
# Dense models from a pretrained backbone on digit-scenes, against BiFormer from scratch: one shared budget.
#
#   bash tools/pretrained_detection.sh RUNS_DIR
#
# 1. cuts the scenes' digits into a class folder (tools/scene_crops.py) and trains biformer_tiny, convnext_atto
#    and resnet18 classifiers on it by one command;
# 2. trains retinanet_* and maskrcnn_* of each backbone from its classifier (--pretrained), and of biformer_tiny
#    from scratch, seeds 0-2, on one shared budget (120 RetinaNet steps at 128 px, 30 Mask R-CNN steps at 112 px,
#    each with a 10-step warm-up: half and a quarter of results.md's from-scratch detection table, so that the
#    24 runs fit in about two hours on a 2-core CPU);
# 3. prints the AP table (tools/detection_table.py). Finished runs are skipped, so it can be restarted.
set -euo pipefail
runs=${1:?give the folder for the runs}
python tools/scene_crops.py "$runs/crops" > /dev/null
for backbone in biformer_tiny convnext_atto resnet18; do
  [ -f "$runs/cls_$backbone/last.safetensors" ] || python -m biformer train --data "$runs/crops" --model "$backbone" \
    --img-size 32 --epochs 10 --batch-size 64 --no-tensorboard --output "$runs/cls_$backbone" | tail -2
done
retinanet="--img-size 128 --iters 120"
maskrcnn="--img-size 112 --iters 30"
shared="--data digit-scenes --recipe none --batch-size 8 --lr 1e-3 --warmup-iters 10 --drop-path 0 --clip-grad 10 --no-tensorboard"
for head in retinanet maskrcnn; do
  for seed in 0 1 2; do
    for start in biformer_tiny:scratch biformer_tiny:pretrained convnext_atto:pretrained resnet18:pretrained; do
      backbone=${start%%:*}; kind=${start##*:}
      out="$runs/${head}_${backbone}_${kind}_seed$seed"
      [ -f "$out/last.safetensors" ] && continue
      weights=(); [ "$kind" = pretrained ] && weights=(--pretrained "$runs/cls_$backbone/last.safetensors")
      python -m biformer train --model "${head}_$backbone" ${!head} $shared --seed "$seed" "${weights[@]}" \
        --output "$out" | grep -E "^(final|--pretrained:)"
    done
  done
done
python tools/detection_table.py "$runs"/retinanet_*_seed* "$runs"/maskrcnn_*_seed*
