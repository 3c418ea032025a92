"""The front page's status: what this build reproduced, at which scale, and what it did not (from the results)."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from ppcr.model.config import TrainingRecipe
from ppcr.report.paths import display_path
from ppcr.report.stats import GROUNDED_BOX_ACC, claims_table, paper_delta
from ppcr.report.study import Study
from ppcr.report.tables import (Column, Table, cell, fill_gt_cell, foundation_text, markdown_text,
                               scale_text, to_markdown)

STATUS_VARIANTS = ("glamm", "ppcr", "gt_box_oracle")
# points of mIoU by which the GT-box oracle may fall below the foundation's SAM with the GT box (the same val
# split) before the front page says that stages 2-3 taught SAM to lean on the semantic prompt rather than the box
BOX_USE_DROP = 10.0


def study_date(study: Study) -> str:
    """The UTC date the study's index was written (study.json's modification time)."""
    stamp = (study.run_dir / "study.json").stat().st_mtime
    return _dt.datetime.fromtimestamp(stamp, tz=_dt.timezone.utc).strftime("%Y-%m-%d")


def _first_split_keys(study: Study) -> list[str]:
    """One "dataset/split" per dataset: its val split where it has one, else its first."""
    keys: dict[str, str] = {}
    for key in study.keys:
        dataset, split = key.split("/", 1)
        if dataset not in keys or split == "val":
            keys[dataset] = key
    return list(keys.values())


def status_table(study: Study) -> Table:
    """One row per dataset (its val split): mIoU of GLaMM, PPCR and the oracle, PPCR's box accuracy, box filling."""
    shown = [v for v in STATUS_VARIANTS if v in study.results]
    answers = list(study.where_answers().values())
    rows = []
    for key in _first_split_keys(study):
        row: dict[str, Any] = {"split": key}
        for variant in shown:
            value = cell(study, variant, key, "mIoU")
            row[variant] = value.mean if value else None
        acc = cell(study, "ppcr", key, "box_acc@0.5") if "ppcr" in study.results else None
        row["box_acc"] = acc.mean if acc else None
        decoded = [a[key]["box_acc50"] for a in answers if key in a]
        row["llava_box_acc"] = sum(decoded) / len(decoded) if decoded else None
        row["fill_gt"] = fill_gt_cell(study, shown, key, "mIoU")
        rows.append(row)
    columns = [Column("split", "dataset/split")] + [Column(v, f"{v} mIoU") for v in shown]
    columns += [Column("box_acc", "ppcr box acc@0.5")]
    if any(r["llava_box_acc"] is not None for r in rows):
        columns += [Column("llava_box_acc", "foundation LLaVA's own box acc@0.5")]
    columns += [Column("fill_gt", "fill GT box mIoU")]
    caption = (f"mIoU and box accuracy in %, on each suite's val split. {scale_text(study).rstrip('.')}. "
               f"{foundation_text(study)}"
               + ("The foundation LLaVA's own box: the LLaVA the run starts from answering \u201cwhere is <the "
                  "expression>?\u201d on the same expressions, its four box bins decoded greedily (before stages "
                  "2-3). " if any(r["llava_box_acc"] is not None for r in rows) else ""))
    return Table(title="", columns=columns, rows=rows, caption=caption.strip(), digits=1)


def not_reproduced(study: Study) -> list[str]:
    """Plain statements of what this build did not reproduce, read off its results."""
    notes = []
    if study.is_synthetic:
        notes.append("The paper's setting (LLaVA-1.5-7B + SAM ViT-H on RefCOCO/+/g) has not been run: no machine of "
                     "this project can fetch those weights or that data. Every reproduced number here is a SynRef "
                     "result of a small model.")
    keys = _first_split_keys(study)
    if "ppcr" in study.results:
        accs = [c.mean for k in keys if (c := cell(study, "ppcr", k, "box_acc@0.5"))]
        if accs and max(accs) < GROUNDED_BOX_ACC:
            notes.append(f"Spatial grounding: PPCR's predicted box is right (IoU >= 0.5) for at most {max(accs):.1f} % "
                         "of the expressions, so at this scale the box does not follow the expression and the "
                         "claims about how the spatial prompt is built cannot be tested.")
    if note := box_use_note(study, keys):
        notes.append(note)
    if len(study.seeds) < 2:
        notes.append(f"One training seed ({study.seeds}): no spread over seeds, only paired-bootstrap intervals "
                     "over expressions.")
    verdicts: dict[str, set[str]] = {}
    for row in claims_table(study).rows:  # the same intervals as page 3
        verdicts.setdefault(row["claim"], set()).add(row["verdict"].split(":")[0])
    for claim, found in verdicts.items():
        if found != {"supported"}:
            notes.append(f"The paper's claim \u201c{claim}\u201d: {', '.join(sorted(found))} over the evaluated "
                         "splits (page 3 has the intervals).")
    return notes


def foundation_sam_box_miou(study: Study, key: str) -> float | None:
    """mIoU (%) of the foundation's SAM given the ground-truth box on `key`'s dataset (its val split; the study's
    `foundation_eval`, mean over seeds), or None without that evaluation."""
    return _sam_box_miou(study.foundation_eval(), key)


def _sam_box_miou(evals: dict[int, dict[str, Any]], key: str) -> float | None:
    """`foundation_sam_box_miou` on foundation_eval records already read (seed -> DONE.json)."""
    name = f"{key.split('/', 1)[0]}/miou_box"
    figures = [info["final_eval"][name] for info in evals.values() if name in info.get("final_eval", {})]
    return sum(figures) / len(figures) if figures else None


def box_use_note(study: Study, keys: list[str]) -> str | None:
    """A statement when the GT-box oracle lies more than `BOX_USE_DROP` points below what the foundation's SAM
    reached with the same boxes: then stages 2-3 taught SAM to lean on the semantic prompt rather than the box (it
    trains on `ppcr`'s own predicted boxes), and the oracle row is no upper bound of a box-led SAM."""
    evals = study.foundation_eval() if "gt_box_oracle" in study.results else {}
    if not evals:
        return None
    drops = []
    for key in (k for k in keys if k.endswith("/val")):  # the foundation's SAM is evaluated on the val splits
        oracle, before = cell(study, "gt_box_oracle", key, "mIoU"), _sam_box_miou(evals, key)
        if oracle and before is not None and before - oracle.mean > BOX_USE_DROP:
            acc = cell(study, "ppcr", key, "box_acc@0.5") if "ppcr" in study.results else None
            drops.append(f"{key} {oracle.mean:.1f} against {before:.1f}"
                         + (f", ppcr's own box right for {acc.mean:.1f} %" if acc else ""))
    if not drops:
        return None
    paper = paper_delta("ppcr", "gt_box_oracle", "synref/val")
    training = TrainingRecipe.from_dict(study.index.get("profile_config", {}).get("training") or {})
    why = ("Trained on ppcr's own predicted boxes, SAM learned to lean on the semantic prompt instead"
           if training.train_box_prompt == "pred" else "SAM leans on the semantic prompt rather than the box")
    paper_text = (f"; on RefCOCO val the paper's oracle is {paper:.1f} points above its PPCR" if paper is not None
                  else "")
    return ("SAM's use of the box: given the ground-truth box, the trained ppcr checkpoint reaches less mIoU than the "
            "foundation's SAM did with the same boxes before stages 2-3 (mIoU %: " + "; ".join(drops) + "). " + why
            + ", so the GT-box oracle is no upper bound of a box-led SAM here, and the mechanism the paper describes "
            "(the box completes the mask) is not at work" + paper_text + ".")


def status_markdown(study: Study) -> str:
    """The front page's block: the run line, the headline table (markdown) and what is not reproduced (text
    escaped for markdown: no `<...>` of a caption is read as an HTML tag)."""
    lines = [
        f"**This build:** profile `{study.profile}` (preset `{study.preset}`), device {study.device}, commit "
        f"`{study.commit}`, study of {study_date(study)} (`{display_path(study.run_dir)}`), seeds {study.seeds}.",
        "", to_markdown(status_table(study)), "",
        "**Not reproduced by this build:**", "",
        *[f"- {markdown_text(note)}" for note in not_reproduced(study)], "",
    ]
    return "\n".join(lines)
