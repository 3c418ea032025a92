"""The package's layout follows the pipeline: imports point one way down it, no module imports another in a loop,
a function-level import says why it is not at the top, and no committed file names a developer's machine."""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ppcr"

# the pipeline, lowest first: a module may import from its own layer and the layers before it, never after
LAYERS = (
    ("ppcr.metrics", "ppcr.provenance", "ppcr.viz"),  # leaves: pure functions, the commit and device, drawing
    ("ppcr.data",),
    ("ppcr.model",),
    ("ppcr.recipe",),
    ("ppcr.training",),
    ("ppcr.foundation",),
    ("ppcr.evaluation",),
    ("ppcr.report",),
    ("ppcr.book",),
    ("ppcr.perf",),
    ("ppcr.pipeline", "ppcr.cli"),  # the entry points
)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    if module == "ppcr":
        return -1
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: add it where it belongs")


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def ppcr_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported ppcr module, line, at module level) of every import a module runs (not type-checking ones)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for block in ast.walk(tree) if _type_checking_block(block) for n in ast.walk(block)}
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ppcr"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            # `from ppcr.report import viz` names a module; `from ppcr.x import f` names a function of ppcr.x
            for name in names:
                target = name if (PACKAGE.parent / (name.replace(".", "/") + ".py")).is_file() or \
                    (PACKAGE.parent / name.replace(".", "/")).is_dir() else node.module
                found.append((target, node.lineno, id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in top) for a in node.names if a.name.startswith("ppcr")]
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_imports_point_down_the_pipeline():
    upward = []
    for name, path in modules().items():
        for target, line, _ in ppcr_imports(path):
            if target != "ppcr" and layer(target) > layer(name):
                upward.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not upward, "imports against the pipeline's direction:\n" + "\n".join(upward)


def test_no_two_modules_import_each_other_in_a_loop():
    mods = modules()
    graph = {name: sorted({t for t, _, _ in ppcr_imports(path) if t in mods and t != name})
             for name, path in mods.items()}
    # a package imports its own modules when one of them is imported: count `from ppcr.x import y` as an edge to
    # ppcr.x, and a package's __init__ as a node of its own
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert not cycles, "import loops: " + "; ".join(" -> ".join(c) for c in cycles)


def test_a_function_level_import_of_the_package_states_its_reason():
    """Imports belong at the top; one inside a function (an optional heavy dependency) carries a comment saying so,
    on its line or the line before."""
    unexplained = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        for target, line, at_top in ppcr_imports(path):
            if at_top:
                continue
            here, before = lines[line - 1], lines[line - 2] if line > 1 else ""
            if "#" not in here and "#" not in before:
                unexplained.append(f"{path.relative_to(REPO)}:{line} ({target})")
    assert not unexplained, "function-level imports without a reason:\n" + "\n".join(unexplained)


# a path of a developer's machine: a home folder or this workplace's working folders (/tmp is anyone's scratch;
# /home/me is the documented example of ppcr.report.paths)
MACHINE_PATH = re.compile(r"(?<![\w.])(/work/|/home/(?!me/)[a-z]|/root/|/Users/)")


def test_no_committed_file_names_a_developers_machine():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not files:  # not a git checkout (an sdist): nothing to check
        return
    found = []
    for rel in files:
        path = REPO / rel
        if rel == "tests/test_layout.py":  # (its own pattern)
            continue
        if path.is_symlink():  # a committed link: its target is its text (a fresh clone's link to nowhere)
            target = os.readlink(path)
            if os.path.isabs(target) or MACHINE_PATH.search(target):
                found.append(f"{rel} -> {target}")
            continue
        if path.suffix in (".png", ".jpg", ".safetensors", ".pt", ".bin") or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append(f"{rel}:{number}: {line.strip()[:100]}")
    assert not found, "absolute paths of a developer's machine:\n" + "\n".join(found[:20])
