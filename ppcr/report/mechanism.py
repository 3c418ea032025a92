"""The paper's mechanism, measured: where the Spatial Segmentation Prompt should help (targets the vision tokens can
see, occluded targets whose extent the box tells), where ppcr's own box is right and where it is wrong, and whether
the masks are more complete (the paper's §4.5: GLaMM's masks are partial).

    mechanism_breakdown(study, "size")        # mIoU per variant by the target's box side in vision tokens
    mechanism_breakdown(study, "occlusion")   # ... by whether the target is partly hidden (SynRef records it)
    mechanism_breakdown(study, "ppcr_box")    # ... on the expressions where ppcr's box is right / wrong
    completeness_rows(study)                  # mIoU beside the share of the target's pixels the mask covers
    where_answer_rows(study)                  # the foundation LLaVA's own "where" answer right, by the same cuts
    where_answer_bars(study)                  # ... as bars for `viz.breakdown_plot`
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from ppcr.data.stats import OCCLUDED_BELOW, OCCLUSION_GROUPS, SIZE_BINS, occlusion_group, size_group
from ppcr.evaluation.foundation_eval import WHERE_GROUPS, WHERE_RIGHT_FROM
from ppcr.model.config import preset_config
from ppcr.report.study import Study
from ppcr.report.tables import Column, Table, mean_std, reproduced_caption

BOX_RIGHT_FROM = 0.5  # box IoU from which ppcr's box counts as right
# the groups of each breakdown, in the order they are shown
GROUPS = {
    "size": [label for _, _, label in SIZE_BINS],
    "occlusion": list(OCCLUSION_GROUPS),
    "ppcr_box": ["ppcr's box right", "ppcr's box wrong"],
}
TITLES = {"size": "the target's box side in vision tokens", "occlusion": "occlusion of the target",
          "ppcr_box": "whether ppcr's own box is right (IoU >= 0.5)"}


def token_grid(study: Study) -> int:
    """Vision tokens across the (square-padded) image at the study's preset."""
    return preset_config(study.preset).vision.patch_grid


def target_tokens(row: dict[str, Any], grid: int) -> float | None:
    """The target's box side in vision tokens (square root of its box area) for a results row, or None for rows
    written before the rows recorded the image size."""
    if "image_size" not in row:
        return None
    h, w = row["image_size"]
    x0, y0, x1, y1 = row["gt_box"]
    return math.sqrt(max(x1 - x0, 0.0) * max(y1 - y0, 0.0)) / max(h, w) * grid


def _ppcr_box_groups(study: Study, key: str, seed: int) -> dict[tuple[int, int], str]:
    return {(r["ref_id"], r["sent_id"]): GROUPS["ppcr_box"][0 if r["box_iou"] >= BOX_RIGHT_FROM else 1]
            for r in study.rows("ppcr", key, seed) if r.get("box_iou") is not None}


def mechanism_breakdown(study: Study, by: str, variants: list[str] | None = None) -> list[dict[str, Any]]:
    """mIoU (%) per group of `by` ("size", "occlusion", "ppcr_box") and variant, pooled over the study's
    dataset/splits and seeds; rows: group, variant, mIoU, n (expression x seed). Rows without the figure a group
    needs are left out (the occlusion of RefCOCO's targets is not recorded)."""
    if by not in GROUPS:
        raise ValueError(f"by must be one of {sorted(GROUPS)}, not {by!r}")
    variants = variants or study.variants
    grid = token_grid(study)
    pooled: dict[tuple[str, str], list[float]] = {}
    for seed in study.seeds:
        for key in study.keys:
            ppcr_box = _ppcr_box_groups(study, key, seed) if by == "ppcr_box" else {}
            for variant in variants:
                for r in study.rows(variant, key, seed):
                    if by == "size":
                        group = size_group(target_tokens(r, grid))
                    elif by == "occlusion":
                        group = occlusion_group(r.get("visible_fraction"))
                    else:
                        group = ppcr_box.get((r["ref_id"], r["sent_id"]))
                    if group is not None:
                        pooled.setdefault((group, variant), []).append(r["iou"])
    return [{"group": g, "variant": v, "mIoU": 100.0 * statistics.fmean(pooled[(g, v)]), "n": len(pooled[(g, v)])}
            for g in GROUPS[by] for v in variants if (g, v) in pooled]


def mechanism_table(study: Study, by: str) -> Table:
    """`mechanism_breakdown` as a table: one row per group, one mIoU column per variant."""
    records = mechanism_breakdown(study, by)
    variants = list(dict.fromkeys(r["variant"] for r in records))
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        row = rows.setdefault(r["group"], {"group": r["group"], "n": r["n"]})
        row[r["variant"]] = r["mIoU"]
    how = {"size": f"the square root of the target box's area over the image's longer side, times the "
                   f"{token_grid(study)} vision tokens across it",
           "occlusion": f"a target with less than {100 * OCCLUDED_BELOW:.0f} % of its pixels visible is partly "
                        "occluded",
           "ppcr_box": "every variant on the same expressions, cut by ppcr's own predicted box (the GT-box oracle's "
                       "row shows what the exact box gives on each part)"}[by]
    return Table(
        title=f"mIoU (%) by {TITLES[by]}",
        columns=[Column("group", "group"), Column("n", "expressions")] + [Column(v, v) for v in variants],
        rows=list(rows.values()),
        caption=(f"Groups: {how}. Pooled over every evaluated dataset/split and seed (n counts expression x seed). "
                 + reproduced_caption(study)),
    )


def completeness_rows(study: Study, variants: list[str] | None = None) -> list[dict[str, Any]]:
    """Per variant and dataset/split (pooled over seeds): mIoU, the mean share of the target's pixels the mask
    covers (completeness) and the mean share of the mask on the target (precision), in %."""
    out = []
    for variant in variants or study.variants:
        for key in study.keys:
            rows = [r for seed in study.seeds for r in study.rows(variant, key, seed) if r.get("target_area")]
            if not rows:
                continue
            covered = [r["intersection"] / r["target_area"] for r in rows]
            predicted = [r["union"] - r["target_area"] + r["intersection"] for r in rows]
            precision = [r["intersection"] / p if p else 0.0 for r, p in zip(rows, predicted)]
            out.append({"group": key, "variant": variant, "n": len(rows),
                        "mIoU": 100.0 * statistics.fmean(r["iou"] for r in rows),
                        "completeness": 100.0 * statistics.fmean(covered),
                        "precision": 100.0 * statistics.fmean(precision)})
    return out


def completeness_table(study: Study) -> Table:
    return Table(
        title="Mask completeness beside mIoU (%)",
        columns=[Column("group", "dataset/split"), Column("variant", "variant"), Column("n", "expressions"),
                 Column("mIoU", "mIoU"), Column("completeness", "target covered"),
                 Column("precision", "mask on target")],
        rows=completeness_rows(study),
        caption=("\u201ctarget covered\u201d: the mean share of the target's pixels inside the predicted mask (a "
                 "partial mask scores low); \u201cmask on target\u201d: the mean share of the predicted mask that "
                 "lies on the target (a mask spilling over other objects scores low). Pooled over seeds. "
                 + reproduced_caption(study)),
    )


WHERE_CUTS = {"size": "target's box side", "colour": "expression", "occlusion": "target"}


def where_answer_rows(study: Study) -> list[dict[str, Any]]:
    """Per val split and group of `WHERE_GROUPS` (after "all"): the share (%) of the expressions for which the
    foundation LLaVA decodes a right "where" box itself (IoU >= 0.5), mean (std) over the seeds' evaluations; rows:
    split, cut, group, n, right. Empty for a study whose foundation evaluation has no breakdown."""
    found = study.where_breakdowns()
    rows = []
    for key in dict.fromkeys(k for b in found.values() for k in b):
        shares = [b[key] for b in found.values() if key in b]
        cuts = [("all", "all", [s["all"] for s in shares if "all" in s])]
        cuts += [(by, label, [s[by][label] for s in shares if label in s.get(by, {})])
                 for by, labels in WHERE_GROUPS.items() for label in labels]
        rows += [{"split": key, "cut": WHERE_CUTS.get(by, by), "group": label, "n": cells[0]["n"],
                  "right": mean_std([c["right"] for c in cells])} for by, label, cells in cuts if cells]
    return rows


def where_answer_bars(study: Study) -> list[dict[str, Any]]:
    """`where_answer_rows` for `viz.breakdown_plot(..., value="right")`: one bar per group (not "all") and split."""
    return [{"group": r["group"], "variant": r["split"], "right": r["right"].mean, "n": r["n"]}
            for r in where_answer_rows(study) if r["group"] != "all"]


def where_answer_table(study: Study) -> Table:
    return Table(
        title="The foundation LLaVA's own \u201cwhere\u201d answer: which expressions it gets right",
        columns=[Column("split", "dataset/split"), Column("cut", "cut by"), Column("group", "group"),
                 Column("n", "expressions"), Column("right", "answer right (%)")],
        rows=where_answer_rows(study),
        caption=(f"The LLaVA the run starts from (stage 1, before stages 2-3) answers the \u201cwhere\u201d question "
                 "about each val expression of the results files, its four box bins decoded greedily; right: IoU "
                 f">= {WHERE_RIGHT_FROM} with the target's box. Every box reader trained on top of it (ppcr's "
                 "branch B among them) is bounded by this answer. Cuts: the target's box side in vision tokens (as "
                 "above); whether the expression contains the target's colour word (SynRef's attributes; in a "
                 "relational expression the word may name the other object); occlusion (as above). Mean (std) over "
                 "the seeds' evaluations (the same for every seed where the run starts from the shipped foundation). "
                 + reproduced_caption(study)),
    )
