#!/usr/bin/env bash
# Full-size step benchmark on one GPU: the official config with random weights, several modes.
# Usage: bash bench/gpu_step_suite.sh CONFIG_JSON OUT_JSONL
#   CONFIG_JSON: the official config ships as phi3v_ray/model/official_config.json
# Each configuration runs in its own process so an out-of-memory case cannot sink the others.
set -u
CONFIG=${1:?official config.json}
OUT=${2:?results jsonl}
run() { timeout 150 python3 bench/step.py --config "$CONFIG" --device cuda --warmup 2 --steps 5 --out "$OUT" "$@" \
        2>&1 | grep -v -E "Warning|warn|original_max" || echo "FAILED: $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
run --mode full --precision bf16 --micro-batch 1
run --mode full --precision bf16 --micro-batch 4
run --mode full --precision bf16 --master-fp32 --micro-batch 4
run --mode full --precision bf16 --micro-batch 4 --no-grad-ckpt
run --mode frozen_vision --precision bf16 --micro-batch 4
run --mode lora --precision bf16 --micro-batch 4 --lora-rank 64
