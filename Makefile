# Two commands matter on a fresh machine:  `make book`  and  `make test`.
# Both create .venv if it is missing and install the project into it.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= demo
OUTDIR ?= runs/$(PROFILE)
# the paper profile's local inputs: `make book PROFILE=paper DATA=<REFER root> LLAVA=<llava-1.5-7b-hf> SAM=<.pth>`
DATA ?=
LLAVA ?=
SAM ?=
PAPER_ARGS := $(if $(DATA),--data-root $(DATA)) $(if $(LLAVA),--llava-path $(LLAVA)) $(if $(SAM),--sam-checkpoint $(SAM))
# The public repository the book links to (repository/issues buttons, Binder and Colab launch buttons). A
# placeholder until the project has a public URL: `make book REPO_URL=https://github.com/<owner>/<repo>`. The Colab
# cell of each notebook repeats it (tests/test_publish.py checks they agree).
REPO_URL ?= https://github.com/OWNER/ppcr-reproduction
REPO_BRANCH ?= main
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test book data publish explore clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	bash data_scripts/install_project.sh $(PY)
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

data: install
	$(PY) -m ppcr.pipeline data --profile $(PROFILE) --out $(OUTDIR) $(PAPER_ARGS)

book: install
	$(PY) -m ppcr.pipeline book --profile $(PROFILE) --out $(OUTDIR) $(PAPER_ARGS) --repo-url $(REPO_URL) --repo-branch $(REPO_BRANCH)

# Push the built book (_build/html, from `make book`) to the gh-pages branch of `origin`, by hand; CI deploys it
# with .github/workflows/book.yml instead.
publish: install
	@test -f _build/html/index.html || { echo "publish: no _build/html/index.html; run make book first"; exit 1; }
	$(PY) -m ghp_import --no-jekyll --push --force --message "book: $$(git rev-parse --short HEAD)" _build/html

# The explorer with live models: a copy of notebooks/06_explorer.ipynb with live=True and this run's folder (papermill
# --prepare-only: parameters injected, nothing executed), opened in JupyterLab; Run All, then type an expression.
EXPLORER_COPY := $(OUTDIR)/06_explorer_live.ipynb
explore: install
	@test -f $(OUTDIR)/study.json || { echo "explore: no study in $(OUTDIR); run make book (or make data + the study) first"; exit 1; }
	$(PY) -c "import jupyterlab" 2>/dev/null || $(PY) -m pip install -q "jupyterlab>=4"
	$(PY) -m papermill --prepare-only notebooks/06_explorer.ipynb $(EXPLORER_COPY) -p live True -p profile $(PROFILE) -p run_dir $(abspath $(OUTDIR)) -p output_dir $(abspath $(OUTDIR))
	$(PY) -m jupyter lab $(EXPLORER_COPY)

clean:
	rm -rf _build runs
