"""What a referring-segmentation benchmark asks of a model, measured on any REFER-layout dataset (SynRef or
RefCOCO/+/g): the target's area, its box side in vision tokens, objects per image, same-category distractors, the
occluded share (SynRef records it; COCO does not), expression length and type, and the share of targets whose box,
snapped to the vision-token grid, still reaches IoU >= 0.5 (how well a model that can only point at tokens can box
them).

    python -m ppcr.data.stats --root runs/demo/data --dataset synref --split-by unc --split val --grid 8

The image is taken as the vision tower sees it: padded to a square (centred), then cut into `grid` x `grid` tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ppcr.data.refer import Refer

OCCLUDED_BELOW = 0.98  # a target with less than this share of its pixels visible counts as partly occluded
# the groups of the target's box side in vision tokens (the book's mechanism page, the "where" answer's breakdown)
SIZE_BINS = ((0.0, 1.0, "< 1 token"), (1.0, 2.0, "1-2 tokens"), (2.0, 3.0, "2-3 tokens"), (3.0, math.inf, "3+ tokens"))
OCCLUSION_GROUPS = ("whole", "partly occluded")


def size_group(tokens: float | None) -> str | None:
    """The `SIZE_BINS` label of a box side in vision tokens (None: not known)."""
    if tokens is None:
        return None
    return next(label for low, high, label in SIZE_BINS if low <= tokens < high)


def occlusion_group(visible_fraction: float | None) -> str | None:
    """"whole" or "partly occluded" (`OCCLUDED_BELOW`); None where the dataset does not record it."""
    if visible_fraction is None:
        return None
    return OCCLUSION_GROUPS[1] if float(visible_fraction) < OCCLUDED_BELOW else OCCLUSION_GROUPS[0]


def padded_box(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """[x0, y0, x1, y1] in pixels -> the same box in [0, 1] coordinates of the image padded to a centred square."""
    side = float(max(height, width))
    dx, dy = (side - width) / 2.0, (side - height) / 2.0
    return (np.asarray(box, dtype=np.float64) + [dx, dy, dx, dy]) / side


def snapped_iou(box01: np.ndarray, grid: int) -> float:
    """IoU of a [0, 1] box with its copy snapped to the nearest lines of a `grid` x `grid` token grid (at least one
    token wide): the best box a reader that can only name token edges can give."""
    snapped = np.round(np.asarray(box01) * grid)
    snapped[2] = max(snapped[2], snapped[0] + 1)
    snapped[3] = max(snapped[3], snapped[1] + 1)
    snapped = np.clip(snapped, 0, grid) / grid
    ix = max(0.0, min(box01[2], snapped[2]) - max(box01[0], snapped[0]))
    iy = max(0.0, min(box01[3], snapped[3]) - max(box01[1], snapped[1]))
    inter = ix * iy
    area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
    return float(inter / (area(box01) + area(snapped) - inter))


def ref_geometry(refer: Refer, ref: dict[str, Any], grid: int) -> dict[str, Any]:
    """One ref's target: area share, box side in tokens (square root of the box's area), snapped IoU, objects on the
    image, same-category distractors, visible share (None where the dataset does not record it)."""
    ann = refer.ann(ref["ann_id"])
    info = refer.image_info(ref["image_id"])
    height, width = int(info["height"]), int(info["width"])
    box01 = padded_box(refer.box_xyxy(ann), height, width)
    others = [refer.ann(a) for a in refer.image_ann_ids(ref["image_id"])]
    distractors = ref.get("distractors_same_category")
    if distractors is None:
        distractors = sum(int(a["category_id"]) == int(ann["category_id"]) for a in others) - 1
    return {
        "area_share": float(ann.get("area", 0.0)) / float(height * width),
        "box_tokens": float(np.sqrt((box01[2] - box01[0]) * (box01[3] - box01[1])) * grid),
        "snapped_iou": snapped_iou(box01, grid),
        "objects": len(others),
        "distractors": int(distractors),
        "visible_fraction": ref.get("visible_fraction"),
    }


def _quantiles(values: list[float]) -> dict[str, float]:
    q = np.percentile(values, [10, 50, 90]) if values else [float("nan")] * 3
    return {"p10": float(q[0]), "median": float(q[1]), "p90": float(q[2])}


def ref_geometries(root: str | Path, dataset: str, split_by: str, split: str | None = None,
                   grid: int = 8) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(refs, their `ref_geometry`) of one dataset (one split, or all refs)."""
    refer = Refer(root, dataset, split_by)
    refs = [refer.ref(i) for i in refer.ref_ids(split)]
    return refs, [ref_geometry(refer, r, grid) for r in refs]


def dataset_stats(root: str | Path, dataset: str, split_by: str, split: str | None = None, grid: int = 8,
                  geometries: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """The figures of one dataset (one split, or all refs) against a `grid` x `grid` vision-token grid
    (`geometries`: `ref_geometries` of the same arguments, where the caller has them already)."""
    refs, geo = geometries or ref_geometries(root, dataset, split_by, split, grid)
    sentences = [s for r in refs for s in r["sentences"]]
    types: dict[str, int] = {}
    for r in refs:
        for kind in r.get("expr_types", []):
            types[kind] = types.get(kind, 0) + 1
    visible = [g["visible_fraction"] for g in geo if g["visible_fraction"] is not None]
    return {
        "dataset": dataset, "split_by": split_by, "split": split or "all", "grid": grid,
        "images": len({r["image_id"] for r in refs}), "refs": len(refs), "sentences": len(sentences),
        "area_percent": {k: 100 * v for k, v in _quantiles([g["area_share"] for g in geo]).items()},
        "box_tokens": _quantiles([g["box_tokens"] for g in geo]),
        "snapped_iou50_percent": 100 * float(np.mean([g["snapped_iou"] >= 0.5 for g in geo])) if geo else None,
        "objects_per_image": float(np.mean([g["objects"] for g in geo])) if geo else None,
        "distractors_mean": float(np.mean([g["distractors"] for g in geo])) if geo else None,
        "occluded_percent": 100 * float(np.mean([v < OCCLUDED_BELOW for v in visible])) if visible else None,
        "words_mean": float(np.mean([len(s["sent"].split()) for s in sentences])) if sentences else None,
        "expr_types": {k: round(100 * v / max(sum(types.values()), 1), 1) for k, v in sorted(types.items())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppcr.data.stats", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="root of the REFER layout")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split-by", required=True)
    parser.add_argument("--split", help="one split (default: every ref)")
    parser.add_argument("--grid", type=int, default=8, help="vision tokens across the (square-padded) image")
    args = parser.parse_args(argv)
    try:
        stats = dataset_stats(args.root, args.dataset, args.split_by, args.split, args.grid)
    except (FileNotFoundError, ValueError) as err:
        print(f"python -m ppcr.data.stats: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
