#!/usr/bin/env bash
# The packages the GPU image lacks (segment-anything, pycocotools) or has at another version than this project's
# environment (transformers and the hub stack it checks at import, peft, accelerate), as cp312 wheels in .whl/
# (git-ignored), for `run` with carry [".whl"]. Versions: those of this checkout's .venv (`make install`).
set -e
PY=${PY:-.venv/bin/python}
ver() { "$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
pkgs=""
for p in segment-anything pycocotools transformers tokenizers huggingface-hub httpx2 httpcore2 truststore \
         safetensors accelerate peft kernels; do
  v=$(ver "$p"); [ -n "$v" ] || { echo "not in $PY: $p" >&2; exit 1; }
  pkgs="$pkgs $p==$v"
done
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pkgs
ls -la .whl
