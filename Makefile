# Two commands matter on a fresh machine:  `make book`  and  `make test`.
# Both create .venv if it is missing and install the project into it.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= demo
OUTDIR ?= runs/$(PROFILE)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test book data clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: segment-anything imports torchvision, and both must match.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

data: install
	$(PY) -m ppcr.pipeline data --profile $(PROFILE) --out $(OUTDIR)

book: install
	$(PY) -m ppcr.pipeline book --profile $(PROFILE) --out $(OUTDIR)

clean:
	rm -rf _build runs
