"""The reproducibility book: execute the notebooks on a study's results, then build the Jupyter Book.

    python -m ppcr.pipeline book --profile demo --out runs/demo     (`make book`; calls `build` after the study)
    python -m ppcr.book --profile demo --out runs/demo               (only this stage, on an existing study)

`build` runs every `notebooks/*.ipynb` with papermill (kernel `python3`; parameters profile, run_dir, output_dir)
into the book folder (`book/01_...ipynb`, which `book/_toc.yml` lists), then `jupyter-book build` with the
`_config.yml` at the repository root, so the HTML lands in `_build/html` next to it. The executed notebooks keep
their widget state, so the explorer's rendered view is part of the static page.

The repository the book links to (its repository, issues and launch buttons) is `_config.yml`'s `repository`
section unless `build` gets `repo_url` / `repo_branch` (`make book REPO_URL=...`); then the build reads an effective
copy of the config, `_build/_config.effective.yml`, and `_config.yml` itself is left as it is.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import papermill as pm
import yaml

from ppcr import report
from ppcr.recipe.profile import Profile
from ppcr.report.paths import REPO_ROOT, repo_relative

KERNEL = "python3"
BOOK_SOURCES = ("_toc.yml", "*.md")  # what a copy of the book folder needs (the notebooks are executed into it)


class BookBuildError(RuntimeError):
    """A notebook or the Jupyter Book build failed; the message names which."""


def _resolve(path: str | Path) -> Path:
    """A path as given if it exists (or is absolute), else relative to the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (REPO_ROOT / p).resolve()


def find_config(book_dir: Path) -> Path:
    """The book's `_config.yml`: in the book folder, else in the folders above it (the repository root)."""
    for folder in (book_dir, *book_dir.parents):
        candidate = folder / "_config.yml"
        if candidate.is_file():
            return candidate
    raise BookBuildError(f"no _config.yml in {book_dir} or above it")


def copy_book_sources(dest: str | Path, book_dir: str | Path = "book", config: str | Path = "_config.yml") -> Path:
    """Copy the book's pages and `_toc.yml` into `dest` and `_config.yml` next to it (for builds outside the
    repository, e.g. tests); returns the new book folder."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    source = _resolve(book_dir)
    for pattern in BOOK_SOURCES:
        for f in source.glob(pattern):
            shutil.copy2(f, dest / f.name)
    shutil.copy2(_resolve(config), dest.parent / "_config.yml")
    return dest


def execute_notebooks(profile: str, run_dir: Path, book_dir: Path, notebooks_dir: Path,
                      progress: bool = True, parameters: dict | None = None) -> list[Path]:
    """Run every notebook with papermill into `book_dir`; raises BookBuildError naming a failing notebook."""

    notebooks = sorted(notebooks_dir.glob("[0-9]*.ipynb"))
    if not notebooks:
        raise BookBuildError(f"no notebooks in {notebooks_dir}")
    # the notebooks run in the repository root: paths inside it are passed relative, so the rendered parameters
    # cells do not show the builder's folders
    params = {"profile": profile, "run_dir": repo_relative(run_dir) or str(run_dir),
              "output_dir": repo_relative(book_dir) or str(book_dir), **(parameters or {})}
    written = []
    for nb in notebooks:
        target = book_dir / nb.name
        if progress:
            print(f"book: executing {nb.name} -> {target}", flush=True)
        try:
            pm.execute_notebook(str(nb), str(target), parameters=params, kernel_name=KERNEL,
                                progress_bar=progress, cwd=str(REPO_ROOT), store_widget_state=True)
        except pm.PapermillExecutionError as err:
            raise BookBuildError(f"notebook {nb.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                                 f"  the executed copy with the traceback is {target}") from err
        except Exception as err:  # a kernel that dies, a missing kernel, a bad notebook file
            raise BookBuildError(f"notebook {nb.name} could not be executed: {type(err).__name__}: {err}") from err
        written.append(target)
    return written


STATUS_PAGE = "_status.md"  # included by intro.md; written at every build, not in the repository


def write_status(run_dir: Path, book_dir: Path) -> Path:
    """The front page's status block (`report.status_markdown`) for the study in `run_dir`, as `book_dir/_status.md`."""
    out = book_dir / STATUS_PAGE
    out.write_text(report.status_markdown(report.load_study(run_dir)))
    return out


def effective_config(config: Path, repo_url: str | None = None, repo_branch: str | None = None) -> Path:
    """`config` itself, or, with a repository URL or branch given, a copy with them in its `repository` section
    (written to `_build/_config.effective.yml` next to `config`)."""
    if repo_url is None and repo_branch is None:
        return config

    data = yaml.safe_load(config.read_text()) or {}
    repository = dict(data.get("repository") or {})
    if repo_url is not None:
        repository["url"] = repo_url
    if repo_branch is not None:
        repository["branch"] = repo_branch
    data["repository"] = repository
    out = config.parent / "_build" / "_config.effective.yml"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# generated by ppcr.book from {config.name}: do not edit\n"
    out.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return out


def jupyter_book_command(book_dir: Path, config: Path, strict: bool, output_root: Path | None = None) -> list[str]:
    """`jupyter-book build` of `book_dir` with `config`; the HTML goes to `_build/html` under `output_root` (default:
    the config's folder)."""
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe)] if exe.is_file() else ["jupyter-book"]
    cmd += ["build", str(book_dir), "--config", str(config), "--toc", str(book_dir / "_toc.yml"),
            "--path-output", str(output_root or config.parent), "--all"]
    if strict:
        cmd += ["-W", "--keep-going"]
    return cmd


def build(profile: Profile | str, out: str | Path, progress: bool = True, book_dir: str | Path = "book",
          notebooks_dir: str | Path = "notebooks", strict: bool = False, parameters: dict | None = None,
          repo_url: str | None = None, repo_branch: str | None = None) -> int:
    """Execute the notebooks on the study in `out` and build the book; 0 on success, 1 with a message otherwise.

    strict: Sphinx warnings are errors (`-W`). parameters: more papermill parameters (e.g. seeds, device).
    repo_url, repo_branch: the repository the book's buttons link to (default: `_config.yml`'s).
    """
    name = profile.name if isinstance(profile, Profile) else str(profile)
    run_dir = Path(out).resolve()
    book = _resolve(book_dir)
    try:
        if not (run_dir / "study.json").is_file():
            raise BookBuildError(f"no study.json in {run_dir}: run `python -m ppcr.pipeline study --profile {name} "
                                 f"--out {out}` first")
        if not (book / "_toc.yml").is_file():
            raise BookBuildError(f"{book} has no _toc.yml (use copy_book_sources for a copy of the book)")
        config = find_config(book)
        execute_notebooks(name, run_dir, book, _resolve(notebooks_dir), progress, parameters)
        write_status(run_dir, book)
        cmd = jupyter_book_command(book, effective_config(config, repo_url, repo_branch), strict, config.parent)
        if progress:
            print("book: " + " ".join(cmd), flush=True)
        done = subprocess.run(cmd, cwd=str(config.parent))
        if done.returncode != 0:
            raise BookBuildError(f"jupyter-book build failed (exit {done.returncode}"
                                 f"{', warnings are errors in strict mode' if strict else ''}); see the log above")
    except BookBuildError as err:
        print(f"book: FAILED: {err}", file=sys.stderr, flush=True)
        return 1
    index = config.parent / "_build" / "html" / "index.html"
    print(f"book: the HTML is at {index} (open it in a browser; the explorer with live models: make explore)",
          flush=True)
    return 0


def broken_internal_links(html_dir: str | Path) -> list[str]:
    """Every `href`/`src` of the built site's pages that points inside the site but at no file: "page -> target".

    External links (with a scheme or `//`), in-page anchors, `mailto:` and `data:` are skipped; a link's `#fragment`
    and `?query` are dropped before the file is looked up. Files under `_static/` and `_sources/` are the theme's
    assets and page sources (some are Jinja templates the theme ships unrendered), not pages of the site."""
    from urllib.parse import unquote, urlsplit

    root = Path(html_dir).resolve()
    broken = []
    for page in sorted(root.rglob("*.html")):
        if page.relative_to(root).parts[0] in ("_static", "_sources"):
            continue
        for target in re.findall(r'(?:href|src)="([^"]*)"', page.read_text(errors="replace")):
            parts = urlsplit(target)
            if not parts.path or parts.scheme or target.startswith("//"):
                continue
            path = (root / unquote(parts.path).lstrip("/")) if parts.path.startswith("/") \
                else (page.parent / unquote(parts.path))
            if not path.exists():
                broken.append(f"{page.relative_to(root)} -> {target}")
    return broken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppcr.book", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--out", help="the study's run folder (default runs/<profile>)")
    parser.add_argument("--book-dir", default="book")
    parser.add_argument("--strict", action="store_true", help="Sphinx warnings are errors")
    parser.add_argument("--no-progress", action="store_true")
    add_repository_arguments(parser)
    args = parser.parse_args(argv)
    return build(args.profile, args.out or f"runs/{args.profile}", progress=not args.no_progress,
                 book_dir=args.book_dir, strict=args.strict, repo_url=args.repo_url, repo_branch=args.repo_branch)


def add_repository_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo-url", help="the repository the book links to (default: _config.yml's)")
    parser.add_argument("--repo-branch", help="its branch (default: _config.yml's)")


if __name__ == "__main__":
    sys.exit(main())
