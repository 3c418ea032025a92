"""The reproducibility book: execute the notebooks on a study's results, then build the Jupyter Book.

    python -m ppcr.pipeline book --profile demo --out runs/demo     (`make book`; calls `build` after the study)
    python -m ppcr.book --profile demo --out runs/demo               (only this stage, on an existing study)

`build` runs every `notebooks/*.ipynb` with papermill (kernel `python3`; parameters profile, run_dir, output_dir)
into the book folder (`book/01_...ipynb`, which `book/_toc.yml` lists), then `jupyter-book build` with the
`_config.yml` at the repository root, so the HTML lands in `_build/html` next to it. The executed notebooks keep
their widget state, so the explorer's rendered view is part of the static page.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from ppcr.training.profile import Profile

REPO_ROOT = Path(__file__).resolve().parents[1]
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
    import papermill as pm

    notebooks = sorted(notebooks_dir.glob("[0-9]*.ipynb"))
    if not notebooks:
        raise BookBuildError(f"no notebooks in {notebooks_dir}")
    params = {"profile": profile, "run_dir": str(run_dir), "output_dir": str(book_dir), **(parameters or {})}
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


def jupyter_book_command(book_dir: Path, config: Path, strict: bool) -> list[str]:
    """`jupyter-book build` of `book_dir` with `config`; the HTML goes to `_build/html` next to the config."""
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe)] if exe.is_file() else ["jupyter-book"]
    cmd += ["build", str(book_dir), "--config", str(config), "--toc", str(book_dir / "_toc.yml"),
            "--path-output", str(config.parent), "--all"]
    if strict:
        cmd += ["-W", "--keep-going"]
    return cmd


def build(profile: Profile | str, out: str | Path, progress: bool = True, book_dir: str | Path = "book",
          notebooks_dir: str | Path = "notebooks", strict: bool = False, parameters: dict | None = None) -> int:
    """Execute the notebooks on the study in `out` and build the book; 0 on success, 1 with a message otherwise.

    strict: Sphinx warnings are errors (`-W`). parameters: more papermill parameters (e.g. seeds, device).
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
        cmd = jupyter_book_command(book, config, strict)
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
    print(f"book: the HTML is at {index} (open it in a browser; the explorer page needs a kernel to interact: "
          f"jupyter lab notebooks/06_explorer.ipynb)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppcr.book", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--out", help="the study's run folder (default runs/<profile>)")
    parser.add_argument("--book-dir", default="book")
    parser.add_argument("--strict", action="store_true", help="Sphinx warnings are errors")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    return build(args.profile, args.out or f"runs/{args.profile}", progress=not args.no_progress,
                 book_dir=args.book_dir, strict=args.strict)


if __name__ == "__main__":
    sys.exit(main())
