"""Tables without pandas (`Table`, its HTML / markdown rendering) and the paper's Tables 1-3 beside this run's rows."""

from __future__ import annotations

import csv
import html
import io
import math
import re
import statistics
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, NamedTuple

from ppcr.model.config import TrainingRecipe
from ppcr.model.shipped import REGENERATE
from ppcr.report.study import Study


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


# Wide tables (Table 1 has 19 columns) must stay inside the book's content column (about 780 px at a 1400 px
# window): text wraps at its spaces only (a word with a hyphen is kept whole), "mean ± std" may break before the
# "±" only, and what is still too wide scrolls sideways inside its own box (`div.ppcr-scroll`, styled inline too,
# so it scrolls where a page drops the <style> block) under a hint that says so, its first column (the row's
# name) staying in view.
TABLE_STYLE = (
    "<style>"
    "table.ppcr{border-collapse:collapse;font-size:0.74em;margin:0.5em 0}"
    "table.ppcr th,table.ppcr td{border:1px solid #ccc;padding:2px 4px;text-align:center;white-space:normal;"
    "vertical-align:middle}"
    "table.ppcr td.left,table.ppcr th.left{text-align:left}"
    "table.ppcr td.left{position:sticky;left:0;z-index:1;background:#fff;box-shadow:-4px 0 0 #fff,inset -1px 0 0 #ccc}"
    "table.ppcr span.nobr{white-space:nowrap}"
    "table.ppcr tr.paper td{background:#f4f4f4;color:#333}"
    "table.ppcr tr.reproduced td{background:#eef6ff;font-weight:600}"
    "table.ppcr tr.sanity td{background:#fff8e1;font-style:italic}"
    "table.ppcr tr.first td{border-top:2px solid #555}"
    "p.ppcr-caption{font-size:0.8em;color:#444;margin-top:2px}"
    "p.ppcr-hint{font-size:0.75em;color:#666;margin:0}"
    "div.ppcr-scroll{overflow-x:auto;max-width:100%}"
    "</style>"
)
SCROLL_DIV = '<div class="ppcr-scroll" style="overflow-x:auto;max-width:100%">'
WIDE_COLUMNS = 10  # tables with more columns than this get the "scroll sideways" hint


def _nobr(text: str) -> str:
    return f'<span class="nobr">{html.escape(text)}</span>'


def _html_cell(value: Any, digits: int) -> str:
    """A cell's escaped text: a number whole ("mean ± std" may break before the "±"), text only at its spaces."""
    text = format_cell(value, digits)
    if isinstance(value, MeanStd) and " \u00b1 " in text:
        mean, std = text.split(" \u00b1 ", 1)
        return _nobr(mean) + " " + _nobr("\u00b1 " + std)
    if isinstance(value, (int, float, MeanStd)):
        return _nobr(text)
    return " ".join(_nobr(word) if "-" in word else html.escape(word) for word in text.split(" "))


def to_html(table: Table) -> str:
    """An HTML table (merged group headers, paper rows grey, reproduced rows blue, caption under it)."""
    out = io.StringIO()
    out.write(TABLE_STYLE)
    if table.title:
        out.write(f"<p><b>{html.escape(table.title)}</b></p>")
    if len(table.columns) > WIDE_COLUMNS:
        out.write('<p class="ppcr-hint">A wide table: where it does not fit, scroll it sideways.</p>')
    out.write(SCROLL_DIV + '<table class="ppcr"><thead>')
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
            f'<td class="{"left" if i == 0 else ""}">{_html_cell(row.get(c.key), table.digits)}</td>'
            for i, c in enumerate(table.columns))
        out.write(f'<tr class="{" ".join(c for c in classes if c)}">{cells}</tr>')
    out.write("</tbody></table></div>")
    if table.caption:  # under the table, outside its scroll area, so it wraps at the page's width
        out.write(f'<p class="ppcr-caption">{html.escape(table.caption)}</p>')
    for note in table.notes:
        out.write(f"<p><small>{html.escape(note)}</small></p>")
    return out.getvalue()


_CODE_SPAN = re.compile(r"(`+)(?:.*?)\1", re.DOTALL)


def markdown_text(text: str) -> str:
    """Plain text for markdown: `<` and `>` outside code spans as `&lt;` / `&gt;`, so that a placeholder such as
    "where is <the expression>?" shows as written instead of being read as an HTML tag (and dropped)."""
    out, last = [], 0
    for span in _CODE_SPAN.finditer(text):
        out.append(text[last:span.start()].replace("<", "&lt;").replace(">", "&gt;"))
        out.append(span.group(0))
        last = span.end()
    out.append(text[last:].replace("<", "&lt;").replace(">", "&gt;"))
    return "".join(out)


def to_markdown(table: Table) -> str:
    """A GitHub-markdown table; group headers are joined into the column labels. Text is escaped for markdown
    (`markdown_text`)."""
    labels = [markdown_text(" ".join([*c.group, c.label]).strip()) for c in table.columns]
    lines = [f"**{markdown_text(table.title)}**", ""] if table.title else []
    lines.append("| " + " | ".join(labels) + " |")
    lines.append("|" + "|".join(" --- " for _ in labels) + "|")
    for row in table.rows:
        cells = [markdown_text(format_cell(row.get(c.key), table.digits)).replace("|", "\\|") for c in table.columns]
        lines.append("| " + " | ".join(cells) + " |")
    if table.caption:
        lines += ["", markdown_text(table.caption)]
    lines += [f"\n{markdown_text(note)}" for note in table.notes]
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


def mean_std(values: list[float]) -> MeanStd:
    """Mean and sample std (nan for one value) of a non-empty list: one reproduced cell over seeds."""
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return MeanStd(float(statistics.fmean(values)), float(std), len(values))


def cell(study: Study, variant: str, key: str, metric: str) -> MeanStd | None:
    """Mean and std over the study's seeds of one metric of one variant on one "dataset/split"."""
    values = [res["metrics"][key][metric] for res in study.results.get(variant, {}).values()
              if key in res.get("metrics", {}) and metric in res["metrics"][key]]
    return mean_std(values) if values else None


def scale_text(study: Study) -> str:
    """What the reproduced rows are, in words."""
    cfg = study.index.get("profile_config", {})
    if not study.is_synthetic:
        return (f"profile {study.profile} (preset {study.preset}) on RefCOCO/RefCOCO+/RefCOCOg from "
                f"{cfg.get('data_root')}")
    refs = sorted({d.get("refs", 0) for d in cfg.get("datasets", [])})
    cap = cfg.get("eval_max_expressions")
    version = f", generator {study.synref_version}" if study.synref_version else ""
    return (f"profile {study.profile}: the {study.preset} preset trained and evaluated on SynRef (the project's "
            f"synthetic benchmark{version}, {'/'.join(map(str, refs))} refs per suite"
            f"{f', at most {cap} evaluated expressions per split' if cap else ''})")


def reproduced_caption(study: Study) -> str:
    seeds = study.seeds
    seed_text = f"mean \u00b1 std over seeds {seeds}" if len(seeds) > 1 else f"one seed ({seeds[0] if seeds else '?'})"
    text = (f"Reproduced rows: {scale_text(study)}; {seed_text}; commit {study.commit}; device {study.device}. ")
    if study.is_synthetic:
        text += ("Columns map RefCOCO ~ synref, RefCOCO+ ~ synref+, RefCOCOg Val(U)/Test(U) ~ synrefg umd val/test: "
                 "the reproduced rows are SynRef results of a small model, not RefCOCO numbers, and are not "
                 "comparable in absolute value with the paper's rows; compare the order of the variants. ")
    text += foundation_text(study) + recipe_text(study)
    if study.profile == "smoke":
        text += "The smoke profile trains for a few steps only: its numbers mean nothing (often 0). "
    return text


def recipe_additions(training: dict[str, Any], model: dict[str, Any]) -> list[str]:
    """The settings of a profile's (or recipe's) `training` and `model` blocks that are not the paper's recipe."""
    paper, ours = TrainingRecipe(), TrainingRecipe.from_dict(training)
    added = [f"{name}={getattr(ours, name)}" for name in TrainingRecipe.__dataclass_fields__
             if getattr(ours, name) != getattr(paper, name)]
    if model.get("soft_prompt_tokens", 1) != 1:
        added.append(f"soft_prompt_tokens={model['soft_prompt_tokens']}")
    return added


def recipe_text(study: Study) -> str:
    """Which rows were trained with the paper's recipe and which with settings the paper does not have (the profile's
    own recipe, and each of its other recipes: rows named `<variant>@<recipe>`)."""
    cfg = study.index.get("profile_config", {})
    parts = []
    for name, block in [("", cfg)] + list((cfg.get("recipes") or {}).items()):
        model = {**(cfg.get("model") or {}), **(block.get("model") or {})} if name else (block.get("model") or {})
        added = recipe_additions(block.get("training") or {}, model)
        rows = (f"Recipe of the {study.profile} profile's own rows" if not name
                else f"Recipe of the rows `<variant>@{name}` ({study.recipes.get(name, name)})")
        parts.append(f"{rows}: the paper's" + (f", with settings the paper does not have: {', '.join(added)}"
                                               if added else "") + ". ")
    return "".join(parts)


def foundation_text(study: Study) -> str:
    """Where the run's starting weights (the paper's pretrained SAM / LLaVA) came from, in one sentence."""
    cfg = study.index.get("profile_config", {})
    if not study.is_synthetic:
        return "Starting weights: the profile's local LLaVA and SAM paths. "
    if cfg.get("foundation") == "shipped":
        return ("Starting weights (stand-ins for pretrained SAM and LLaVA): the shipped foundation, stages 0-1 of the "
                "small preset trained from scratch on separate SynRef scenes (ppcr/resources/foundation/manifest.json; "
                f"regenerate: `{REGENERATE}`). ")
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
    """Foreground pixels of a COCO RLE (as `ppcr.evaluation.evaluate.encode_rle` stores it)."""
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
    return mean_std(values) if values else None


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
    # the profile's own recipe, then each of its other recipes (`recipes:`, e.g. the smoke profile's `@additions`)
    for suffix, recipe in [("", f"{study.profile}'s recipe" if study.recipes else "")] + [
            (f"@{name}", label) for name, label in study.recipes.items()]:
        repro = [_reproduced_row(study, v + suffix, (VARIANT_LABELS[v] if v != "glamm" else "GLaMM-style")
                                 + (f", {recipe}" if recipe else ""), lead)
                 for v in TABLE1_VARIANTS.values() if v + suffix in study.results]
        rows += repro
        if len(repro) == 2:
            rows.append(_difference_row(repro[0], repro[1], "Absolute (PPCR \u2212 GLaMM-style)"
                                        + (f", {recipe}" if recipe else ""), repro[0]["source"], {"mllm": ""}))
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
