"""Publishing the book: the Pages workflow, `make publish`, the repository/launch settings, the one install recipe
and the Colab setup cell. (The built site's links and launch buttons are checked in test_book.py's smoke build.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from ppcr.book import broken_internal_links, effective_config

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def make_variable(name: str) -> str:
    match = re.search(rf"^{name} \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert match, f"Makefile has no `{name} ?=` line"
    return match.group(1)


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), re.M))


def workflow() -> dict:
    return yaml.safe_load((REPO / ".github" / "workflows" / "book.yml").read_text())


def test_pages_workflow_builds_with_make_and_deploys_with_the_official_actions() -> None:
    wf = workflow()
    triggers = wf[True] if True in wf else wf["on"]  # YAML 1.1 reads the key `on` as True
    assert triggers["push"]["branches"] == ["main"]
    assert wf["permissions"] == {"contents": "read", "pages": "write", "id-token": "write"}
    steps = wf["jobs"]["build"]["steps"]
    uses = [s.get("uses", "") for s in steps]
    for action in ("actions/checkout@", "actions/setup-python@", "actions/cache@", "actions/configure-pages@",
                   "actions/upload-pages-artifact@"):
        assert any(u.startswith(action) for u in uses), action
    python = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python@"))
    assert python["with"]["cache"] == "pip"
    cache = next(s for s in steps if s.get("uses", "").startswith("actions/cache@"))
    assert cache["with"]["path"].rstrip("/") == "runs"
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-pages-artifact@"))
    assert upload["with"]["path"] == "_build/html"
    deploy = wf["jobs"]["deploy"]
    assert deploy["needs"] == "build" and deploy["steps"][0]["uses"].startswith("actions/deploy-pages@")
    # every make call names a target of the Makefile, and the book is built as a reader builds it
    calls = [m for s in steps for m in re.findall(r"\bmake (\w[\w-]*)", s.get("run", ""))]
    assert "book" in calls and set(calls) <= make_targets(), calls


def test_make_publish_and_the_install_recipe() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert {"install", "test", "book", "publish"} <= make_targets()
    publish = makefile[makefile.index("publish: install"):]
    assert "ghp_import" in publish.split("\n\n")[0] and "_build/html" in publish.split("\n\n")[0]
    # make install, Binder and Colab install the project with the same script
    assert "bash data_scripts/install_project.sh $(PY)" in makefile
    assert "data_scripts/install_project.sh" in (REPO / "binder" / "postBuild").read_text()
    script = (REPO / "data_scripts" / "install_project.sh").read_text()
    assert "torch==2.14.1 torchvision==0.29.1" in script and '-e ".[dev]"' in script
    done = subprocess.run(["make", "-n", "publish"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and "ghp_import" in done.stdout


def test_repository_settings_come_from_one_variable() -> None:
    url = make_variable("REPO_URL")
    config = yaml.safe_load((REPO / "_config.yml").read_text())
    assert config["repository"]["url"] == url and config["repository"]["branch"] == make_variable("REPO_BRANCH")
    assert config["repository"]["path_to_book"] == "notebooks"  # launch buttons open the source notebooks
    assert all((REPO / "notebooks" / f"{p.stem}.ipynb").is_file() for p in NOTEBOOKS)
    assert config["html"]["use_repository_button"] and config["html"]["use_issues_button"]
    assert config["launch_buttons"]["colab_url"] and config["launch_buttons"]["binderhub_url"]
    for path in NOTEBOOKS:
        cell = colab_cell(path)
        assert f'REPO_URL = "{url}"' in cell, f"{path.name}: its Colab cell must clone REPO_URL of the Makefile"


def test_effective_config_overrides_url_and_branch(tmp_path: Path) -> None:
    config = tmp_path / "_config.yml"
    config.write_text((REPO / "_config.yml").read_text())
    assert effective_config(config) == config
    out = effective_config(config, "https://github.com/someone/ppcr", "dev")
    data = yaml.safe_load(out.read_text())
    assert data["repository"] == {"url": "https://github.com/someone/ppcr", "path_to_book": "notebooks",
                                  "branch": "dev"}
    assert data["launch_buttons"] == yaml.safe_load(config.read_text())["launch_buttons"]
    assert config.read_text() == (REPO / "_config.yml").read_text()  # the tracked config is left alone


def colab_cell(path: Path) -> str:
    nb = json.loads(path.read_text())
    index = next(i for i, c in enumerate(nb["cells"]) if "parameters" in c.get("metadata", {}).get("tags", []))
    cell = nb["cells"][index + 1]  # right after the parameters (papermill injects its own after those)
    assert "remove-cell" in cell["metadata"]["tags"], path.name
    return "".join(cell["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_cell_installs_and_switches_to_the_gpu_profile(path: Path, monkeypatch) -> None:
    """Run the cell as Colab would (google.colab imported, commands recorded, not run)."""
    calls, folders = [], []
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setattr("os.chdir", folders.append)
    monkeypatch.setattr("os.path.isdir", lambda p: False)
    monkeypatch.setattr("os.path.isfile", lambda p: False)
    scope = {"profile": "demo", "device": "cpu", "run_dir": "runs/demo"}  # the parameters cell's defaults
    exec(colab_cell(path), scope)
    assert (scope["profile"], scope["device"], scope["run_dir"]) == ("synthetic", "cuda", "runs/synthetic")
    gpu = yaml.safe_load((REPO / "ppcr" / "recipe" / "profiles" / "synthetic.yaml").read_text())
    assert gpu["device"] in ("auto", "cuda")
    assert calls[0][:2] == ["git", "clone"] and calls[0][-2] == make_variable("REPO_URL")
    assert calls[1] == ["bash", "data_scripts/install_project.sh", sys.executable] and folders == ["ppcr-repo"]
    assert calls[2][1:] == ["-m", "ppcr.pipeline", "study", "--profile", "synthetic", "--out", "runs/synthetic"]


def test_colab_cell_does_nothing_elsewhere(monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran a command outside Colab"))
    scope = {"profile": "demo", "device": "cpu", "run_dir": "runs/demo"}
    exec(colab_cell(NOTEBOOKS[0]), scope)
    assert (scope["profile"], scope["device"]) == ("demo", "cpu")


def test_broken_internal_links(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.html").write_text('<a href="sub/b.html#x">b</a> <img src="missing.png"> <a href="#top">t</a>'
                                     '<a href="https://example.org/x">e</a> <a href="//cdn.example/y.js">c</a>')
    (tmp_path / "sub" / "b.html").write_text('<a href="../a.html?v=1">a</a> <a href="/c.html">c</a>')
    assert broken_internal_links(tmp_path) == ["a.html -> missing.png", "sub/b.html -> /c.html"]
    (tmp_path / "_static").mkdir()  # the theme's assets (some are unrendered Jinja templates) are not pages
    (tmp_path / "_static" / "macros.html").write_text("<link href=\"{{ pathto('x.css', 1) }}\">")
    assert broken_internal_links(tmp_path) == ["a.html -> missing.png", "sub/b.html -> /c.html"]


def test_pages_show_paths_relative_to_the_repository(tmp_path: Path) -> None:
    from ppcr.report.paths import REPO_ROOT, display_command, display_path

    assert display_path(REPO_ROOT / "runs" / "demo") == "runs/demo"
    assert display_path(REPO_ROOT) == "."
    assert display_path(tmp_path / "smoke_study0") == ".../smoke_study0"
    assert display_path("runs/demo") == "runs/demo"
    command = display_command([str(REPO_ROOT / "ppcr" / "pipeline.py"), "book", "--out", str(REPO_ROOT / "runs/x"),
                               f"--data-root={tmp_path / 'refer'}", "a b"])
    assert command == "ppcr/pipeline.py book --out runs/x --data-root=.../refer 'a b'"
    assert str(REPO_ROOT) not in command and str(tmp_path) not in command


def test_make_explore_prepares_a_live_copy_of_the_explorer(tmp_path: Path) -> None:
    (tmp_path / "study.json").write_text("{}")
    assert "explore" in make_targets()
    done = subprocess.run(["make", "-n", "explore", f"OUTDIR={tmp_path}"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    prepare = next(line for line in done.stdout.splitlines() if "papermill --prepare-only" in line)
    assert "notebooks/06_explorer.ipynb" in prepare and "-p live True" in prepare and f"-p run_dir {tmp_path}" in prepare
    assert f"jupyter lab {tmp_path}/06_explorer_live.ipynb" in done.stdout
    # the prepare step itself (no kernel): the copy carries live=True and the run folder in its injected cell
    import papermill

    out = tmp_path / "06_explorer_live.ipynb"
    papermill.execute_notebook(str(REPO / "notebooks" / "06_explorer.ipynb"), str(out), prepare_only=True,
                               parameters={"live": True, "run_dir": str(tmp_path)})
    injected = next(c for c in json.loads(out.read_text())["cells"]
                    if "injected-parameters" in c["metadata"].get("tags", []))
    assert "live = True" in "".join(injected["source"]) and str(tmp_path) in "".join(injected["source"])
    missing = subprocess.run(["make", "explore", f"OUTDIR={tmp_path / 'none'}"], cwd=REPO, capture_output=True, text=True)
    assert missing.returncode != 0 and "no study" in missing.stdout
