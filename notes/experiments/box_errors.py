"""Where the predicted boxes of a study go wrong: the object (centre outside the GT box) or the extent.

    python notes/experiments/box_errors.py RUN_DIR [SPLIT]     # e.g. runs/demo synref/val

For each variant with a predicted box and each seed: the share of boxes whose centre lies inside the ground-truth
box, the median distance between the two centres (as a fraction of the image side), the median width and height
ratios (predicted / GT), the mean box IoU and the mask mIoU, from the per-expression rows of the results files.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from ppcr.metrics import box_centre_in


def box_error_rows(run_dir: Path, split: str) -> list[dict]:
    rows = []
    for path in sorted(Path(run_dir, "results").glob("*/seed*.json")):
        preds = json.loads(path.read_text())["rows"].get(split, [])
        if not preds or preds[0].get("pred_box") is None or path.parent.name == "gt_box_oracle":
            continue
        dist, w_ratio, h_ratio = [], [], []
        for r in preds:
            (p0, p1, p2, p3), (g0, g1, g2, g3) = r["pred_box"], r["gt_box"]
            side = max(r["mask_rle"]["size"])  # the image's longer side, in pixels
            dist.append((((p0 + p2 - g0 - g2) / 2) ** 2 + ((p1 + p3 - g1 - g3) / 2) ** 2) ** 0.5 / side)
            w_ratio.append((p2 - p0) / max(g2 - g0, 1e-6))
            h_ratio.append((p3 - p1) / max(g3 - g1, 1e-6))
        rows.append({"variant": path.parent.name, "seed": path.stem.removeprefix("seed"),
                     "centre_in_gt": 100 * statistics.fmean(box_centre_in(r["pred_box"], r["gt_box"]) for r in preds),
                     "centre_dist": statistics.median(dist), "w_ratio": statistics.median(w_ratio),
                     "h_ratio": statistics.median(h_ratio),
                     "box_iou": 100 * statistics.fmean(r["box_iou"] for r in preds),
                     "miou": 100 * statistics.fmean(r["iou"] for r in preds)})
    return rows


if __name__ == "__main__":
    run, split = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "synref/val"
    print("| variant, seed | centre in GT box % | median centre distance | median w / h ratio | box IoU % | mIoU % |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in box_error_rows(run, split):
        print(f"| {r['variant']}, {r['seed']} | {r['centre_in_gt']:.1f} | {r['centre_dist']:.3f} | "
              f"{r['w_ratio']:.2f} / {r['h_ratio']:.2f} | {r['box_iou']:.1f} | {r['miou']:.1f} |")
