"""Beyond the paper: mIoU broken down by expression type or distractors, and failure cases."""

from __future__ import annotations

import statistics
from typing import Any

from ppcr.report.study import Study
from ppcr.report.tables import Column, Table, reproduced_caption


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
