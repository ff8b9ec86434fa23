#!/usr/bin/env bash
# The training step on one GPU, every mode, at the DocVQA shape (a 1700×2200 page at 16 crops, 2550
# tokens, 8 supervised, micro batch 4), and a table of images/s, tokens/s, peak GiB, MFU and HFU.
#
#   bash bench/gpu_step_suite.sh [OUT_JSONL] [CONFIG_JSON]        # ~5 minutes on an H200
#
# CONFIG_JSON defaults to the official config shipped in phi3v_ray/model/official_config.json; random
# bf16 weights are written once to $WEIGHTS_DIR (8.3 GB) and reused by every row. Each row runs the
# real step (bench/step.py: load_model + the engine, ZeRO-2 for full/frozen_vision when deepspeed is
# installed, the single-GPU engine otherwise) in its own process, so an out-of-memory row cannot sink
# the others. Extra arguments for every row: STEP_ARGS="--micro-batch 2".
#
# Fused kernels: the rows run with --fused-kernels auto (liger-kernel's RMSNorm, SwiGLU, rope and CLIP
# LayerNorm when it is installed: pip install -e '.[gpu]'); full and LoRA also run as a before/after pair,
# --fused-kernels none then liger, when liger-kernel is installed.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/step_suite_$(date +%Y%m%d_%H%M%S).jsonl}
CONFIG=${2:-phi3v_ray/model/official_config.json}
PY=${PYTHON:-python3}
WEIGHTS_DIR=${WEIGHTS_DIR:-/tmp/phi3v-bench-random}
run() { timeout "${ROW_TIMEOUT:-420}" "$PY" bench/step.py --config "$CONFIG" --weights-dir "$WEIGHTS_DIR" \
          --device cuda --precision bf16 --micro-batch 4 --warmup 2 --steps 5 --out "$OUT" ${STEP_ARGS:-} "$@" \
        2>&1 | grep -E '^\{' || echo "FAILED: $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
"$PY" -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>/dev/null || echo "deepspeed: not installed (single-GPU engine)"
LIGER=$("$PY" -c "import liger_kernel, triton; from importlib.metadata import version; print(version('liger-kernel'), 'triton', triton.__version__)" 2>/dev/null)
echo "liger-kernel: ${LIGER:-not installed (pip install -e '.[gpu]'): the fused before/after rows are skipped}"
run --mode full --activation-checkpointing all          # the old default, for comparison
if [ -n "$LIGER" ]; then
  run --mode full --fused-kernels none                  # before/after: transformers' modules, then liger's kernels
  run --mode full --fused-kernels liger
else
  run --mode full
fi
run --mode frozen_vision
if [ -n "$LIGER" ]; then
  run --mode lora --fused-kernels none
  run --mode lora --fused-kernels liger
else
  run --mode lora
fi
if "$PY" -c "import bitsandbytes" 2>/dev/null; then run --mode qlora; else echo "qlora: bitsandbytes not installed, skipped"; fi
"$PY" bench/step.py --table "$OUT"
