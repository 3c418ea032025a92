# Two commands matter on a fresh machine:  `make book`  and  `make test`.
# Both create .venv if it is missing and install the project into it.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= demo
OUTDIR ?= runs/$(PROFILE)
# The public repository the book links to (repository/issues buttons, Binder and Colab launch buttons). A
# placeholder until the project has a public URL: `make book REPO_URL=https://github.com/<owner>/<repo>`. The Colab
# cell of each notebook repeats it (tests/test_publish.py checks they agree).
REPO_URL ?= https://github.com/OWNER/ppcr-reproduction
REPO_BRANCH ?= main
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test book data publish clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	bash data_scripts/install_project.sh $(PY)
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

data: install
	$(PY) -m ppcr.pipeline data --profile $(PROFILE) --out $(OUTDIR)

book: install
	$(PY) -m ppcr.pipeline book --profile $(PROFILE) --out $(OUTDIR) --repo-url $(REPO_URL) --repo-branch $(REPO_BRANCH)

# Push the built book (_build/html, from `make book`) to the gh-pages branch of `origin`, by hand; CI deploys it
# with .github/workflows/book.yml instead.
publish: install
	@test -f _build/html/index.html || { echo "publish: no _build/html/index.html; run make book first"; exit 1; }
	$(PY) -m ghp_import --no-jekyll --push --force --message "book: $$(git rev-parse --short HEAD)" _build/html

clean:
	rm -rf _build runs
