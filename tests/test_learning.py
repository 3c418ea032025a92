"""Learning curves (ppcr.report.learning) on synthetic stage folders, and the box-filling sanity rows of the book's tables
(ppcr.report) on a hand-made study: no training, no model."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from ppcr import report
from ppcr.report import learning
from ppcr.metrics import mask_iou
from ppcr.training.diagnostics import box_fill_mask

# ---------------------------------------------------------------------------------------------------------------
# synthetic run folders
# ---------------------------------------------------------------------------------------------------------------

SAM_EVAL = [{"step": 10, "miou_box": 20.0, "miou_point": 10.0, "miou_box_fill": 55.0},
            {"step": 20, "miou_box": 60.0, "miou_point": 30.0, "miou_box_fill": 55.0}]
MLLM_EVAL = [{"step": 5, "describe_token_acc": 40.0, "where_token_acc": 30.0, "where_box_iou": 10.0,
              "where_box_acc50": 5.0},
             {"step": 15, "describe_token_acc": 80.0, "where_token_acc": 70.0, "where_box_iou": 45.0,
              "where_box_acc50": 40.0}]
GLAMM_EVAL = [{"step": 4, "miou": 11.0, "oiou": 12.0}, {"step": 8, "miou": 21.0, "oiou": 22.0}]
PPCR_EVAL = [{"step": 3, "miou": 15.0, "oiou": 16.0, "box_acc50": 20.0, "box_iou": 30.0, "miou_pred_box_fill": 25.0,
              "oracle_miou": 50.0},
             {"step": 6, "miou": 35.0, "oiou": 36.0, "box_acc50": 40.0, "box_iou": 45.0, "miou_pred_box_fill": 33.0,
              "oracle_miou": 70.0}]
PPCR_SEED1_EVAL = [{"step": 6, "miou": 31.0, "oiou": 32.0, "box_acc50": 38.0, "box_iou": 44.0,
                    "miou_pred_box_fill": 30.0, "oracle_miou": 68.0}]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def make_stage(run: Path, seed: int, name: str, fingerprint: str, eval_csv: list[dict] | None = None,
               done: dict[str, Any] | None = None, losses: list[float] | None = None) -> Path:
    """A stage folder as ppcr.training.stages / loop write it: eval.csv, log.csv, DONE.json (each optional)."""
    stage = run / "stages" / f"seed{seed}" / f"{name}-{fingerprint}"
    stage.mkdir(parents=True)
    if eval_csv is not None:
        _write_csv(stage / "eval.csv", eval_csv)
    if losses is not None:
        _write_csv(stage / "log.csv", [{"step": i + 1, "lr": 1e-3, "total": v, "bce": v / 2, "samples_per_s": 9.0}
                                       for i, v in enumerate(losses)])
    if done is not None:
        (stage / "DONE.json").write_text(json.dumps(done))
    return stage


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """Seed 0: every stage kind (stage 1 only in DONE.json, attn_box from before held-out diagnostics);
    seed 1: ppcr only."""
    run = tmp_path / "run"
    make_stage(run, 0, "sam_pretrain", "aaa", SAM_EVAL, {"steps": 20, "eval_history": SAM_EVAL,
                                                        "final_eval": SAM_EVAL[-1]}, losses=[3.0, 2.0, 1.5])
    make_stage(run, 0, "mllm_pretrain", "bbb", None, {"steps": 15, "eval_history": MLLM_EVAL})
    make_stage(run, 0, "glamm_init", "ccc", GLAMM_EVAL, {"variant": "glamm"}, losses=[2.0, 1.0])
    # DONE.json disagrees with eval.csv: eval.csv wins
    make_stage(run, 0, "ppcr", "ddd", PPCR_EVAL, {"variant": "ppcr", "eval_history": [{"step": 6, "miou": -1.0}]},
               losses=[4.0, 3.0, 2.5, 2.0])
    make_stage(run, 0, "attn_box", "eee", None, {"variant": "attn_box", "steps": 6}, losses=[1.0, 0.5])
    make_stage(run, 1, "ppcr", "fff", PPCR_SEED1_EVAL, {"variant": "ppcr"})
    return run


NO_MANIFEST = Path("/nonexistent/manifest.json")


# ---------------------------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------------------------


def test_stage_dirs_are_found_in_stage_order(run: Path) -> None:
    stages, notes = learning.find_stage_dirs(run)
    assert [(s.stage, s.seed) for s in stages] == [("sam_pretrain", 0), ("mllm_pretrain", 0), ("glamm_init", 0),
                                                   ("ppcr", 0), ("ppcr", 1), ("attn_box", 0)]
    assert [s.kind for s in stages] == ["sam", "mllm", "ris", "ris", "ris", "ris"]
    assert stages[2].variant == "glamm" and stages[0].variant is None and stages[5].variant == "attn_box"
    assert notes == []
    only_seed1, _ = learning.find_stage_dirs(run, seeds=[1])
    assert [(s.stage, s.seed) for s in only_seed1] == [("ppcr", 1)]


def test_records_are_read_from_eval_csv_then_done_json(run: Path) -> None:
    curves = learning.load_curves(run, manifest=NO_MANIFEST)
    assert curves.curve("sam_pretrain", "miou_box") == [(10, 20.0), (20, 60.0)]
    assert curves.curve("mllm_pretrain", "where_box_iou") == [(5, 10.0), (15, 45.0)]  # from DONE.json
    assert curves.curve("ppcr", "miou") == [(3, 15.0), (6, 35.0)]  # eval.csv, not DONE.json's -1
    assert curves.curve("ppcr", "miou", seed=1) == [(6, 31.0)]
    assert curves.curve("sam_pretrain", "total", split="train") == [(1, 3.0), (2, 2.0), (3, 1.5)]
    held = curves.held_out()
    assert len(held) == 2 * 3 + 2 * 4 + 2 * 2 + 2 * 6 + 6
    assert all(isinstance(r, learning.Record) and r.split == "held-out" and r.origin == "run" for r in held)
    glamm = [r for r in held if r.stage == "glamm_init"]
    assert {r.variant for r in glamm} == {"glamm"} and {r.metric for r in glamm} == {"miou", "oiou"}
    assert {r.metric for r in curves.losses()} == {"total"}  # lr / samples_per_s / other terms left out
    every_term = learning.load_curves(run, loss_terms=None, manifest=NO_MANIFEST)
    assert {r.metric for r in every_term.losses()} == {"total", "bce"}
    assert learning.load_curves(run, loss_terms=(), manifest=NO_MANIFEST).losses() == []


def test_a_stage_without_eval_history_is_left_out_with_a_note(run: Path) -> None:
    curves = learning.load_curves(run, manifest=NO_MANIFEST)
    assert not [r for r in curves.held_out() if r.stage == "attn_box"]
    assert [r.value for r in curves.losses() if r.stage == "attn_box"] == [1.0, 0.5]  # its loss is kept
    assert len(curves.notes) == 1 and "attn_box (seed 0, finished)" in curves.notes[0]
    assert "no held-out evaluation history" in curves.notes[0]
    table = learning.final_table(curves)
    assert "attn_box" not in [r["variant"] for r in table.rows]
    assert "no held-out evaluation history" in report.to_html(table)


def test_no_stage_folders_is_a_clear_error(tmp_path: Path, run: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no stage folders under .*empty"):
        learning.load_curves(tmp_path / "empty")
    (tmp_path / "bare" / "stages" / "seed0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="is .*bare a run folder"):
        learning.find_stage_dirs(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match=r"for seeds \[7\]"):
        learning.load_curves(run, seeds=[7])


def test_older_cached_copies_of_a_stage_are_ignored(run: Path) -> None:
    old = make_stage(run, 0, "sam_pretrain", "000", [{"step": 10, "miou_box": 99.0}])
    os.utime(old / "eval.csv", (1_000_000, 1_000_000))
    os.utime(old, (1_000_000, 1_000_000))
    curves = learning.load_curves(run, manifest=NO_MANIFEST)
    assert curves.curve("sam_pretrain", "miou_box") == [(10, 20.0), (20, 60.0)]
    assert any("older cached copy ignored (sam_pretrain-000)" in n for n in curves.notes)
    both = learning.load_curves(run, manifest=NO_MANIFEST, latest_only=False)
    assert sorted(v for _, v in both.curve("sam_pretrain", "miou_box")) == [20.0, 60.0, 99.0]


def test_shipped_foundation_curves_when_the_run_has_no_stage_0_1(tmp_path: Path, run: Path) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"stages": {"sam_pretrain": {"steps": 20}, "mllm_pretrain": {}},
                                    "curves": "curves.json"}))
    (tmp_path / "curves.json").write_text(json.dumps({"sam_pretrain": SAM_EVAL, "mllm_pretrain": MLLM_EVAL}))
    ris_only = tmp_path / "ris_only"
    make_stage(ris_only, 0, "glamm_init", "ccc", GLAMM_EVAL)
    curves = learning.load_curves(ris_only, manifest=manifest)
    shipped = [r for r in curves.held_out() if r.origin == learning.SHIPPED]
    assert {r.stage for r in shipped} == {"sam_pretrain", "mllm_pretrain"} and len(shipped) == 6 + 8
    assert curves.curve("sam_pretrain", "miou_point") == [(10, 10.0), (20, 30.0)]
    assert any("shipped foundation" in n for n in curves.notes)
    fig = learning.learning_figure(curves)
    sam_ax = fig.axes[0]
    assert "shipped foundation" in sam_ax.get_title()
    assert all("(shipped foundation)" in line.get_label() for line in sam_ax.get_lines())
    table = learning.final_table(curves)
    assert [r["origin"] for r in table.rows] == [learning.SHIPPED, learning.SHIPPED, learning.RUN]
    # a run that trains stages 0-1 itself does not get the shipped curves
    own = learning.load_curves(run, manifest=manifest)
    assert {r.origin for r in own.held_out()} == {learning.RUN}


def test_stage_1a_curves_from_the_shipped_curves_get_their_own_panel(tmp_path: Path) -> None:
    """Stage 1a (the CLIP tower's dense pretraining) has its curve in the shipped curves.json; its accuracies get a
    panel between stage 0 and stage 1, its box L1 (not a percentage) only the final table."""
    manifest = tmp_path / "manifest.json"
    vision = [{"step": 10, "color_acc": 50.0, "shape_acc": 10.0, "box_l1": 0.2},
              {"step": 20, "color_acc": 80.0, "shape_acc": 12.0, "box_l1": 0.1}]
    manifest.write_text(json.dumps({"stages": {}, "curves": "curves.json"}))
    (tmp_path / "curves.json").write_text(json.dumps({"sam_pretrain": SAM_EVAL, "mllm_pretrain": MLLM_EVAL,
                                                      "vision_pretrain": vision}))
    ris_only = tmp_path / "ris_only"
    make_stage(ris_only, 0, "glamm_init", "ccc", GLAMM_EVAL)
    curves = learning.load_curves(ris_only, manifest=manifest)
    assert curves.curve("vision_pretrain", "color_acc") == [(10, 50.0), (20, 80.0)]
    fig = learning.learning_figure(curves)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[1].startswith("stage 1a") and titles[2].startswith("stage 1:")
    labels = [line.get_label() for line in fig.axes[1].get_lines()]
    assert labels == ["patch colour acc. (shipped foundation)", "patch shape acc. (shipped foundation)"]
    row = next(r for r in learning.final_table(curves).rows if r["stage"] == "stage 1a (CLIP tower)")
    assert row["box_l1"] == 0.1 and row["color_acc"] == 80.0


def test_foundation_eval_folders_give_table_rows_not_curves(tmp_path: Path) -> None:
    run = tmp_path / "shipped_run"
    make_stage(run, 0, "glamm_init", "ccc", GLAMM_EVAL)
    make_stage(run, 0, "foundation_eval", "999", None, {"foundation": "shipped", "weights": {}, "final_eval": {
        "synref/miou_box": 70.0, "synref/miou_point": 40.0, "synref/miou_box_fill": 60.0, "synrefg/miou_box": 65.0,
        "mllm/describe_token_acc": 90.0, "mllm/where_box_iou": 50.0}})
    curves = learning.load_curves(run, manifest=NO_MANIFEST)
    assert [s.stage for s in curves.stages] == ["glamm_init"] and curves.notes == []
    assert {r.stage for r in curves.records} == {"glamm_init"}
    assert len(learning.learning_figure(curves).axes) == 1  # the RIS panel only
    rows = learning.final_table(curves).rows
    assert [r["stage"] for r in rows] == ["stage 2: glamm_init", "stage 0 (SAM) on this run's val: synref",
                                          "stage 0 (SAM) on this run's val: synrefg",
                                          "stage 1 (MLLM) on this run's val"]
    assert rows[1]["miou_box"] == 70.0 and rows[1]["miou_box_fill"] == 60.0 and rows[1]["step"] is None
    assert rows[2] == {"stage": "stage 0 (SAM) on this run's val: synrefg", "variant": "", "seed": 0,
                       "origin": learning.SHIPPED, "step": None, "miou_box": 65.0}
    assert rows[3]["where_box_iou"] == 50.0 and rows[3]["origin"] == learning.SHIPPED
    keys = learning.final_table(curves).column_keys()
    assert {"miou_box", "miou_point", "describe_token_acc", "where_box_iou", "miou"} <= set(keys)
    assert "kind" not in keys


# ---------------------------------------------------------------------------------------------------------------
# figure and table
# ---------------------------------------------------------------------------------------------------------------


def test_figure_has_one_panel_per_stage_kind(run: Path) -> None:
    curves = learning.load_curves(run, manifest=NO_MANIFEST)
    fig = learning.learning_figure(curves)
    assert len(fig.axes) == 3
    sam, mllm, ris = fig.axes
    assert sam.get_title().startswith("stage 0") and mllm.get_title().startswith("stage 1")
    assert ris.get_title().startswith("stages 2-3")
    assert [line.get_label() for line in sam.get_lines()] == list(learning.METRIC_LABELS["sam"].values())
    assert len(mllm.get_lines()) == 4
    # RIS: one line per stage folder (and seed) of the held-out mIoU; attn_box has no history
    assert [line.get_label() for line in ris.get_lines()] == ["stage 2: glamm_init, seed 0", "stage 3: ppcr, seed 0",
                                                              "stage 3: ppcr, seed 1"]
    assert list(ris.get_lines()[1].get_ydata()) == [15.0, 35.0]
    assert list(sam.get_lines()[0].get_xdata()) == [10, 20]


def test_figure_with_training_loss_and_more_ris_metrics(run: Path) -> None:
    curves = learning.load_curves(run, manifest=NO_MANIFEST)
    fig = learning.learning_figure(curves, show_loss=True, ris_metrics=("miou", "oracle_miou"), loss_window=2)
    assert len(fig.axes) == 5  # three panels, a loss axis for those with a log.csv (not stage 1)
    sam_loss = fig.axes[3]
    assert list(sam_loss.get_lines()[0].get_ydata()) == [3.0, 2.5, 1.75]  # moving mean over 2 steps
    assert "training total loss (right axis)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(fig.axes[4].get_lines()) == 3  # RIS losses: glamm_init, ppcr, attn_box (loss kept, no history)
    ris = fig.axes[2]
    labels = [line.get_label() for line in ris.get_lines()]
    assert "stage 3: ppcr mIoU with the GT box, seed 0" in labels and len(labels) == 2 + 2 + 2 - 1


def test_figure_without_any_history_says_so(tmp_path: Path) -> None:
    old = tmp_path / "old"
    make_stage(old, 0, "ppcr", "ddd", None, {"variant": "ppcr", "steps": 6}, losses=[1.0])
    curves = learning.load_curves(old, manifest=NO_MANIFEST)
    assert curves.held_out() == [] and len(curves.notes) == 1
    fig = learning.learning_figure(curves)
    assert len(fig.axes) == 1 and "no held-out evaluation history" in fig.axes[0].texts[0].get_text()
    assert learning.final_table(curves).rows == []


def test_final_table_has_each_stage_last_figures(run: Path) -> None:
    table = learning.final_table(learning.load_curves(run, manifest=NO_MANIFEST))
    assert isinstance(table, report.Table)
    assert [(r["stage"], r["seed"]) for r in table.rows] == [
        ("stage 0 (SAM)", 0), ("stage 1 (MLLM)", 0), ("stage 2: glamm_init", 0), ("stage 3: ppcr", 0),
        ("stage 3: ppcr", 1)]
    sam, mllm, glamm, ppcr0, ppcr1 = table.rows
    assert sam["step"] == 20 and sam["miou_box"] == 60.0 and sam["loss_total"] == 1.5
    assert mllm["where_box_acc50"] == 40.0 and "loss_total" not in mllm
    assert glamm["variant"] == "glamm" and glamm["miou"] == 21.0 and "box_acc50" not in glamm
    assert ppcr0["oracle_miou"] == 70.0 and ppcr0["loss_total"] == 2.0 and ppcr1["miou"] == 31.0
    keys = table.column_keys()
    assert keys[:5] == ["stage", "variant", "seed", "origin", "step"] and keys[-1] == "loss_total"
    assert {"miou_box", "describe_token_acc", "miou", "oracle_miou"} <= set(keys)
    groups = {c.key: c.group for c in table.columns}
    assert groups["miou_box"] == (learning.KIND_TITLES["sam"],) and groups["miou"] == (learning.KIND_TITLES["ris"],)
    markdown = report.to_markdown(table)
    assert "| stage 3: ppcr | ppcr | 1 | run | 6 |" in markdown and "70.00" in markdown
    assert "stage 0: SAM pretraining" in report.to_html(table)


def test_moving_average() -> None:
    assert learning.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert learning.moving_average([2.0, 4.0], 10) == [2.0, 3.0]


# ---------------------------------------------------------------------------------------------------------------
# sanity-baseline rows of Tables 1 and 3
# ---------------------------------------------------------------------------------------------------------------

KEY = "synref/val"  # what the study maps RefCOCO val to
H, W = 12, 16


def _rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _row(i: int, gt_box: list[float], pred_box: list[float] | None, pred_mask: np.ndarray,
         with_fill: bool = True) -> dict[str, Any]:
    """A results row as ppcr.evaluation.evaluate writes it; the target is the ellipse inside gt_box."""
    ys, xs = np.mgrid[:H, :W] + 0.5
    x0, y0, x1, y1 = gt_box
    gt = ((xs - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2 + ((ys - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2 <= 1
    inter, union = int((pred_mask & gt).sum()), int((pred_mask | gt).sum())
    row = {"ref_id": i, "sent_id": i, "iou": inter / union, "intersection": inter, "union": union,
           "gt_box": gt_box, "pred_box": pred_box, "mask_rle": _rle(pred_mask), "_gt": gt}
    if with_fill:
        row["gt_box_fill_iou"] = mask_iou(box_fill_mask(gt_box, (H, W)), gt)
        row["pred_box_fill_iou"] = None if pred_box is None else mask_iou(box_fill_mask(pred_box, (H, W)), gt)
    return row


def _expected(rows: list[dict[str, Any]], box_key: str) -> tuple[float, float]:
    """(mIoU, oIoU) in % of filling each row's box, computed from the masks themselves."""
    fills = [box_fill_mask(r[box_key], (H, W)) for r in rows]
    ious = [mask_iou(f, r["_gt"]) for f, r in zip(fills, rows)]
    inter = sum(int((f & r["_gt"]).sum()) for f, r in zip(fills, rows))
    union = sum(int((f | r["_gt"]).sum()) for f, r in zip(fills, rows))
    return 100 * float(np.mean(ious)), 100 * inter / union


def _rows(variant_shift: float, with_box: bool = True, with_fill: bool = True) -> list[dict[str, Any]]:
    rng = np.random.default_rng(3)
    rows = []
    for i, gt_box in enumerate([[1.0, 1.0, 9.0, 7.0], [4.2, 2.7, 15.1, 11.6], [0.0, 0.0, 6.4, 12.0]]):
        pred_box = [v + variant_shift * (1 if j < 2 else -1) for j, v in enumerate(gt_box)] if with_box else None
        pred_mask = rng.random((H, W)) < 0.3
        rows.append(_row(i, gt_box, pred_box, pred_mask, with_fill))
    return rows


def _study(tmp_path: Path, results_rows: dict[str, dict[int, list[dict[str, Any]]]]) -> report.Study:
    index = {"profile": "smoke", "preset": "tiny", "profile_config": {
        "data_kind": "synref", "datasets": [{"name": "synref", "split_by": "unc", "refs": 10}]}}
    results = {v: {seed: {"metrics": {KEY: {"mIoU": 1.0, "oIoU": 2.0}},
                          "rows": {KEY: [{k: x for k, x in r.items() if k != "_gt"} for r in rows]}}
                   for seed, rows in by_seed.items()}
               for v, by_seed in results_rows.items()}
    return report.Study(tmp_path, index, results)


MIOU_VAL = report.column_key("refcoco", "mIoU", "val")
OIOU_VAL = report.column_key("refcoco", "oIoU", "val")


def _value(cell: Any) -> float:
    return cell.mean if isinstance(cell, report.MeanStd) else cell


def test_sanity_rows_in_table1_have_the_fill_means(tmp_path: Path) -> None:
    glamm, ppcr0, ppcr1 = _rows(0.0, with_box=False), _rows(1.3), _rows(-0.7)
    study = _study(tmp_path, {"glamm": {0: glamm}, "ppcr": {0: ppcr0, 1: ppcr1}})
    t = report.table1(study)
    sanity = [r for r in t.rows if r["source"] == "sanity baseline (smoke)"]
    assert [r["method"] for r in sanity] == ["fill GT box", "fill predicted box (ppcr)"]  # glamm has no box
    gt_miou, gt_oiou = _expected(glamm, "gt_box")
    assert sanity[0][MIOU_VAL] == pytest.approx(gt_miou)
    assert sanity[0][OIOU_VAL] == pytest.approx(gt_oiou)  # derived from intersection / union / RLE / box
    assert gt_miou == pytest.approx(100 * np.mean([r["gt_box_fill_iou"] for r in glamm]))
    per_seed = [_expected(rows, "pred_box") for rows in (ppcr0, ppcr1)]
    pred = sanity[1][MIOU_VAL]
    assert isinstance(pred, report.MeanStd) and pred.n == 2
    assert pred.mean == pytest.approx(np.mean([m for m, _ in per_seed]))
    assert _value(sanity[1][OIOU_VAL]) == pytest.approx(np.mean([o for _, o in per_seed]))
    assert per_seed[0][0] != pytest.approx(gt_miou)  # the predicted box is not the ground truth's
    assert sanity[0][report.column_key("refcoco", "mIoU", "testA")] is None  # split not evaluated
    assert "sanity baselines of this run, not the paper's" in t.caption
    assert report.to_html(t).count('<tr class="sanity') == 2
    assert sanity[0]["mllm"] == ""


def test_sanity_rows_in_table3_leave_out_the_oracle(tmp_path: Path) -> None:
    study = _study(tmp_path, {"attn_box": {0: _rows(2.0)}, "gt_box_oracle": {0: _rows(0.5)},
                              "ppcr": {0: _rows(1.0)}})
    t3 = report.table3(study)
    sanity = [r for r in t3.rows if r["source"].startswith("sanity baseline")]
    assert [(r["method"], r["variant"]) for r in sanity] == [
        ("fill GT box", ""), ("fill predicted box (attn_box)", "attn_box"), ("fill predicted box (ppcr)", "ppcr")]
    assert _value(sanity[1][MIOU_VAL]) == pytest.approx(_expected(_rows(2.0), "pred_box")[0])
    assert not any(r["source"].startswith("sanity") for r in report.table2(study).rows)


def test_sanity_rows_skip_old_results(tmp_path: Path) -> None:
    old = _study(tmp_path, {"glamm": {0: _rows(0.0, False, with_fill=False)}, "ppcr": {0: _rows(1.0, with_fill=False)}})
    t = report.table1(old)
    assert not [r for r in t.rows if r["source"].startswith("sanity")]
    assert "sanity baselines" not in t.caption
    # rows with the fill IoUs but without stored masks: mIoU only
    rows = _rows(1.0)
    for r in rows:
        del r["mask_rle"]
    no_masks = _study(tmp_path, {"ppcr": {0: rows}})
    sanity = [r for r in report.table1(no_masks).rows if r["source"].startswith("sanity")]
    assert len(sanity) == 2 and sanity[0][OIOU_VAL] is None and sanity[0][MIOU_VAL] is not None


def test_pixels_in_box_counts_pixel_centres() -> None:
    for box in ([0.0, 0.0, 16.0, 12.0], [1.5, 2.5, 3.5, 4.5], [3.2, 1.7, 9.9, 8.1], [-4.0, -2.0, 40.0, 3.0],
                [5.0, 5.0, 5.2, 5.2]):
        assert report.pixels_in_box(box, H, W) == int(box_fill_mask(box, (H, W)).sum()), box
