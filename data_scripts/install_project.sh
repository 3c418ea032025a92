#!/usr/bin/env bash
# Install the project into the Python interpreter given as $1 (default: python3). The one install recipe of every
# entry point: `make install` (into .venv), Binder (binder/postBuild) and the Colab cell of each notebook.
set -euo pipefail
PY="${1:-python3}"
cd "$(dirname "$0")/.."
"$PY" -m pip install -q --upgrade pip
# torch first and pinned: segment-anything imports torchvision, and both must match.
"$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$PY" -m pip install -q -e ".[dev]"
