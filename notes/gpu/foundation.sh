#!/usr/bin/env bash
# The foundation's one recipe on one GPU (the device tool's `run`, carry [".whl"], timeout_s 600), from the
# repository root there. Prepared and tried at the smoke profile on the CPU (PROFILE=smoke DEVICE=cpu); not yet run
# on a GPU. See notes/gpu/README.md.
#   PROFILE: the foundation profile (default foundation); DEVICE: cuda (default) or cpu
#   BUDGET_S: seconds the two stages may train (default 450) before they are stopped; then nothing is assembled and
#   the call returns the logs and the step each stage reached (its samples/s tell what a whole run would take)
# Stages 0 and 1 are independent and run as two processes on the one device; the weights, manifest.json and
# curves.json come back under $OUT as a tar in 15-MiB parts (the tool returns at most 8 files of 16 MiB):
#   cat <files_at>/foundation.tar.part* | tar -x -C <dest>        # here, then `python -m ppcr.foundation verify`
set -o pipefail; shopt -s nullglob
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PROFILE=${PROFILE:-foundation} DEVICE=${DEVICE:-cuda} RUN=${RUN:-/tmp/foundation_run} OUT=${OUT:-/tmp/foundation_out}
mkdir -p "$OUT"
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then  # the carried wheels (notes/gpu/wheels.sh) before the image's packages
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PY:-python3}
"$PY" -c 'import torch, transformers, peft, accelerate, segment_anything, pycocotools, ppcr.foundation
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)' \
  2>&1 | tee "$OUT/import.txt" || exit 1
command -v nvidia-smi >/dev/null && nvidia-smi -L
t0=$(date +%s)
train() { timeout "${BUDGET_S:-450}" "$PY" -m ppcr.foundation train --profile "$PROFILE" --device "$DEVICE" --out "$RUN" --no-progress "$@"; }
"$PY" -c "import sys; from ppcr.recipe.profile import load_profile; from ppcr.training.data import prepare_data
prepare_data(load_profile(sys.argv[1]), sys.argv[2], progress=False, workers=$(nproc))" "$PROFILE" "$RUN" || exit 1
echo "data: $(( $(date +%s) - t0 )) s"
reached() { for f in "$RUN"/stages/seed0/*/checkpoint/trainer_state.json; do echo "$f: $(cat "$f")"; done
            tail -q -n 1 "$RUN"/stages/seed0/*/log.csv; }
train --stage sam_pretrain > "$OUT/stage0.txt" 2>&1 & s0=$!
train --stage mllm_pretrain > "$OUT/stage1.txt" 2>&1 & s1=$!
wait $s0; r0=$?; wait $s1; r1=$?
status=$(( r0 | r1 ))
echo "stages: $(( $(date +%s) - t0 )) s (exit $status)"
if [ $status -ne 0 ]; then tail -n 20 "$OUT/stage0.txt" "$OUT/stage1.txt"; reached; exit 1; fi
BUDGET_S=600 train --dest "$RUN/dest" 2>&1 | tee "$OUT/assemble.txt" || exit 1
tar -C "$RUN/dest" -cf - . | split -b 15M -d - "$OUT/foundation.tar.part"
echo "total: $(( $(date +%s) - t0 )) s"; ls -la "$OUT"
