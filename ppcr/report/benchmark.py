"""The benchmark page: what each evaluated dataset asks of the model (`ppcr.data.stats`), beside the figures
published for RefCOCO, RefCOCO+ and RefCOCOg (`ppcr/resources/refcoco_published.csv`, each with its source)."""

from __future__ import annotations

import csv
import functools
import io
from importlib import resources
from pathlib import Path
from typing import Any

from ppcr.data.stats import OCCLUDED_BELOW, dataset_stats, ref_geometries
from ppcr.report.mechanism import token_grid
from ppcr.report.study import Study
from ppcr.report.tables import SYNREF_OF, Column, Table

NOT_PUBLISHED = "not published"
# figures the published sources give as numbers for every dataset, and those this project measures on any
PUBLISHED_FIGURES = ("images", "objects (refs)", "expressions", "words per expression",
                     "same-category objects per image", "expression kinds")
STANDS_FOR = {synref: refcoco for refcoco, synref in SYNREF_OF.items()}  # synref -> refcoco, ...
MEASURED_ONLY = ("target area (% of the image)", "box side in vision tokens", "partly occluded targets")


def published_figures() -> dict[str, dict[str, tuple[str, str]]]:
    """dataset -> figure -> (value, source), as the project's copy of the published figures lists them."""
    text = (resources.files("ppcr") / "resources" / "refcoco_published.csv").read_text(encoding="utf-8")
    out: dict[str, dict[str, tuple[str, str]]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        out.setdefault(row["dataset"], {})[row["figure"]] = (row["value"], row["source"])
    return out


def _spread(q: dict[str, float], digits: int = 1) -> str:
    return f"{q['median']:.{digits}f} ({q['p10']:.{digits}f}-{q['p90']:.{digits}f})"


@functools.lru_cache(maxsize=16)
def _geometries(root: str, name: str, split_by: str, grid: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every ref of a dataset and its geometry, read once for the table and the histogram of one page."""
    return ref_geometries(root, name, split_by, None, grid)


def benchmark_rows(study: Study, data_root: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per dataset the study evaluates: its figures over every ref (`ppcr.data.stats.dataset_stats`) at
    the study's vision-token grid."""
    root, grid = study.data_root(data_root), token_grid(study)
    rows = []
    for name, split_by in study.datasets.items():
        s = dataset_stats(root, name, split_by, None, grid, _geometries(str(root), name, split_by, grid))
        rows.append({
            "dataset": name, "stands_for": STANDS_FOR.get(name, name),
            "images": s["images"], "refs": s["refs"], "expressions": s["sentences"],
            "area": _spread(s["area_percent"]), "tokens": _spread(s["box_tokens"]),
            "snapped": s["snapped_iou50_percent"], "objects": s["objects_per_image"],
            "distractors": s["distractors_mean"],
            "occluded": "not recorded" if s["occluded_percent"] is None else f"{s['occluded_percent']:.0f}",
            "words": s["words_mean"],
            "kinds": ", ".join(f"{k} {v:.0f} %" for k, v in s["expr_types"].items()) or "not recorded",
        })
    return rows


def benchmark_table(study: Study, data_root: str | Path | None = None) -> Table:
    grid = token_grid(study)
    return Table(
        title="What each evaluated dataset asks of the model",
        columns=[Column("dataset", "dataset"), Column("stands_for", "stands in for"), Column("images", "images"),
                 Column("refs", "objects (refs)"), Column("expressions", "expressions"),
                 Column("area", "target area, % of the image: median (p10-p90)"),
                 Column("tokens", f"box side in vision tokens ({grid} x {grid} grid): median (p10-p90)"),
                 Column("snapped", "box snapped to the token grid, IoU >= 0.5 (%)"),
                 Column("objects", "objects per image"), Column("distractors", "same-category distractors"),
                 Column("occluded", f"partly occluded targets (%, < {100 * OCCLUDED_BELOW:.0f} % visible)"),
                 Column("words", "words per expression"), Column("kinds", "expression kinds")],
        rows=benchmark_rows(study, data_root),
        caption=("Every ref of each dataset (all splits), measured by `python -m ppcr.data.stats`. The box side is "
                 "the square root of the target box's area on the image padded to a square, in vision tokens of "
                 f"the study's preset ({study.preset}). The snapped column: the share of targets whose box, moved "
                 "to the nearest token edges, still overlaps itself at IoU >= 0.5, a bound on a reader that can "
                 "only point at whole tokens."),
    )


def published_table() -> Table:
    """The published figures of RefCOCO/+/g beside the figures this project measures (not published)."""
    figures = published_figures()
    rows = []
    for figure in PUBLISHED_FIGURES + MEASURED_ONLY:
        row: dict[str, Any] = {"figure": figure}
        for dataset, by_figure in figures.items():
            value, source = by_figure.get(figure, (NOT_PUBLISHED, ""))
            row[dataset] = value
            if source:
                row.setdefault("sources", set()).add(source.split(",")[0])
        row["sources"] = "; ".join(sorted(row.get("sources", set()))) or "-"
        rows.append(row)
    return Table(
        title="RefCOCO, RefCOCO+ and RefCOCOg as published",
        columns=[Column("figure", "figure")] + [Column(d, d) for d in figures] + [Column("sources", "source")],
        rows=rows,
        caption=("From the datasets' papers (Yu et al. 2016; Mao et al. 2016), as the project's copy "
                 "ppcr/resources/refcoco_published.csv lists them. The target's area, its box side in vision tokens "
                 "and the occluded share are not published; a user with the data measures them with `python -m "
                 "ppcr.data.stats --root <REFER root> --dataset refcoco --split-by unc --grid 24` (LLaVA-1.5's "
                 "CLIP ViT-L/14 at 336 px sees 24 x 24 tokens); COCO does not record occlusion."),
    )


def box_token_values(study: Study, data_root: str | Path | None = None) -> dict[str, list[float]]:
    """dataset -> every ref's box side in vision tokens (for a histogram)."""
    root, grid = study.data_root(data_root), token_grid(study)
    return {name: [g["box_tokens"] for g in _geometries(str(root), name, split_by, grid)[1]]
            for name, split_by in study.datasets.items()}
