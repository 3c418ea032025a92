"""Everything the book's notebooks show, computed from a study's results files (the notebooks stay thin).

    study = load_study("runs/demo")           # study.json + every results/<variant>/seed<k>.json
    table1(study)                               # the paper's Table 1 beside the rows this run reproduces
    table2(study), table3(study), box_head_costs(study)
    seed_summary(study), bootstrap_gains(study), breakdown(study, "expr_type"), failure_cases(study)
    provenance(study)                           # one markdown line: profile, preset, commit, device, command

Tables are `Table` objects (no pandas): rows are plain dicts, `to_html` / `to_markdown` render them and a notebook
shows one through its `_repr_html_`. Paper numbers come from `ppcr/resources/ppcr_paper_tables.csv` and are always
labelled "paper"; reproduced numbers come from the results files and are labelled with the run's profile.

Small profiles run on SynRef: `synref` stands in for RefCOCO (val/testA/testB), `synref+` for RefCOCO+ and
`synrefg` (umd val/test) for RefCOCOg Val(U)/Test(U). Those rows are results of a small model on a synthetic
benchmark, never RefCOCO numbers; every caption says so.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ppcr.metrics import paired_bootstrap
from ppcr.model.config import VARIANTS

# ---------------------------------------------------------------------------------------------------------------
# the study
# ---------------------------------------------------------------------------------------------------------------

SMALL_PROFILES = ("smoke", "demo", "synthetic")
METRICS = ("oIoU", "mIoU", "P@0.5", "P@0.7", "P@0.9", "box_acc@0.5")


@dataclass
class Study:
    """A study's index (study.json) and every results file it lists: results[variant][seed] -> results dict."""

    run_dir: Path
    index: dict[str, Any]
    results: dict[str, dict[int, dict[str, Any]]]

    @property
    def profile(self) -> str:
        return str(self.index.get("profile", "?"))

    @property
    def preset(self) -> str:
        return str(self.index.get("preset", "?"))

    @property
    def seeds(self) -> list[int]:
        return sorted({seed for by_seed in self.results.values() for seed in by_seed})

    @property
    def variants(self) -> list[str]:
        return [v for v in self.index.get("variants", list(self.results)) if v in self.results]

    @property
    def commit(self) -> str:
        return str(self.index.get("git_commit", "unknown"))

    @property
    def device(self) -> str:
        devices = sorted({str(r.get("meta", {}).get("device", "?")) for s in self.results.values() for r in s.values()})
        return ", ".join(devices) or "?"

    @property
    def is_synthetic(self) -> bool:
        return self.index.get("profile_config", {}).get("data_kind", "synref") == "synref"

    @property
    def datasets(self) -> dict[str, str]:
        """dataset name -> splitBy, in the profile's order."""
        specs = self.index.get("profile_config", {}).get("datasets", [])
        return {d["name"]: d["split_by"] for d in specs}

    @property
    def keys(self) -> list[str]:
        """Every "dataset/split" evaluated, in the order of the first results file."""
        keys: list[str] = []
        for by_seed in self.results.values():
            for res in by_seed.values():
                keys += [k for k in res.get("metrics", {}) if k not in keys]
        return keys

    def data_root(self, override: str | Path | None = None) -> Path:
        """Where the REFER-layout data lie: the override, the profile's data_root, else <run_dir>/data."""
        root = override or self.index.get("profile_config", {}).get("data_root")
        return Path(root) if root else self.run_dir / "data"

    def rows(self, variant: str, key: str, seed: int) -> list[dict[str, Any]]:
        return self.results.get(variant, {}).get(seed, {}).get("rows", {}).get(key, [])

    def checkpoint(self, variant: str, seed: int | None = None) -> str | None:
        by_seed = self.results.get(variant, {})
        seed = min(by_seed) if seed is None and by_seed else seed
        return by_seed.get(seed, {}).get("meta", {}).get("checkpoint") if seed is not None else None


_CACHE: dict[tuple[str, float, tuple[int, ...] | None], Study] = {}


def load_study(run_dir: str | Path, seeds: list[int] | None = None) -> Study:
    """Read <run_dir>/study.json and the results files it lists (cached in memory per file time).

    seeds: keep only these seeds (None: all the study has).
    """
    run_dir = Path(run_dir).resolve()
    index_path = run_dir / "study.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"no study at {run_dir}: run `python -m ppcr.pipeline study --out {run_dir}` first")
    key = (str(run_dir), index_path.stat().st_mtime, tuple(seeds) if seeds is not None else None)
    if key not in _CACHE:
        index = json.loads(index_path.read_text())
        results: dict[str, dict[int, dict[str, Any]]] = {}
        for variant, by_seed in index.get("results", {}).items():
            for seed_text, rel in by_seed.items():
                seed = int(seed_text)
                if seeds is not None and seed not in seeds:
                    continue
                results.setdefault(variant, {})[seed] = json.loads((run_dir / rel).read_text())
        _CACHE[key] = Study(run_dir, index, results)
    return _CACHE[key]


# ---------------------------------------------------------------------------------------------------------------
# tables without pandas
# ---------------------------------------------------------------------------------------------------------------


class MeanStd(NamedTuple):
    """A reproduced cell: mean and sample std over seeds (std is nan for one seed)."""

    mean: float
    std: float
    n: int


@dataclass
class Column:
    key: str
    label: str
    group: tuple[str, ...] = ()  # header levels above the label, e.g. ("RefCOCO", "oIoU")


@dataclass
class Table:
    """Rows (dicts) under columns; `source` in a row ("paper" / "reproduced") styles it."""

    title: str
    columns: list[Column]
    rows: list[dict[str, Any]]
    caption: str = ""
    digits: int = 2
    notes: list[str] = field(default_factory=list)

    def column_keys(self) -> list[str]:
        return [c.key for c in self.columns]

    def _repr_html_(self) -> str:
        return to_html(self)

    def _repr_markdown_(self) -> str:
        return to_markdown(self)


def format_cell(value: Any, digits: int = 2) -> str:
    """None -> "–"; floats with `digits`; MeanStd as "mean ± std" (just the mean for one seed)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "\u2013"
    if isinstance(value, MeanStd):
        if value.n > 1 and not math.isnan(value.std):
            return f"{value.mean:.{digits}f} \u00b1 {value.std:.{digits}f}"
        return f"{value.mean:.{digits}f}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _header_rows(columns: list[Column]) -> list[list[tuple[str, int]]]:
    """Merged header cells (label, colspan) for each group level above the column labels."""
    depth = max((len(c.group) for c in columns), default=0)
    levels: list[list[tuple[str, int]]] = []
    for level in range(depth):
        cells: list[tuple[str, int]] = []
        previous: tuple[str, ...] | None = None
        for c in columns:
            prefix = c.group[: level + 1] if len(c.group) > level else None
            label = c.group[level] if prefix is not None else ""
            if prefix is not None and prefix == previous and cells:
                cells[-1] = (cells[-1][0], cells[-1][1] + 1)
            else:
                cells.append((label, 1))
            previous = prefix
        levels.append(cells)
    return levels


TABLE_STYLE = (
    "<style>"
    "table.ppcr{border-collapse:collapse;font-size:0.78em;margin:0.5em 0}"
    "table.ppcr th,table.ppcr td{border:1px solid #ccc;padding:2px 5px;text-align:center;white-space:nowrap}"
    "table.ppcr td.left,table.ppcr th.left{text-align:left}"
    "table.ppcr tr.paper td{background:#f4f4f4;color:#333}"
    "table.ppcr tr.reproduced td{background:#eef6ff;font-weight:600}"
    "table.ppcr tr.sanity td{background:#fff8e1;font-style:italic}"
    "table.ppcr tr.first td{border-top:2px solid #555}"
    "p.ppcr-caption{font-size:0.8em;color:#444;margin-top:2px}"
    "div.ppcr-scroll{overflow-x:auto;max-width:100%}"
    "</style>"
)


def to_html(table: Table) -> str:
    """An HTML table (merged group headers, paper rows grey, reproduced rows blue, caption under it)."""
    out = io.StringIO()
    out.write(TABLE_STYLE)
    if table.title:
        out.write(f"<p><b>{html.escape(table.title)}</b></p>")
    out.write('<div class="ppcr-scroll"><table class="ppcr"><thead>')
    for cells in _header_rows(table.columns):
        out.write("<tr>" + "".join(f'<th colspan="{span}">{html.escape(label)}</th>' for label, span in cells)
                  + "</tr>")
    out.write("<tr>" + "".join(f'<th class="{"left" if i == 0 else ""}">{html.escape(c.label)}</th>'
                               for i, c in enumerate(table.columns)) + "</tr></thead><tbody>")
    previous = None
    for row in table.rows:
        source = str(row.get("source", ""))
        classes = [source.split()[0] if source else ""]
        if previous is not None and source != previous:
            classes.append("first")
        previous = source
        cells = "".join(
            f'<td class="{"left" if i == 0 else ""}">{html.escape(format_cell(row.get(c.key), table.digits))}</td>'
            for i, c in enumerate(table.columns))
        out.write(f'<tr class="{" ".join(c for c in classes if c)}">{cells}</tr>')
    out.write("</tbody></table></div>")
    if table.caption:  # under the table, outside its scroll area, so it wraps at the page's width
        out.write(f'<p class="ppcr-caption">{html.escape(table.caption)}</p>')
    for note in table.notes:
        out.write(f"<p><small>{html.escape(note)}</small></p>")
    return out.getvalue()


def to_markdown(table: Table) -> str:
    """A GitHub-markdown table; group headers are joined into the column labels."""
    labels = [" ".join([*c.group, c.label]).strip() for c in table.columns]
    lines = [f"**{table.title}**", ""] if table.title else []
    lines.append("| " + " | ".join(labels) + " |")
    lines.append("|" + "|".join(" --- " for _ in labels) + "|")
    for row in table.rows:
        cells = [format_cell(row.get(c.key), table.digits).replace("|", "\\|") for c in table.columns]
        lines.append("| " + " | ".join(cells) + " |")
    if table.caption:
        lines += ["", table.caption]
    lines += [f"\n{note}" for note in table.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# the paper's tables
# ---------------------------------------------------------------------------------------------------------------

PAPER_DATASETS = ("refcoco", "refcoco+", "refcocog")
PAPER_DATASET_LABELS = {"refcoco": "RefCOCO", "refcoco+": "RefCOCO+", "refcocog": "RefCOCOg"}
PAPER_SPLITS = {"refcoco": ("val", "testA", "testB"), "refcoco+": ("val", "testA", "testB"),
                "refcocog": ("val(U)", "test(U)")}
SPLIT_LABELS = {"val": "Val", "testA": "TestA", "testB": "TestB", "val(U)": "Val(U)", "test(U)": "Test(U)"}
SYNREF_OF = {"refcoco": "synref", "refcoco+": "synref+", "refcocog": "synrefg"}

# the paper's row names (CSV `variant`) of Tables 2-3 -> this project's variants
TABLE2_VARIANTS = {"w/o Spatial SP": "glamm", "w/ Spatial SP (RE)": "spatial_re",
                   "w/ Spatial SP (RE + P_seg_txt)": "spatial_re_seg", "PPCR": "ppcr"}
TABLE3_VARIANTS = {"w/ Attn-based Box Prediction": "attn_box", "w/ GT Box (Oracle)": "gt_box_oracle",
                   "PPCR": "ppcr"}
TABLE1_VARIANTS = {"GLaMM": "glamm", "PPCR": "ppcr"}
VARIANT_LABELS = {"glamm": "GLaMM-style (w/o Spatial SP)", "spatial_re": "w/ Spatial SP (RE)",
                  "spatial_re_seg": "w/ Spatial SP (RE + P_seg_txt)", "ppcr": "PPCR",
                  "attn_box": "w/ Attn-based Box Prediction", "gt_box_oracle": "w/ GT Box (Oracle)"}


def paper_tables() -> list[dict[str, Any]]:
    """The paper's Tables 1-3 in long format; `value` is a float, or None where the paper prints "–"."""
    text = (resources.files("ppcr") / "resources" / "ppcr_paper_tables.csv").read_text(encoding="utf-8")
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        r = dict(r)
        r["value"] = float(r["value"]) if r["value"].strip() else None
        r["excerpted_from_original"] = r["excerpted_from_original"].strip().lower() == "true"
        rows.append(r)
    return rows


def paper_columns() -> list[tuple[str, str, str]]:
    """(dataset, metric, split) in the order of the paper's tables: per dataset oIoU splits, then mIoU splits."""
    return [(d, m, s) for d in PAPER_DATASETS for m in ("oIoU", "mIoU") for s in PAPER_SPLITS[d]]


def column_key(dataset: str, metric: str, split: str) -> str:
    return f"{dataset}|{metric}|{split}"


def study_key(study: Study, dataset: str, split: str) -> str:
    """The study's "dataset/split" that stands for a paper column (SynRef suites at small profiles)."""
    name = dataset if dataset in study.datasets else SYNREF_OF[dataset]
    return f"{name}/{split.replace('(U)', '')}"


def _columns(study: Study, lead: list[Column]) -> list[Column]:
    cols = list(lead)
    for d, m, s in paper_columns():
        label = PAPER_DATASET_LABELS[d]
        if study.is_synthetic:
            label += f" ~ {SYNREF_OF[d]}"
        cols.append(Column(column_key(d, m, s), SPLIT_LABELS[s], (label, m)))
    return cols


def cell(study: Study, variant: str, key: str, metric: str) -> MeanStd | None:
    """Mean and std over the study's seeds of one metric of one variant on one "dataset/split"."""
    values = [res["metrics"][key][metric] for res in study.results.get(variant, {}).values()
              if key in res.get("metrics", {}) and metric in res["metrics"][key]]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return MeanStd(float(statistics.fmean(values)), float(std), len(values))


def scale_text(study: Study) -> str:
    """What the reproduced rows are, in words."""
    cfg = study.index.get("profile_config", {})
    if not study.is_synthetic:
        return (f"profile {study.profile} (preset {study.preset}) on RefCOCO/RefCOCO+/RefCOCOg from "
                f"{cfg.get('data_root')}")
    refs = sorted({d.get("refs", 0) for d in cfg.get("datasets", [])})
    cap = cfg.get("eval_max_expressions")
    return (f"profile {study.profile}: the {study.preset} preset trained and evaluated on SynRef (the project's "
            f"synthetic benchmark, {'/'.join(map(str, refs))} refs per suite"
            f"{f', at most {cap} evaluated expressions per split' if cap else ''})")


def reproduced_caption(study: Study) -> str:
    seeds = study.seeds
    seed_text = f"mean \u00b1 std over seeds {seeds}" if len(seeds) > 1 else f"one seed ({seeds[0] if seeds else '?'})"
    text = (f"Reproduced rows: {scale_text(study)}; {seed_text}; commit {study.commit}; device {study.device}. ")
    if study.is_synthetic:
        text += ("Columns map RefCOCO ~ synref, RefCOCO+ ~ synref+, RefCOCOg Val(U)/Test(U) ~ synrefg umd val/test: "
                 "the reproduced rows are SynRef results of a small model, not RefCOCO numbers, and are not "
                 "comparable in absolute value with the paper's rows; compare the order of the variants. ")
    text += foundation_text(study)
    if study.profile == "smoke":
        text += "The smoke profile trains for a few steps only: its numbers mean nothing (often 0). "
    return text


def foundation_text(study: Study) -> str:
    """Where the run's starting weights (the paper's pretrained SAM / LLaVA) came from, in one sentence."""
    cfg = study.index.get("profile_config", {})
    if not study.is_synthetic:
        return "Starting weights: the profile's local LLaVA and SAM paths. "
    if cfg.get("foundation") == "shipped":
        return ("Starting weights (stand-ins for pretrained SAM and LLaVA): the shipped foundation, stages 0-1 of the "
                "small preset trained on separate SynRef scenes (ppcr/resources/foundation/manifest.json; "
                "regenerate: python -m ppcr.foundation train). ")
    return "Starting weights: stages 0-1 trained inside this run (its own SynRef training split). "


def _reproduced_row(study: Study, variant: str, label: str, lead: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"method": label, "source": f"reproduced ({study.profile})", **lead}
    for d, m, s in paper_columns():
        row[column_key(d, m, s)] = cell(study, variant, study_key(study, d, s), m)
    return row


def _paper_rows(table: str, names: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per method of a paper table (in the paper's order), values by column key."""
    by_method: dict[str, dict[str, Any]] = {}
    for r in paper_tables():
        if r["table"] != table or (names is not None and r["variant"] not in names):
            continue
        name = r["variant"] + ("\u2020" if r["excerpted_from_original"] else "")
        mllm = "\u2013" if r["mllm"] == "-" else r["mllm"]
        row = by_method.setdefault(r["variant"], {"method": name, "mllm": mllm, "source": "paper"})
        row[column_key(r["dataset"], r["metric"], r["split"])] = r["value"]
    return list(by_method.values())


def _difference_row(a: dict[str, Any], b: dict[str, Any], label: str, source: str,
                    lead: dict[str, Any]) -> dict[str, Any]:
    """b - a per column (the paper's "Absolute" row)."""
    row: dict[str, Any] = {"method": label, "source": source, **lead}
    for d, m, s in paper_columns():
        k = column_key(d, m, s)
        va, vb = a.get(k), b.get(k)
        va = va.mean if isinstance(va, MeanStd) else va
        vb = vb.mean if isinstance(vb, MeanStd) else vb
        row[k] = None if va is None or vb is None else round(vb - va, 4)
    return row


# sanity baselines: the IoU of simply filling a box with foreground (per-expression `gt_box_fill_iou` /
# `pred_box_fill_iou` of the results rows); a model that segments no better than that adds nothing over its box
SANITY_FIELDS = {"gt": ("gt_box_fill_iou", "gt_box"), "pred": ("pred_box_fill_iou", "pred_box")}


def pixels_in_box(box: list[float], height: int, width: int) -> int:
    """Pixels of an (height, width) image whose centres lie inside an xyxy box, as
    `ppcr.training.diagnostics.box_fill_mask` fills them."""
    x0, y0, x1, y1 = (float(v) for v in box)
    nx = min(width - 1, math.floor(x1 - 0.5)) - max(0, math.ceil(x0 - 0.5)) + 1
    ny = min(height - 1, math.floor(y1 - 0.5)) - max(0, math.ceil(y0 - 0.5)) + 1
    return max(0, nx) * max(0, ny)


def rle_area(rle: dict[str, Any]) -> int:
    """Foreground pixels of a COCO RLE (as `ppcr.training.evaluate.encode_rle` stores it)."""
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    return int(mask_utils.area({"size": list(rle["size"]),
                                "counts": counts.encode("ascii") if isinstance(counts, str) else counts}))


def box_fill_inter_union(row: dict[str, Any], which: str) -> tuple[float, float] | None:
    """Intersection and union (pixels) of the filled ground-truth (`which` "gt") or predicted ("pred") box with the
    target mask, derived from what a results row stores; None when the row lacks a field it needs (old runs).

    The rows keep the fill IoU f, the box and, for the predicted mask P, its intersection I and union U with the
    target G and its RLE. Then |G| = U + I - |P|, the box B covers `pixels_in_box` pixels, and the fill's
    intersection is f (|B| + |G|) / (1 + f) and its union |B| + |G| minus that.
    """
    iou_field, box_field = SANITY_FIELDS[which]
    f, box, rle = row.get(iou_field), row.get(box_field), row.get("mask_rle")
    if f is None or box is None or rle is None or row.get("union") is None or row.get("intersection") is None:
        return None
    target = int(row["union"]) + int(row["intersection"]) - rle_area(rle)
    filled = pixels_in_box(box, *rle["size"])
    inter = float(f) * (filled + target) / (1.0 + float(f))
    return inter, filled + target - inter


def _fill_figure(rows: list[dict[str, Any]], which: str, metric: str) -> float | None:
    """mIoU (mean fill IoU) or oIoU (summed intersections over summed unions) of box filling, in %; None when
    there are no rows or one lacks the fields."""
    if not rows:
        return None
    if metric == "mIoU":
        values = [r.get(SANITY_FIELDS[which][0]) for r in rows]
        return None if any(v is None for v in values) else 100.0 * statistics.fmean(values)
    if metric == "oIoU":
        pairs = [box_fill_inter_union(r, which) for r in rows]
        if any(p is None for p in pairs):
            return None
        union = sum(u for _, u in pairs)
        return 100.0 * sum(i for i, _ in pairs) / union if union > 0 else None
    return None


def _unique_rows(study: Study, variant: str, key: str) -> list[dict[str, Any]]:
    """`variant`'s rows of one dataset/split over every seed, each expression once (first seed's row)."""
    seen: dict[tuple[Any, Any], dict[str, Any]] = {}
    for seed in sorted(study.results.get(variant, {})):
        for r in study.rows(variant, key, seed):
            seen.setdefault((r.get("ref_id"), r.get("sent_id")), r)
    return list(seen.values())


def fill_gt_cell(study: Study, variants: list[str], key: str, metric: str) -> float | None:
    """mIoU or oIoU (%) of filling the ground-truth box, over the expressions of one dataset/split (read from the
    first of `variants` whose rows have the field: the box does not depend on the model)."""
    for variant in variants:
        value = _fill_figure(_unique_rows(study, variant, key), "gt", metric)
        if value is not None:
            return value
    return None


def fill_pred_cell(study: Study, variant: str, key: str, metric: str) -> MeanStd | None:
    """mIoU or oIoU (%) of filling `variant`'s own predicted box, mean and std over the study's seeds."""
    values = [v for seed in sorted(study.results.get(variant, {}))
              if (v := _fill_figure(study.rows(variant, key, seed), "pred", metric)) is not None]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return MeanStd(float(statistics.fmean(values)), float(std), len(values))


def sanity_rows(study: Study, variants: list[str], lead: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Sanity-baseline rows of this run: "fill GT box" and "fill predicted box (<variant>)" for each of
    `variants` that predicts a box (not the oracle, whose box is the ground truth). `lead`: the lead cells of each
    row, by "gt" or variant. Rows whose results lack the fields (older runs) are left out."""
    present = [v for v in variants if v in study.results]
    source = f"sanity baseline ({study.profile})"
    candidates = [("gt", "fill GT box", lambda k, m: fill_gt_cell(study, present, k, m))]
    candidates += [(v, f"fill predicted box ({v})", lambda k, m, v=v: fill_pred_cell(study, v, k, m))
                   for v in present if v != "gt_box_oracle"]
    rows = []
    for name, label, figure in candidates:
        row: dict[str, Any] = {"method": label, "source": source, **lead.get(name, {})}
        for d, m, s in paper_columns():
            row[column_key(d, m, s)] = figure(study_key(study, d, s), m)
        if any(row[column_key(d, m, s)] is not None for d, m, s in paper_columns()):
            rows.append(row)
    return rows


def sanity_caption(rows: list[dict[str, Any]]) -> str:
    """What the sanity-baseline rows are (empty without such rows)."""
    if not rows:
        return ""
    return ("Yellow rows: sanity baselines of this run, not the paper's: the mask is the whole box, filled with "
            "foreground \u2013 the ground-truth box (the same expressions for every variant) or a variant's own "
            "predicted box (mean over seeds). A variant whose mIoU is not above its filled box gets nothing from "
            "SAM beyond the box. oIoU of these rows is derived from the stored rows (intersection, union, "
            "predicted-mask RLE, box); \u2013 where a results file lacks the fields. ")


def table1(study: Study) -> Table:
    """Table 1: every method of the paper (†: excerpted from the original papers) and this run's GLaMM-style
    baseline and PPCR, with the PPCR - GLaMM difference ("Absolute") for both, and this run's sanity baselines
    (filling the ground-truth box / PPCR's predicted box)."""
    paper = _paper_rows("table1")
    by_name = {r["method"].rstrip("\u2020"): r for r in paper}
    rows = paper + [_difference_row(by_name["GLaMM"], by_name["PPCR"], "Absolute (PPCR \u2212 GLaMM)", "paper",
                                    {"mllm": ""})]
    lead = {"mllm": f"{study.preset} preset"}
    repro = [_reproduced_row(study, v, VARIANT_LABELS[v] if v != "glamm" else "GLaMM-style", lead)
             for v in TABLE1_VARIANTS.values() if v in study.results]
    rows += repro
    if len(repro) == 2:
        rows.append(_difference_row(repro[0], repro[1], "Absolute (PPCR \u2212 GLaMM-style)", repro[0]["source"],
                                    {"mllm": ""}))
    sanity = sanity_rows(study, list(TABLE1_VARIANTS.values()),
                         {name: {"mllm": ""} for name in ("gt", *TABLE1_VARIANTS.values())})
    rows += sanity
    return Table(
        title="Table 1: referring image segmentation, paper vs this run",
        columns=_columns(study, [Column("method", "Method"), Column("mllm", "MLLM"), Column("source", "source")]),
        rows=rows,
        caption=("Grey rows: the paper's Table 1 (values as printed; \u2020 = excerpted by the paper from the "
                 "original publication; \u2013 = not reported). Blue rows: this run. " + sanity_caption(sanity)
                 + reproduced_caption(study)),
    )


def _ablation_table(study: Study, table: str, variants: dict[str, str], title: str, what: str,
                    sanity: bool = False) -> Table:
    """A paper ablation table beside this run's variants; `sanity` adds the box-filling sanity-baseline rows."""
    paper = _paper_rows(table)
    for row in paper:
        row["variant"] = variants.get(row["method"].rstrip("\u2020"), "")
    repro = [_reproduced_row(study, v, VARIANT_LABELS[v], {"variant": v}) for v in variants.values()
             if v in study.results]
    leads = {"gt": {"variant": ""}, **{v: {"variant": v} for v in variants.values()}}
    extra = sanity_rows(study, list(variants.values()), leads) if sanity else []
    return Table(
        title=title,
        columns=_columns(study, [Column("method", "Variant"), Column("variant", "variant id"),
                                 Column("source", "source")]),
        rows=paper + repro + extra,
        caption=(f"Grey rows: the paper's {what} (values as printed). Blue rows: the same variants trained by this "
                 "project with an identical recipe (same initialisation, steps and data). " + sanity_caption(extra)
                 + reproduced_caption(study)),
    )


def table2(study: Study) -> Table:
    """Table 2 (reasoning mechanisms): glamm, spatial_re, spatial_re_seg, ppcr."""
    return _ablation_table(study, "table2", TABLE2_VARIANTS, "Table 2: ablation of the reasoning mechanism",
                           "Table 2")


def table3(study: Study) -> Table:
    """Table 3 (spatial grounding): attn_box, gt_box_oracle, ppcr, and the box-filling sanity baselines."""
    return _ablation_table(study, "table3", TABLE3_VARIANTS, "Table 3: ablation of spatial grounding", "Table 3",
                           sanity=True)


# ---------------------------------------------------------------------------------------------------------------
# box-head cost (Table 3's efficiency claim)
# ---------------------------------------------------------------------------------------------------------------


def mlp_head_flops(d: int, hidden: int) -> int:
    """Multiply-adds x 2 of F_Map for one expression: d->h, h->h, h->4."""
    return 2 * (d * hidden + hidden * hidden + hidden * 4)


def attention_head_flops(d: int, dim: int, layers: int, queries: int, image_tokens: int) -> int:
    """Multiply-adds x 2 of the attention head for one expression (norms, softmax and biases left out; the same
    count as `ppcr.flops.box_head_flops`).

    Per decoder layer with Q = 1 + queries query tokens and N image tokens: self-attention (QKV and output
    projections, scores, weighted sum), cross-attention (Q/output projections on the queries, K/V projections of
    the N image tokens, scores, weighted sum) and the 4x feed-forward; plus the input projections of the query and
    the image features and the output MLP.
    """
    q, n = 1 + queries, image_tokens
    self_attn = 4 * q * dim * dim + 2 * q * q * dim
    cross_attn = 2 * q * dim * dim + 2 * n * dim * dim + 2 * q * n * dim
    ffn = 8 * q * dim * dim
    per_layer = self_attn + cross_attn + ffn
    inputs = d * dim + n * d * dim
    out = dim * dim + dim * 4
    return 2 * (layers * per_layer + inputs + out)


def time_modules(modules: dict[str, Any], inputs: tuple[Any, ...], repeats: int, device: str,
                 warmup: int = 3) -> dict[str, float]:
    """Median seconds of one forward of each module. Runs are interleaved (a, b, a, b, ...) so a change of load on
    the machine affects every module alike; on a CPU they run on one thread (no contention between threads)."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    times: dict[str, list[float]] = {name: [] for name in modules}
    try:
        with torch.no_grad():
            for i in range(warmup + repeats):
                for name, module in modules.items():
                    sync()
                    tic = time.perf_counter()
                    module(*inputs)
                    sync()
                    if i >= warmup:
                        times[name].append(time.perf_counter() - tic)
    finally:
        torch.set_num_threads(threads)
    return {name: float(statistics.median(t)) for name, t in times.items()}


def box_head_costs(study: Study | None = None, preset: str | None = None, device: str = "cpu", batch: int = 64,
                   repeats: int = 20) -> Table:
    """Parameters, analytic FLOPs and measured forward time per expression of F_Map (MLP) vs the attention head.

    The heads are built from `ppcr.model.heads` at the preset's sizes (the study's preset unless `preset` is
    given) with random weights; a batch of `batch` random P_seg_box vectors (and image features for the attention
    head) is timed on `device`, median of `repeats` forwards.
    """
    import torch

    from ppcr.model.config import preset_config
    from ppcr.model.heads import AttentionBoxHead, MLPBoxHead

    preset = preset or (study.preset if study is not None else "tiny")
    cfg = preset_config(preset)
    d, n_img = cfg.text.hidden_size, cfg.vision.num_image_tokens
    torch.manual_seed(0)
    heads = {
        "F_Map (MLP): PPCR": (MLPBoxHead(d, cfg.box_head_hidden),
                              mlp_head_flops(d, cfg.box_head_hidden)),
        "attention: attn_box": (
            AttentionBoxHead(d, cfg.attn_box_dim, cfg.attn_box_layers, cfg.attn_box_heads, cfg.attn_box_queries,
                             n_img),
            attention_head_flops(d, cfg.attn_box_dim, cfg.attn_box_layers, cfg.attn_box_queries, n_img)),
    }
    p_seg_box = torch.randn(batch, d, device=device)
    image_features = torch.randn(batch, n_img, d, device=device)
    seconds = time_modules({name: head.to(device).eval() for name, (head, _) in heads.items()},
                           (p_seg_box, image_features), repeats, device)
    rows = []
    for name, (head, flops) in heads.items():
        rows.append({"head": name, "params": sum(p.numel() for p in head.parameters()),
                     "mflops": flops / 1e6, "us_per_expr": 1e6 * seconds[name] / batch})
    mlp, attn = rows
    for r in rows:
        r["params_ratio"] = r["params"] / mlp["params"]
        r["time_ratio"] = r["us_per_expr"] / mlp["us_per_expr"]
    device_text = study.device if study is not None and device == "cpu" else device
    return Table(
        title=f"Box-head cost at the {preset} preset",
        columns=[Column("head", "head"), Column("params", "parameters"), Column("params_ratio", "\u00d7 MLP"),
                 Column("mflops", "MFLOPs / expr"), Column("us_per_expr", "\u00b5s / expr (median)"),
                 Column("time_ratio", "time \u00d7 MLP")],
        rows=rows,
        caption=(f"Heads built from ppcr.model.heads with the {preset} preset's sizes (LLM width {d}, {n_img} image "
                 f"tokens, attention head {cfg.attn_box_layers} layers \u00d7 width {cfg.attn_box_dim}); random "
                 f"weights; forward time of a batch of {batch} on {device} ({device_text}"
                 f"{', one thread' if device == 'cpu' else ''}), median of {repeats} interleaved runs, divided by "
                 f"{batch}. FLOPs counted analytically (2 \u00d7 multiply-adds of the linear layers and "
                 f"attention products). The paper states the MLP is much cheaper than the attention head at similar "
                 f"accuracy; the accuracy side is Table 3. Attention head: {attn['params'] / mlp['params']:.1f}\u00d7 "
                 f"the parameters, {attn['mflops'] / mlp['mflops']:.1f}\u00d7 the FLOPs, "
                 f"{attn['time_ratio']:.1f}\u00d7 the time."),
    )


def stage_costs(study: Study) -> Table:
    """Every training stage of the study: steps, wall time, throughput, peak memory, first/final total loss."""
    rows = []
    for s in study.index.get("stages", []):
        rows.append({"stage": s.get("stage"), "seed": s.get("seed"), "steps": s.get("steps"),
                     "wall_s": s.get("wall_s"), "samples_per_s": s.get("samples_per_s"),
                     "peak_memory_mb": s.get("peak_memory_mb"),
                     "loss_first": (s.get("first_losses") or {}).get("total"),
                     "loss_final": (s.get("final_losses") or {}).get("total")})
    return Table(
        title="Training stages of this run",
        columns=[Column("stage", "stage"), Column("seed", "seed"), Column("steps", "steps"),
                 Column("wall_s", "wall s"), Column("samples_per_s", "samples/s"),
                 Column("peak_memory_mb", "peak MB"), Column("loss_first", "first loss"),
                 Column("loss_final", "final loss")],
        rows=rows,
        caption=f"From the stages' DONE.json files; device {study.device}; {scale_text(study)}.",
    )


# ---------------------------------------------------------------------------------------------------------------
# beyond the paper: seeds, bootstrap intervals, breakdowns, failures
# ---------------------------------------------------------------------------------------------------------------


def seed_summary(study: Study, metrics: tuple[str, ...] = ("oIoU", "mIoU", "P@0.5", "box_acc@0.5")) -> Table:
    """Every reproduced cell (variant x dataset/split x metric): mean, std, min, max and the per-seed values."""
    rows = []
    for variant in study.variants:
        for key in study.keys:
            for metric in metrics:
                values = {seed: res["metrics"][key][metric] for seed, res in sorted(study.results[variant].items())
                          if key in res.get("metrics", {}) and metric in res["metrics"][key]}
                if not values:
                    continue
                v = list(values.values())
                rows.append({"variant": variant, "split": key, "metric": metric, "n_seeds": len(v),
                             "mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None,
                             "min": min(v), "max": max(v),
                             "per_seed": ", ".join(f"{s}: {x:.2f}" for s, x in values.items())})
    return Table(
        title="Spread over seeds of every reproduced cell",
        columns=[Column("variant", "variant"), Column("split", "dataset/split"), Column("metric", "metric"),
                 Column("n_seeds", "seeds"), Column("mean", "mean"), Column("std", "std"), Column("min", "min"),
                 Column("max", "max"), Column("per_seed", "per seed")],
        rows=rows,
        caption=("std is the sample standard deviation over seeds (\u2013 with one seed: train more seeds, e.g. the "
                 "synthetic profile's three, to see it). " + reproduced_caption(study)),
    )


# (baseline, candidate): the interval is for candidate - baseline
BOOTSTRAP_PAIRS: tuple[tuple[str, str], ...] = (("glamm", "ppcr"), ("spatial_re", "ppcr"),
                                                ("spatial_re", "spatial_re_seg"), ("ppcr", "attn_box"),
                                                ("ppcr", "gt_box_oracle"))

# The paper's claims as (claim, baseline, candidate, direction): "greater" = candidate beats baseline,
# "not_greater" = candidate is no better than baseline. Tables 1-3 of the paper, val mIoU.
CLAIMS: tuple[tuple[str, str, str, str], ...] = (
    ("PPCR beats semantic-only (GLaMM-style) prompting", "glamm", "ppcr", "greater"),
    ("the spatial prompt works better from P_seg_txt than from the expression", "spatial_re", "ppcr", "greater"),
    ("adding the expression to P_seg_txt does not help", "ppcr", "spatial_re_seg", "not_greater"),
    ("an attention box head is no better than the MLP (F_Map)", "ppcr", "attn_box", "not_greater"),
    ("the ground-truth box (oracle) is far better than the predicted one", "ppcr", "gt_box_oracle", "greater"),
)


def paired_rows(study: Study, baseline: str, candidate: str, key: str,
                seeds: list[int] | None = None) -> tuple[list[dict], list[dict]]:
    """The expressions both variants predicted on one "dataset/split", paired by (seed, ref_id, sent_id)."""
    a_rows, b_rows = [], []
    for seed in seeds if seeds is not None else study.seeds:
        b_by_id = {(r["ref_id"], r["sent_id"]): r for r in study.rows(candidate, key, seed)}
        for r in study.rows(baseline, key, seed):
            other = b_by_id.get((r["ref_id"], r["sent_id"]))
            if other is not None:
                a_rows.append(r)
                b_rows.append(other)
    return a_rows, b_rows


def _bootstrap_rows(a: list[dict], b: list[dict], metric: str, n_boot: int, seed: int) -> dict[str, float]:
    """`paired_bootstrap` of two variants' paired prediction rows (oIoU also needs their intersections/unions)."""
    kwargs: dict[str, Any] = {}
    if metric == "oIoU":
        kwargs = {"a_inter": [r["intersection"] for r in a], "a_union": [r["union"] for r in a],
                  "b_inter": [r["intersection"] for r in b], "b_union": [r["union"] for r in b]}
    return paired_bootstrap([r["iou"] for r in a], [r["iou"] for r in b], metric=metric, n_boot=n_boot, seed=seed,
                            **kwargs)


def bootstrap_gains(study: Study, pairs: tuple[tuple[str, str], ...] = BOOTSTRAP_PAIRS,
                    metrics: tuple[str, ...] = ("mIoU", "oIoU"), n_boot: int = 2000, seed: int = 0) -> Table:
    """Paired bootstrap 95% intervals of candidate - baseline (percentage points) per dataset/split and metric,
    pooled over seeds (pairs are (seed, ref_id, sent_id)); whether the interval excludes 0."""
    rows = []
    for baseline, candidate in pairs:
        if baseline not in study.results or candidate not in study.results:
            continue
        for key in study.keys:
            a, b = paired_rows(study, baseline, candidate, key)
            if not a:
                continue
            for metric in metrics:
                res = _bootstrap_rows(a, b, metric, n_boot, seed)
                excludes = res["ci_low"] > 0 or res["ci_high"] < 0
                verdict = ("better" if res["ci_low"] > 0 else "worse") if excludes else "no clear difference"
                rows.append({"comparison": f"{candidate} \u2212 {baseline}", "split": key, "metric": metric,
                             "n": len(a), "delta": res["delta"], "ci_low": res["ci_low"], "ci_high": res["ci_high"],
                             "excludes_0": excludes, "verdict": verdict})
    return Table(
        title="Paired bootstrap intervals of the differences between variants",
        columns=[Column("comparison", "comparison"), Column("split", "dataset/split"), Column("metric", "metric"),
                 Column("n", "pairs"), Column("delta", "\u0394 (pp)"), Column("ci_low", "95% CI low"),
                 Column("ci_high", "95% CI high"), Column("excludes_0", "CI excludes 0"),
                 Column("verdict", "candidate is")],
        rows=rows,
        caption=(f"\u0394 = metric(candidate) \u2212 metric(baseline) in percentage points on the same expressions; "
                 f"{n_boot} paired resamples of (seed, ref_id, sent_id) pairs, percentile intervals. The paper "
                 f"reports no intervals; its gains over GLaMM are 0.3-1.9 points. " + reproduced_caption(study)),
    )


GROUNDED_BOX_ACC = 10.0  # box acc@0.5 (%) above which a variant's predicted boxes follow the expression at all;
# a constant box scores about 1 % on SynRef, whose objects cover about 1.5 % of the image


def _box_acc_text(study: Study, variant: str, key: str) -> tuple[str, float | None]:
    """A variant's box accuracy@0.5 on a split, as text and value (None: the variant predicts no box)."""
    if VARIANTS[variant].eval_box != "pred":
        return "\u2014", None
    value = cell(study, variant, key, "box_acc@0.5")
    return ("n/a", None) if value is None else (f"{value.mean:.1f}", value.mean)


def claim_verdict(direction: str, ci_low: float, ci_high: float) -> str:
    """"supported" / "contradicted" / "undecided" for a claim's direction and a 95% interval of candidate - baseline."""
    if direction == "greater":
        return "supported" if ci_low > 0 else "contradicted" if ci_high < 0 else "undecided"
    if direction == "not_greater":
        return "contradicted" if ci_low > 0 else "supported"
    raise ValueError(f"unknown claim direction {direction!r}")


def claims_table(study: Study, metric: str = "mIoU", n_boot: int = 2000, seed: int = 0) -> Table:
    """Which of the paper's claims this run supports, per dataset/split, from paired bootstrap intervals."""
    rows = []
    for claim, baseline, candidate, direction in CLAIMS:
        if baseline not in study.results or candidate not in study.results:
            continue
        for key in study.keys:
            a, b = paired_rows(study, baseline, candidate, key)
            if not a:
                continue
            res = _bootstrap_rows(a, b, metric, n_boot, seed)
            paper = _paper_delta(baseline, candidate, key)
            (cand_text, cand_acc), (base_text, base_acc) = (_box_acc_text(study, v, key) for v in (candidate, baseline))
            verdict = claim_verdict(direction, res["ci_low"], res["ci_high"])
            predicted = [acc for acc in (cand_acc, base_acc) if acc is not None]
            if len(predicted) == 2 and max(predicted) < GROUNDED_BOX_ACC:
                verdict = "untestable: boxes not grounded"
            rows.append({"claim": claim, "comparison": f"{candidate} \u2212 {baseline}", "split": key, "n": len(a),
                         "delta": res["delta"], "ci_low": res["ci_low"], "ci_high": res["ci_high"],
                         "paper_delta": paper, "box_acc": f"{cand_text} / {base_text}", "verdict": verdict})
    return Table(
        title=f"Which of the paper's claims this run supports ({metric})",
        columns=[Column("claim", "claim"), Column("comparison", "comparison"), Column("split", "dataset/split"),
                 Column("n", "pairs"), Column("delta", "\u0394 (pp)"), Column("ci_low", "95% CI low"),
                 Column("ci_high", "95% CI high"), Column("paper_delta", "paper's \u0394 (pp)"),
                 Column("box_acc", "box acc@0.5 (%), candidate / baseline"), Column("verdict", "verdict")],
        rows=rows,
        caption=("supported: the paired-bootstrap 95% interval of candidate \u2212 baseline lies on the claimed side "
                 "of 0 (for 'no better' claims: the candidate is not significantly better); contradicted: it lies "
                 "on the other side; undecided: it contains 0. The claims between two variants that both segment "
                 f"from their predicted box are about how that box is predicted: where neither box reaches "
                 f"{GROUNDED_BOX_ACC:.0f} % accuracy@0.5 (a constant box gets about 1 %), the boxes do not follow "
                 "the expression and such a claim is marked untestable, whatever the interval says (\u2014: the "
                 "variant uses no predicted box). The paper's \u0394 comes from its Tables 2-3 on the split the suite "
                 "stands in for (synref: refcoco, synref+: refcoco+, synrefg: refcocog), where the paper reports "
                 "both rows. " + reproduced_caption(study)),
    )


def _paper_delta(baseline: str, candidate: str, key: str) -> float | None:
    """The paper's candidate - baseline (mIoU, Tables 2-3) on the real dataset and split a SynRef "suite/split"
    stands in for (synref -> refcoco, synref+ -> refcoco+, synrefg val/test -> refcocog val(U)/test(U))."""
    suite, _, split = key.partition("/")
    real = {v: k for k, v in SYNREF_OF.items()}.get(suite)
    split = f"{split}(U)" if real == "refcocog" else split
    ours = {**TABLE2_VARIANTS, **TABLE3_VARIANTS}
    values: dict[str, float] = {}
    for row in paper_tables():
        variant = ours.get(row["variant"]) if row["table"] in ("table2", "table3") else None
        if variant and row["dataset"] == real and row["metric"] == "mIoU" and row["split"] == split \
                and row["value"] is not None:
            values[variant] = row["value"]
    if baseline not in values or candidate not in values:
        return None
    return round(values[candidate] - values[baseline], 2)


def _group_of(row: dict[str, Any], by: str) -> str:
    value = row.get(by)
    if value is None:
        return "unknown"
    if by == "distractors_same_category":
        return str(value) if int(value) < 3 else "3+"
    return str(value)


def breakdown(study: Study, by: str = "expr_type", variants: list[str] | None = None,
              dataset: str | None = None) -> list[dict[str, Any]]:
    """mIoU (%) per group of `by` (expr_type or distractors_same_category) per variant, pooled over the study's
    dataset/splits (or one `dataset`) and seeds; rows: group, variant, mIoU, n."""
    variants = variants or study.variants
    pooled: dict[tuple[str, str], list[float]] = {}
    for variant in variants:
        for seed in study.seeds:
            for key in study.keys:
                if dataset is not None and key.split("/")[0] != dataset:
                    continue
                for r in study.rows(variant, key, seed):
                    pooled.setdefault((_group_of(r, by), variant), []).append(r["iou"])

    def order(group: str) -> tuple[int, str]:
        return (0, f"{int(group):04d}") if group.isdigit() else (1, group)

    groups = sorted({g for g, _ in pooled}, key=order)
    return [{"group": g, "variant": v, "mIoU": 100.0 * statistics.fmean(pooled[(g, v)]), "n": len(pooled[(g, v)])}
            for g in groups for v in variants if (g, v) in pooled]


def breakdown_table(study: Study, by: str = "expr_type", dataset: str | None = None) -> Table:
    """`breakdown` as a table: one row per group, one mIoU column per variant."""
    records = breakdown(study, by, dataset=dataset)
    variants = list(dict.fromkeys(r["variant"] for r in records))
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        row = rows.setdefault(r["group"], {"group": r["group"], "n": r["n"]})
        row[r["variant"]] = r["mIoU"]
    return Table(
        title=f"mIoU (%) by {by}" + (f" on {dataset}" if dataset else ""),
        columns=[Column("group", by), Column("n", "expressions")] + [Column(v, v) for v in variants],
        rows=list(rows.values()),
        caption=("Pooled over every evaluated dataset/split and seed (n counts expression x seed). "
                 + reproduced_caption(study)),
    )


OCCLUSION_BELOW = 0.8  # visible fraction under which a target counts as occluded
AMBIGUITY_FROM = 2  # same-category distractors from which an expression counts as ambiguity-prone


def failure_reason(row: dict[str, Any]) -> str | None:
    """The paper's three failure conditions (Fig. 7) read from the SynRef metadata, or None."""
    reasons = []
    if row.get("visible_fraction") is not None and float(row["visible_fraction"]) < OCCLUSION_BELOW:
        reasons.append(f"occlusion ({100 * float(row['visible_fraction']):.0f}% visible)")
    if row.get("blurred") or row.get("low_contrast"):
        reasons.append("blur" if row.get("blurred") else "low contrast")
    if int(row.get("distractors_same_category") or 0) >= AMBIGUITY_FROM:
        reasons.append(f"ambiguity ({row['distractors_same_category']} same-category distractors)")
    return ", ".join(reasons) or None


def failure_cases(study: Study, variant: str = "ppcr", k: int = 6) -> list[dict[str, Any]]:
    """The lowest-IoU expressions of `variant` (first seed) under occlusion, blur/low contrast and ambiguity.

    Takes up to k/3 per condition (lowest IoU first, each expression once), then fills up with the lowest IoUs
    overall. Each item: key ("dataset/split"), the results row, and `reason`.
    """
    if variant not in study.results:
        return []
    seed = min(study.results[variant])
    candidates = [(key, r) for key in study.keys for r in study.rows(variant, key, seed)]
    candidates.sort(key=lambda kr: kr[1]["iou"])
    tests = {
        "occlusion": lambda r: r.get("visible_fraction") is not None and float(r["visible_fraction"]) <
        OCCLUSION_BELOW,
        "blur": lambda r: bool(r.get("blurred") or r.get("low_contrast")),
        "ambiguity": lambda r: int(r.get("distractors_same_category") or 0) >= AMBIGUITY_FROM,
    }
    chosen: list[dict[str, Any]] = []
    seen: set[tuple[str, int, Any]] = set()

    def take(key: str, r: dict[str, Any], condition: str) -> None:
        seen.add((key, r["ref_id"], r["sent_id"]))
        chosen.append({"key": key, "row": r, "condition": condition,
                       "reason": failure_reason(r) or "low IoU (none of the three conditions)", "seed": seed})

    per_condition = max(1, k // len(tests))
    for condition, test in tests.items():
        hits = [(key, r) for key, r in candidates if test(r) and (key, r["ref_id"], r["sent_id"]) not in seen]
        for key, r in hits[:per_condition]:
            take(key, r, condition)
    for key, r in candidates:
        if len(chosen) >= k:
            break
        if (key, r["ref_id"], r["sent_id"]) not in seen:
            take(key, r, "low IoU")
    return chosen[:k]


def failure_table(cases: list[dict[str, Any]]) -> Table:
    rows = [{"split": c["key"], "expression": c["row"]["expression"], "iou": 100 * c["row"]["iou"],
             "box_iou": None if c["row"].get("box_iou") is None else 100 * c["row"]["box_iou"],
             "condition": c["condition"], "reason": c["reason"]} for c in cases]
    return Table(title="Failure cases", rows=rows,
                 columns=[Column("split", "dataset/split"), Column("expression", "expression"),
                          Column("iou", "IoU (%)"), Column("box_iou", "box IoU (%)"),
                          Column("condition", "chosen for"), Column("reason", "metadata says")],
                 caption="Lowest-IoU expressions per condition, read from the SynRef metadata of each target.")


# ---------------------------------------------------------------------------------------------------------------
# figures' inputs (images, masks) for ppcr.viz
# ---------------------------------------------------------------------------------------------------------------


def _refer(study: Study, dataset: str, data_root: str | Path | None = None):
    from ppcr.data.refer import Refer

    return Refer(study.data_root(data_root), dataset, study.datasets.get(dataset, "unc"))


def _decode(rle: dict[str, Any] | None, h: int, w: int) -> np.ndarray:
    from ppcr.data.refer import decode_segmentation

    if rle is None:
        return np.zeros((h, w), dtype=np.uint8)
    return decode_segmentation(rle, h, w)


def failure_figure_rows(study: Study, cases: list[dict[str, Any]],
                        data_root: str | Path | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """`failure_cases` as the rows and reasons `ppcr.viz.fig7_failures` draws."""
    from ppcr.data.refer import load_image

    rows, reasons = [], []
    for c in cases:
        refer = _refer(study, c["key"].split("/")[0], data_root)
        r = c["row"]
        image = load_image(refer.image_path(r["image_id"]))
        h, w = image.shape[:2]
        rows.append({"image": image, "expression": r["expression"], "gt_mask": refer.mask(r["ref_id"]),
                     "gt_box": r["gt_box"], "pred_mask": _decode(r.get("mask_rle"), h, w),
                     "pred_box": r.get("pred_box"), "iou": r["iou"]})
        reasons.append(c["condition"])
    return rows, reasons


def qualitative_examples(study: Study, k: int = 4, dataset: str | None = None,
                         data_root: str | Path | None = None) -> tuple[list[dict[str, Any]], str]:
    """Rows for `ppcr.viz.fig6_qualitative` on the RefCOCOg-like suite, and a sentence saying how they were chosen.

    Like the paper's Fig. 6 the examples are selected: the expressions where PPCR's IoU exceeds the GLaMM-style
    baseline's most (first seed); the sentence also gives the win/tie/loss count over every expression.
    """
    from ppcr.data.refer import load_image

    dataset = dataset or ("refcocog" if "refcocog" in study.datasets else "synrefg")
    if "glamm" not in study.results or "ppcr" not in study.results:
        return [], "the study lacks the glamm or ppcr variant"
    seed = min(study.results["ppcr"])
    keys = [key for key in study.keys if key.split("/")[0] == dataset]
    triples = []
    for key in keys:
        oracle = {(r["ref_id"], r["sent_id"]): r for r in study.rows("gt_box_oracle", key, seed)}
        a_rows, b_rows = paired_rows(study, "glamm", "ppcr", key, seeds=[seed])
        triples += [(key, g, p, oracle.get((p["ref_id"], p["sent_id"]))) for g, p in zip(a_rows, b_rows)]
    if not triples:
        return [], f"no paired glamm/ppcr predictions on {dataset}"
    gains = [p["iou"] - g["iou"] for _, g, p, _ in triples]
    wins, losses = sum(x > 1e-9 for x in gains), sum(x < -1e-9 for x in gains)
    ordered = sorted(zip(gains, range(len(triples))), key=lambda t: -t[0])
    picked, images = [], set()
    for _, i in ordered:  # one expression per image, so the rows show different scenes
        if len(picked) < k and triples[i][2]["image_id"] not in images:
            picked.append(i)
            images.add(triples[i][2]["image_id"])
    rows = []
    for i in picked:
        key, g, p, o = triples[i]
        refer = _refer(study, dataset, data_root)
        image = load_image(refer.image_path(p["image_id"]))
        h, w = image.shape[:2]
        rows.append({"image": image, "expression": p["expression"], "gt_mask": refer.mask(p["ref_id"]),
                     "gt_box": p["gt_box"], "glamm_mask": _decode(g.get("mask_rle"), h, w),
                     "ppcr_mask": _decode(p.get("mask_rle"), h, w), "ppcr_box": p.get("pred_box"),
                     "glamm_iou": g["iou"], "ppcr_iou": p["iou"], "box_iou": p.get("box_iou"),
                     "oracle_mask": None if o is None else _decode(o.get("mask_rle"), h, w),
                     "oracle_iou": None if o is None else o["iou"]})
    note = (f"Selected, like the paper's Fig. 6: the {len(rows)} {dataset} expressions (seed {seed}, one per image) "
            f"where PPCR's IoU exceeds the GLaMM-style baseline's most. Over all {len(triples)} evaluated {dataset} "
            f"expressions PPCR is better on {wins}, worse on {losses} and tied on {len(triples) - wins - losses}.")
    return rows, note


def entity_example(study: Study, data_root: str | Path | None = None,
                   dataset: str | None = None) -> dict[str, Any] | None:
    """A relational expression with its entities for `ppcr.viz.fig1_entities`: image, expression, entity_boxes
    (target and landmark(s), from the annotations' synref boxes) and target mask. None without SynRef data."""
    from ppcr.data.refer import load_image
    from ppcr.data.synref_language import matches, parse, render_phrase, scene_objects

    dataset = dataset or "synrefg"
    if dataset not in study.datasets:
        return None
    refer = _refer(study, dataset, data_root)
    instances = json.loads((refer.root / dataset / "instances.json").read_text())
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in instances["annotations"]:
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    rng = np.random.default_rng(0)
    best = None
    for split in ("val", "test", *refer.splits):
        if split not in refer.splits:
            continue
        for ref_id in refer.ref_ids(split):
            ref = refer.ref(ref_id)
            for sentence in ref["sentences"]:
                expr = parse(sentence["sent"])
                if expr is None or expr.landmark is None:
                    continue
                anns = by_image[int(ref["image_id"])]
                objs = scene_objects(anns)
                landmarks = matches(expr.landmark, objs)
                if not landmarks:
                    continue
                words = len(sentence["sent"].split())
                if best is None or words > best[0]:
                    best = (words, ref, sentence["sent"], expr, anns, landmarks)
        if best is not None:
            break
    if best is None:
        return None
    _, ref, text, expr, anns, landmarks = best
    target_ann = refer.ann(ref["ann_id"])
    entity_boxes = {f"target: {render_phrase(expr.target, rng)}": target_ann["synref"]["box"]}
    for j, idx in enumerate(landmarks):
        name = render_phrase(expr.landmark, rng)
        entity_boxes[f"landmark{'' if len(landmarks) == 1 else f' {j + 1}'}: {name}"] = anns[idx]["synref"]["box"]
    image = load_image(refer.image_path(ref["image_id"]))
    return {"image": image, "expression": text, "entity_boxes": entity_boxes, "target_mask": refer.mask(ref),
            "target": next(iter(entity_boxes)), "relation": expr.relation}


# ---------------------------------------------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------------------------------------------


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
            f"{wall_text} \u00b7 run folder `{study.run_dir}` \u00b7 made by `{study.index.get('command', '?')}`")


# ---------------------------------------------------------------------------------------------------------------
# small helpers for the notebooks' charts and sentences
# ---------------------------------------------------------------------------------------------------------------


def metric_rows(study: Study, variants: list[str] | tuple[str, ...], metric: str = "mIoU") -> list[dict[str, Any]]:
    """Rows for `ppcr.viz.breakdown_plot`: group = dataset/split, variant, the metric's mean over seeds, n."""
    rows = []
    for key in study.keys:
        for variant in variants:
            value = cell(study, variant, key, metric)
            if value is not None:
                n = next(iter(study.results[variant].values()))["metrics"][key].get("n", 0)
                rows.append({"group": key, "variant": variant, metric: value.mean, "n": n})
    return rows


def summary_line(study: Study, variants: list[str] | tuple[str, ...], metric: str = "mIoU") -> str:
    """A markdown sentence: each variant's metric averaged over every evaluated dataset/split, best first."""
    means = {}
    for variant in variants:
        values = [c.mean for key in study.keys if (c := cell(study, variant, key, metric)) is not None]
        if values:
            means[variant] = statistics.fmean(values)
    if not means:
        return "This run has none of these variants."
    ranked = sorted(means.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"`{v}` {m:.2f}" for v, m in ranked)
    return (f"**This run** ({study.profile}): {metric} averaged over the {len(study.keys)} evaluated dataset/splits, "
            f"best first: {text}. Whether a difference is more than noise: see the bootstrap intervals on the "
            f"'Beyond the paper' page.")


SHOWN_VARIANTS = ("glamm", "ppcr", "gt_box_oracle")  # the explorer's first view: Fig. 6's columns


def make_explorer(study: Study, live: bool = False, device: str = "cpu", data_root: str | Path | None = None,
                  llava_path: str | None = None, sam_checkpoint: str | None = None, seed: int | None = None,
                  shown: tuple[str, ...] = SHOWN_VARIANTS):
    """A `PredictionExplorer` over the study's stored predictions (first seed unless `seed`); with `live`, the
    variants' checkpoints listed in the results files are loaded so new expressions can be run. `shown`: the
    variants selected at first (the others stay selectable)."""
    from ppcr.explorer import PredictionExplorer

    predictions = {}
    for variant, by_seed in study.results.items():
        chosen = seed if seed is not None else min(by_seed)
        if chosen in by_seed:
            predictions[variant] = by_seed[chosen]["rows"]
    models = {}
    if live:
        from ppcr.model.modeling_ppcr import PPCRModel
        from ppcr.training.evaluate import resolve_device

        overrides = {k: v for k, v in {"llava_path": llava_path, "sam_checkpoint": sam_checkpoint}.items() if v}
        for variant in predictions:
            checkpoint = study.checkpoint(variant, seed)
            if checkpoint and Path(checkpoint).is_dir():
                models[variant] = PPCRModel.from_pretrained(checkpoint, variant=variant, **overrides).to(
                    resolve_device(device)).eval()
    explorer = PredictionExplorer(study.data_root(data_root), study.datasets, predictions=predictions, models=models)
    selected = tuple(v for v in shown if v in explorer.variants)
    if selected:
        explorer.variants_widget.value = selected
    return explorer


def explorer_start(explorer: Any, study: Study, variant: str = "ppcr") -> tuple[str, str, int]:
    """(suite, split, index) of a first view: the RefCOCOg-like suite and its first expression that `variant`
    has a stored prediction for (evaluation may cover only part of a split)."""
    suite = "refcocog" if "refcocog" in study.datasets else ("synrefg" if "synrefg" in study.datasets
                                                             else next(iter(study.datasets)))
    for split in explorer.splits_for(suite):
        for row in explorer.rows_for(suite, split):
            if explorer.stored_prediction(variant, suite, split, row["ref_id"], row["sent_id"]) is not None:
                return suite, split, row["index"]
    return suite, explorer.splits_for(suite)[0], 0
