"""Figures' inputs (images, masks) for ppcr.viz: failure rows, qualitative examples, an entity example."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ppcr.data.refer import Refer, decode_segmentation, load_image
from ppcr.data.synref_language import matches, parse, render_phrase, scene_objects
from ppcr.report.stats import paired_rows
from ppcr.report.study import Study


def _refer(study: Study, dataset: str, data_root: str | Path | None = None):

    return Refer(study.data_root(data_root), dataset, study.datasets.get(dataset, "unc"))


def _decode(rle: dict[str, Any] | None, h: int, w: int) -> np.ndarray:

    if rle is None:
        return np.zeros((h, w), dtype=np.uint8)
    return decode_segmentation(rle, h, w)


def failure_figure_rows(study: Study, cases: list[dict[str, Any]],
                        data_root: str | Path | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """`failure_cases` as the rows and reasons `ppcr.viz.fig7_failures` draws."""

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
