#!/usr/bin/env bash
# The device call of notes/gpu/README.md: run from the repository root on the GPU machine, with `.whl` carried.
#   BUDGET_S: seconds of stage-1 training (default 360); the call also spends ~1-2 min on data and start-up.
# The carried wheels (notes/gpu/wheels.sh: this checkout's versions) go first; if the image's other packages reject
# them at import, the call falls back to the image's own transformers stack plus the packages it lacks.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
check='import torch, transformers, peft, accelerate, segment_anything, pycocotools, ppcr.foundation, ppcr.training.stages
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__,
      "peft", peft.__version__, "accelerate", accelerate.__version__)'
pipi() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "${@:2}"; }
pipi /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
if ! python3 -c "$check" 2>&1 | tee "$OUT/import.txt"; then
  echo "carried stack rejected; falling back to the image's transformers" | tee -a "$OUT/import.txt"
  pipi /tmp/site2 .whl/segment_anything-*.whl .whl/pycocotools-*.whl .whl/peft-*.whl || exit 1
  export PYTHONPATH=/tmp/site2:$PWD
  python3 -c "$check" 2>&1 | tee -a "$OUT/import.txt" || exit 1
fi
nvidia-smi -L
python3 notes/gpu/foundation_long.py --budget-s "${BUDGET_S:-360}" --name "${NAME:-foundation_gpu_long}" --out /tmp/foundation_gpu --ret "$OUT" 2>&1 \
  | tee "$OUT/log.txt"
