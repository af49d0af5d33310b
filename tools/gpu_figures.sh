#!/usr/bin/env bash
# The GPU figures of the fast-BRA issue, in one run on a CUDA machine (the device tool's H100/H200).
# Usage: bash tools/gpu_figures.sh OUT_DIR [op|model|all]
# Writes pytest.log and CSV tables to OUT_DIR; prints the tables.
set -euo pipefail
out=${1:?OUT_DIR}; what=${2:-all}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
if [[ $what == op || $what == all ]]; then
  python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_ops_backends.py -m gpu 2>&1 | tee "$out/pytest.log" | tail -3
  # the flex backend: 13 tests, 8 compiled configurations (the first flex GPU run: a failure must not stop the figures)
  python3 -m pytest -q -n 4 -p no:cacheprovider tests/test_ops_flex.py -m gpu 2>&1 | tee "$out/pytest_flex.log" | tail -3 \
    || echo "flex GPU tests FAILED: see $out/pytest_flex.log"
  for dtype in float32 bfloat16; do
    python3 -m biformer bench op --device cuda --dtype $dtype --batch 64 --repeats 30 --warmup 3 \
      --backends triton --csv "$out/op_$dtype.csv"
  done
  # memory linear in tokens: 1x64x448x448, 2 heads, 8x8-token regions, topk 4 (the original cannot run it)
  python3 -m biformer bench op --device cuda --batch 1 --shape big=448,448,64,2,56,4 --repeats 10 \
    --backends triton indexed --csv "$out/op_448.csv"
  # flex beside triton, bfloat16 only: flex compiles its forward and forward+backward kernels for each stage shape
  # first (6 compilations), outside the timed rounds
  python3 -m biformer bench op --device cuda --dtype bfloat16 --batch 64 --repeats 30 --warmup 3 \
    --backends triton flex --csv "$out/op_flex_bfloat16.csv" || echo "flex op benchmark FAILED"
fi
if [[ $what == model || $what == all ]]; then
  for dtype in float32 bfloat16; do
    python3 -m biformer bench model --device cuda --dtype $dtype --batch 128 --repeats 8 --warmup 3 \
      biformer_tiny biformer_tiny:backend=reference biformer_small swin_tiny_patch4_window7_224 convnext_tiny \
      pvt_v2_b1 pvt_v2_b2 deit_small_patch16_224 --csv "$out/model_$dtype.csv"
  done
fi
