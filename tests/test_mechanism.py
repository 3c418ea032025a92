"""The paper's mechanism on the smoke study: the breakdowns by target size, occlusion and ppcr's box partition
every expression, the box split pairs the variants on the same expressions, and mask completeness is read from each
row's intersection and target area."""

from __future__ import annotations

import math

import pytest

from ppcr import report
from ppcr.report.mechanism import GROUPS, size_group, target_tokens


def test_target_tokens_is_the_box_side_over_the_longer_image_side():
    row = {"image_size": [128, 256], "gt_box": [0.0, 0.0, 64.0, 16.0]}  # sqrt(64 * 16) = 32 px of 256: 1/8
    assert target_tokens(row, 8) == pytest.approx(1.0)
    assert size_group(target_tokens(row, 8)) == "1-2 tokens" and size_group(0.99) == "< 1 token"
    assert target_tokens({"gt_box": [0, 0, 1, 1]}, 8) is None  # rows written before the image size was recorded


def test_size_and_occlusion_groups_partition_every_expression(study):
    total = {v: sum(len(study.rows(v, k, s)) for k in study.keys for s in study.seeds) for v in study.variants}
    for by in ("size", "occlusion"):
        records = report.mechanism_breakdown(study, by)
        for variant in study.variants:
            assert sum(r["n"] for r in records if r["variant"] == variant) == total[variant], (by, variant)
        assert {r["group"] for r in records} <= set(GROUPS[by])
        assert all(0.0 <= r["mIoU"] <= 100.0 for r in records)


def test_the_box_split_pairs_every_variant_with_ppcrs_own_box(study):
    records = report.mechanism_breakdown(study, "ppcr_box")
    for group in {r["group"] for r in records}:
        assert len({r["n"] for r in records if r["group"] == group}) == 1  # the same expressions for every variant
    right = [r for seed in study.seeds for k in study.keys for r in study.rows("ppcr", k, seed)
             if r["box_iou"] >= 0.5]
    ppcr_right = [r for r in records if r["variant"] == "ppcr" and r["group"] == "ppcr's box right"]
    if right:
        assert ppcr_right[0]["n"] == len(right)
        assert ppcr_right[0]["mIoU"] == pytest.approx(100 * sum(r["iou"] for r in right) / len(right))
    table = report.mechanism_table(study, "ppcr_box")
    assert "ppcr's own predicted box" in table.caption


def test_completeness_is_the_share_of_the_target_covered(study):
    rows = report.completeness_rows(study)
    assert rows and {r["variant"] for r in rows} == set(study.variants)
    first = rows[0]
    pooled = [r for s in study.seeds for r in study.rows(first["variant"], first["group"], s)]
    expected = 100 * sum(r["intersection"] / r["target_area"] for r in pooled) / len(pooled)
    assert first["completeness"] == pytest.approx(expected)
    for r in rows:
        assert 0.0 <= r["precision"] <= 100.0 and 0.0 <= r["completeness"] <= 100.0
        assert not math.isnan(r["mIoU"])
    assert "target covered" in report.to_html(report.completeness_table(study))
