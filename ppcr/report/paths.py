"""Paths as the published book shows them: relative to the repository, so a page leaks nothing of the builder's
machine (its home, its user name, its scratch folders).

    display_path("/home/me/ppcr/runs/demo")          -> "runs/demo"           (inside the repository)
    display_path("/tmp/pytest-7/smoke_study0")       -> ".../smoke_study0"    (outside: the last part only)
    display_command(["/home/me/ppcr/ppcr/pipeline.py", "book", "--out", "/home/me/ppcr/runs/demo"])
                                                      -> "ppcr/pipeline.py book --out runs/demo"
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]


def repo_relative(path: str | os.PathLike, root: Path = REPO_ROOT) -> str | None:
    """`path` relative to `root` when it lies inside it (after resolving), else None."""
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix() or "."
    except (ValueError, OSError):
        return None


def display_path(path: str | os.PathLike, root: Path = REPO_ROOT) -> str:
    """The repository-relative path, or for a path outside the repository `.../<its last part>`; relative paths
    are shown as given."""
    if not os.path.isabs(path):
        return Path(path).as_posix()
    inside = repo_relative(path, root)
    return inside if inside is not None else f".../{Path(path).name}"


def display_command(argv: Sequence[str], root: Path = REPO_ROOT) -> str:
    """A command line with every absolute path argument (also in `--flag=/path`) shown by `display_path`."""
    shown = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if eq and flag.startswith("-") and os.path.isabs(value):
            shown.append(f"{flag}={display_path(value, root)}")
        elif os.path.isabs(arg):
            shown.append(display_path(arg, root))
        else:
            shown.append(arg)
    return shlex.join(shown)
