#!/usr/bin/env bash
# The packages the GPU image lacks (segment-anything, pycocotools) or has at another version than this project's
# lock (transformers, peft), as cp312 wheels in .whl/ (git-ignored), for `run` with carry [".whl"].
set -e
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  segment-anything==1.0 pycocotools==2.0.10 transformers==5.24.0 peft==0.21.2
ls -la .whl
