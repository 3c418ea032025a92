"""Tests of the RIS metrics against hand-computed values, and of the paired bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppcr.metrics import RefSegMeter, box_centre_in, box_iou, mask_iou, paired_bootstrap


def _rect(h: int, w: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[r0:r1, c0:c1] = 1
    return m


def test_mask_iou_and_box_iou():
    gt = _rect(10, 10, 0, 4, 0, 5)  # 20 px
    pred = _rect(10, 10, 0, 4, 0, 4)  # 16 px inside gt
    assert mask_iou(pred, gt) == pytest.approx(16 / 20)
    assert mask_iou(torch.from_numpy(pred).bool(), torch.from_numpy(gt)) == pytest.approx(0.8)
    assert mask_iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0  # empty union
    assert mask_iou(np.zeros((3, 3)), np.ones((3, 3))) == 0.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou(torch.tensor([0.0, 0, 2, 2]), np.array([3.0, 3, 4, 4])) == 0.0


def test_meter_hand_computed():
    meter = RefSegMeter()
    # 1) IoU 16/20 = 0.8, box IoU 1
    meter.update(_rect(10, 10, 0, 4, 0, 4), _rect(10, 10, 0, 4, 0, 5), [0, 0, 4, 4], [0, 0, 4, 4])
    # 2) IoU 5/10 = 0.5 (exactly the threshold: counts for P@0.5), box IoU 50/150
    meter.update(_rect(10, 10, 0, 1, 0, 5), _rect(10, 10, 0, 1, 0, 10), [0, 0, 10, 10], [5, 0, 15, 10])
    # 3) both empty: IoU 1.0, inter 0, union 0; box IoU 0.25
    meter.update(np.zeros((4, 4)), np.zeros((4, 4)), [0, 0, 2, 2], [0, 0, 4, 4])
    # 4) disjoint: IoU 0, inter 0, union 8; box IoU 1
    meter.update(_rect(4, 4, 0, 1, 0, 4), _rect(4, 4, 3, 4, 0, 4), [1, 1, 2, 2], [1, 1, 2, 2])
    out = meter.compute()
    assert out["n"] == 4
    assert out["ious"] == pytest.approx([0.8, 0.5, 1.0, 0.0])
    assert meter.intersections == [16, 5, 0, 0] and meter.unions == [20, 10, 0, 8]
    assert out["oIoU"] == pytest.approx(100 * 21 / 38)
    assert out["mIoU"] == pytest.approx(100 * 2.3 / 4)
    assert out["P@0.5"] == pytest.approx(75.0)
    assert out["P@0.7"] == pytest.approx(50.0)
    assert out["P@0.9"] == pytest.approx(25.0)
    assert out["box_acc@0.5"] == pytest.approx(50.0)
    assert out["box_ious"] == pytest.approx([1.0, 1 / 3, 0.25, 1.0])
    assert out["box_mIoU"] == pytest.approx(100 * (1 + 1 / 3 + 0.25 + 1) / 4)
    assert out["box_centre_in_gt"] == pytest.approx(100.0)  # every centre inside (case 2: on the border)


def test_box_centre_in_gt():
    assert box_centre_in([0, 0, 4, 4], [1, 1, 3, 3])  # centre (2, 2)
    assert box_centre_in(torch.tensor([4.0, 0, 6, 2]), np.array([5.0, 1, 8, 3]))  # (5, 1): the corner counts
    assert not box_centre_in([0, 0, 4, 4], [2.5, 0, 8, 8])  # overlapping boxes, the centre (2, 2) outside
    meter = RefSegMeter()
    # the right object, loosely (box IoU 1/4 < 0.5, centre inside) and the wrong one (centre outside, IoU 0)
    meter.update(np.ones((2, 2)), np.ones((2, 2)), [0, 0, 4, 4], [1, 1, 3, 3])
    meter.update(np.ones((2, 2)), np.ones((2, 2)), [10, 10, 12, 12], [1, 1, 3, 3])
    out = meter.merge(RefSegMeter()).compute()
    assert out["box_acc@0.5"] == 0.0 and out["box_centre_in_gt"] == pytest.approx(50.0)
    assert out["box_mIoU"] == pytest.approx(12.5)


def test_meter_without_boxes_merge_and_batch():
    a, b = RefSegMeter(), RefSegMeter()
    a.update(_rect(4, 4, 0, 2, 0, 2), _rect(4, 4, 0, 2, 0, 2))  # IoU 1, 4/4
    b.update_batch([_rect(4, 4, 0, 1, 0, 4)], [_rect(4, 4, 0, 2, 0, 4)])  # IoU 0.5, 4/8
    out = a.merge(b).compute()
    assert "box_acc@0.5" not in out and "box_ious" not in out
    assert out["n"] == 2
    assert out["oIoU"] == pytest.approx(100 * 8 / 12)
    assert out["mIoU"] == pytest.approx(75.0)
    assert RefSegMeter().compute()["n"] == 0


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
        RefSegMeter().update(np.zeros((4, 5)), np.zeros((5, 4)))


def test_bootstrap_identical_methods():
    rng = np.random.default_rng(1)
    ious = rng.uniform(0, 1, 200)
    res = paired_bootstrap(ious, ious, n_boot=2000)
    assert res["delta"] == 0.0 and res["ci_low"] <= 0.0 <= res["ci_high"]
    inter = rng.integers(0, 50, 200)
    union = inter + rng.integers(1, 50, 200)
    res = paired_bootstrap(ious, ious, metric="oIoU", n_boot=2000,
                           a_inter=inter, a_union=union, b_inter=inter, b_union=union)
    assert res["delta"] == 0.0 and res["ci_low"] <= 0.0 <= res["ci_high"]


def test_bootstrap_better_method():
    rng = np.random.default_rng(2)
    a = rng.uniform(0.2, 0.8, 300)
    b = np.clip(a + rng.normal(0.1, 0.05, 300), 0, 1)
    res = paired_bootstrap(a, b, n_boot=2000, seed=3)
    assert res["delta"] == pytest.approx(100 * (b - a).mean())
    assert 0 < res["ci_low"] < res["delta"] < res["ci_high"]
    assert res["p_value"] == 0.0
    # oIoU: B has the same unions and more intersection everywhere
    union = rng.integers(50, 100, 300).astype(float)
    a_inter, b_inter = union * a, union * b
    res = paired_bootstrap(a, b, metric="oIoU", n_boot=2000,
                           a_inter=a_inter, a_union=union, b_inter=b_inter, b_union=union)
    assert res["ci_low"] > 0
    # reversed order: B worse -> CI below 0, p-value 1
    res = paired_bootstrap(b, a, metric="P@0.5", n_boot=2000)
    assert res["ci_high"] < 0 and res["p_value"] == 1.0
    # deterministic for a given seed
    assert paired_bootstrap(a, b, n_boot=500, seed=7) == paired_bootstrap(a, b, n_boot=500, seed=7)
    with pytest.raises(ValueError, match="a_inter"):
        paired_bootstrap(a, b, metric="oIoU")
