#!/usr/bin/env bash
# The device call of notes/gpu/README.md: run from the repository root on the GPU machine, with `.whl` carried.
#   BUDGET_S: seconds of stage-1 training (default 360); the call also spends ~1-2 min on data and start-up.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L
python3 notes/gpu/foundation_long.py --budget-s "${BUDGET_S:-360}" --out /tmp/foundation_gpu --ret "$OUT" 2>&1 \
  | tee "$OUT/log.txt"
