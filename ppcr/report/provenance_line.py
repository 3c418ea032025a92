"""Provenance: the markdown line saying which run a page's numbers come from."""

from __future__ import annotations

import shlex

from ppcr.report.paths import display_command, display_path
from ppcr.report.study import Study


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def provenance(study: Study) -> str:
    """One markdown line: which run the page's numbers come from."""
    wall = study.index.get("wall_s")
    training = sum(float(st.get("wall_s") or 0) for st in study.index.get("stages", []))
    wall_text = (f"{_duration(wall)} (training stages, cached ones included: {_duration(training)})"
                 if isinstance(wall, (int, float)) else "?")
    kind = ("SynRef (synthetic) results of a small model, not RefCOCO numbers" if study.is_synthetic
            else "RefCOCO/+/g results")
    return (f"**Results shown:** profile `{study.profile}` (preset `{study.preset}`; {kind}) \u00b7 seeds "
            f"{study.seeds} \u00b7 commit `{study.commit}` \u00b7 device {study.device} \u00b7 last study run "
            f"{wall_text} \u00b7 run folder `{display_path(study.run_dir)}` \u00b7 made by "
            f"`{_shown_command(study.index.get('command', '?'))}`")


def _shown_command(command: str) -> str:
    """A recorded command with its absolute paths shown relative to the repository (older runs kept them)."""
    try:
        return display_command(shlex.split(command))
    except ValueError:  # unbalanced quotes in a hand-edited index
        return command
