"""Referring-segmentation metrics: oIoU, mIoU, P@X, box accuracy, and a paired bootstrap.

Conventions:
    * IoU of two empty masks (empty union) is 1.0 (the prediction is exactly right).
    * P@X counts an expression as correct when IoU >= X (as LAVT / CRIS evaluation code does);
      box_acc@0.5 likewise uses box IoU >= 0.5.
    * box_centre_in_gt is the share of predicted boxes whose centre lies inside the ground-truth box: whether the
      box points at the named object at all, apart from how tight it is (an object of SynRef's small preset spans
      about one image-token patch, so IoU >= 0.5 asks for a box more precise than a patch).
    * `compute()` reports percentages (0-100); `paired_bootstrap` reports percentage points.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor
P_THRESHOLDS = (0.5, 0.7, 0.9)


def _to_bool_numpy(x: ArrayLike) -> np.ndarray:
    """Binary mask (any shape, bool/int/float, torch or numpy) -> bool numpy array (nonzero = True)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x) != 0


def _inter_union(pred: ArrayLike, gt: ArrayLike) -> tuple[int, int]:
    p, g = _to_bool_numpy(pred), _to_bool_numpy(gt)
    if p.shape != g.shape:
        raise ValueError(f"predicted mask shape {tuple(p.shape)} differs from ground-truth mask shape {tuple(g.shape)}")
    return int(np.logical_and(p, g).sum()), int(np.logical_or(p, g).sum())


def mask_iou(pred: ArrayLike, gt: ArrayLike) -> float:
    """IoU of two binary masks of the same shape; 1.0 when both are empty."""
    inter, union = _inter_union(pred, gt)
    return 1.0 if union == 0 else inter / union


def box_iou(a: ArrayLike | Sequence[float], b: ArrayLike | Sequence[float]) -> float:
    """IoU of two xyxy boxes (4 numbers each); two identical zero-area boxes give 1.0."""
    a_arr = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64).reshape(4)
    b_arr = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64).reshape(4)
    iw = max(0.0, min(a_arr[2], b_arr[2]) - max(a_arr[0], b_arr[0]))
    ih = max(0.0, min(a_arr[3], b_arr[3]) - max(a_arr[1], b_arr[1]))
    inter = iw * ih
    area_a = max(0.0, a_arr[2] - a_arr[0]) * max(0.0, a_arr[3] - a_arr[1])
    area_b = max(0.0, b_arr[2] - b_arr[0]) * max(0.0, b_arr[3] - b_arr[1])
    union = area_a + area_b - inter
    if union <= 0:
        return 1.0 if np.allclose(a_arr, b_arr) else 0.0
    return float(inter / union)


def box_centre_in(pred: ArrayLike | Sequence[float], gt: ArrayLike | Sequence[float]) -> bool:
    """Whether the centre of the xyxy box `pred` lies inside the xyxy box `gt` (borders included)."""
    p = np.asarray(pred.detach().cpu() if isinstance(pred, torch.Tensor) else pred, dtype=np.float64).reshape(4)
    g = np.asarray(gt.detach().cpu() if isinstance(gt, torch.Tensor) else gt, dtype=np.float64).reshape(4)
    cx, cy = (p[0] + p[2]) / 2, (p[1] + p[3]) / 2
    return bool(g[0] <= cx <= g[2] and g[1] <= cy <= g[3])


class RefSegMeter:
    """Streaming accumulator over expressions; `compute()` gives the standard RIS metrics."""

    def __init__(self) -> None:
        self.intersections: list[int] = []
        self.unions: list[int] = []
        self.ious: list[float] = []
        self.box_ious: list[float] = []
        self.box_centre_hits: list[bool] = []

    def __len__(self) -> int:
        return len(self.ious)

    def update(
        self,
        pred_mask: ArrayLike,
        gt_mask: ArrayLike,
        pred_box: ArrayLike | Sequence[float] | None = None,
        gt_box: ArrayLike | Sequence[float] | None = None,
    ) -> float:
        """Add one expression; returns its mask IoU. Box IoU is recorded when both boxes are given."""
        inter, union = _inter_union(pred_mask, gt_mask)
        iou = 1.0 if union == 0 else inter / union
        self.intersections.append(inter)
        self.unions.append(union)
        self.ious.append(iou)
        if (pred_box is None) != (gt_box is None):
            raise ValueError("give both pred_box and gt_box, or neither")
        if pred_box is not None and gt_box is not None:
            self.box_ious.append(box_iou(pred_box, gt_box))
            self.box_centre_hits.append(box_centre_in(pred_box, gt_box))
        return iou

    def update_batch(
        self,
        pred_masks: Sequence[ArrayLike],
        gt_masks: Sequence[ArrayLike],
        pred_boxes: Sequence[Any] | None = None,
        gt_boxes: Sequence[Any] | None = None,
    ) -> list[float]:
        """`update` for each element of equally long lists; returns the IoUs."""
        if len(pred_masks) != len(gt_masks):
            raise ValueError(f"{len(pred_masks)} predicted masks but {len(gt_masks)} ground-truth masks")
        n = len(pred_masks)
        pb = list(pred_boxes) if pred_boxes is not None else [None] * n
        gb = list(gt_boxes) if gt_boxes is not None else [None] * n
        return [self.update(pred_masks[i], gt_masks[i], pb[i], gb[i]) for i in range(n)]

    def merge(self, other: "RefSegMeter") -> "RefSegMeter":
        """Append another meter's expressions (e.g. from another process); returns self."""
        self.intersections.extend(other.intersections)
        self.unions.extend(other.unions)
        self.ious.extend(other.ious)
        self.box_ious.extend(other.box_ious)
        self.box_centre_hits.extend(other.box_centre_hits)
        return self

    def compute(self) -> dict[str, Any]:
        """oIoU, mIoU, P@0.5/0.7/0.9 (and box_acc@0.5, box_mIoU, box_centre_in_gt if boxes were given) in %, plus
        n and ious."""
        n = len(self.ious)
        ious = np.asarray(self.ious, dtype=np.float64)
        total_union = sum(self.unions)
        out: dict[str, Any] = {
            "oIoU": 100.0 * (sum(self.intersections) / total_union if total_union > 0 else 1.0) if n else 0.0,
            "mIoU": 100.0 * float(ious.mean()) if n else 0.0,
        }
        for t in P_THRESHOLDS:
            out[f"P@{t}"] = 100.0 * float((ious >= t).mean()) if n else 0.0
        if self.box_ious:
            out["box_acc@0.5"] = 100.0 * float((np.asarray(self.box_ious) >= 0.5).mean())
            out["box_mIoU"] = 100.0 * float(np.mean(self.box_ious))
            out["box_centre_in_gt"] = 100.0 * float(np.mean(self.box_centre_hits))
            out["box_ious"] = list(self.box_ious)
        out["n"] = n
        out["ious"] = list(self.ious)
        return out


def paired_bootstrap(
    a_ious: Sequence[float],
    b_ious: Sequence[float],
    metric: str = "mIoU",
    n_boot: int = 10000,
    seed: int = 0,
    a_inter: Sequence[float] | None = None,
    a_union: Sequence[float] | None = None,
    b_inter: Sequence[float] | None = None,
    b_union: Sequence[float] | None = None,
    alpha: float = 0.05,
) -> dict[str, float]:
    """Paired bootstrap of metric(B) - metric(A) over the same expressions, in percentage points.

    Expressions are resampled with replacement (the same resample for both methods). `metric` is
    "mIoU", "oIoU" (needs the per-expression intersections and unions of both methods, e.g. a
    meter's `intersections`/`unions`) or "P@<t>" (e.g. "P@0.5").

    Returns delta (on the full sample), the (1 - alpha) percentile CI [ci_low, ci_high], and a
    one-sided p_value = fraction of bootstrap deltas <= 0 (small when B is reliably better than A).
    """
    a = np.asarray(a_ious, dtype=np.float64)
    b = np.asarray(b_ious, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"a_ious and b_ious must be non-empty and equally long, got {a.shape} and {b.shape}")
    n = a.size
    rng = np.random.default_rng(seed)

    if metric == "oIoU":
        if any(v is None for v in (a_inter, a_union, b_inter, b_union)):
            raise ValueError("metric='oIoU' needs a_inter, a_union, b_inter and b_union")
        ai, au, bi, bu = (np.asarray(v, dtype=np.float64) for v in (a_inter, a_union, b_inter, b_union))
        if not all(v.shape == (n,) for v in (ai, au, bi, bu)):
            raise ValueError("intersections/unions must have one entry per expression")

        def stat(idx: np.ndarray) -> np.ndarray:  # idx: (k, n) -> (k,)
            return 100.0 * (_ratio(bi[idx].sum(1), bu[idx].sum(1)) - _ratio(ai[idx].sum(1), au[idx].sum(1)))

    elif metric == "mIoU" or metric.startswith("P@"):
        if metric == "mIoU":
            d = b - a
        else:
            t = float(metric[2:])
            d = (b >= t).astype(np.float64) - (a >= t).astype(np.float64)

        def stat(idx: np.ndarray) -> np.ndarray:
            return 100.0 * d[idx].mean(1)

    else:
        raise ValueError(f"unknown metric {metric!r}; use 'mIoU', 'oIoU' or 'P@<threshold>'")

    delta = float(stat(np.arange(n)[None, :])[0])
    chunk = max(1, 2_000_000 // n)  # keep the (chunk, n) index matrix small
    deltas = np.concatenate(
        [stat(rng.integers(0, n, size=(min(chunk, n_boot - s), n))) for s in range(0, n_boot, chunk)]
    )
    lo, hi = np.quantile(deltas, [alpha / 2, 1 - alpha / 2])
    return {
        "delta": delta,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "p_value": float((deltas <= 0).mean()),
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, 1.0 where den == 0 (empty cumulative union)."""
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


def box_ious(pred: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    """(n, 4) predicted and ground-truth xyxy boxes (one frame) -> (n,) IoU of each pair."""
    return np.array([box_iou(p, g) for p, g in zip(pred.detach(), gt)], dtype=np.float64)


def box_figures(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    """(n, 4) predicted and ground-truth xyxy boxes (one frame) -> mean box IoU, accuracy@0.5 and the share of
    predicted centres inside the GT box, all in %."""
    ious = box_ious(pred, gt)
    centre = np.array([box_centre_in(p, g) for p, g in zip(pred.detach(), gt)])
    return {"box_iou": 100.0 * float(ious.mean()), "box_acc50": 100.0 * float((ious >= 0.5).mean()),
            "box_centre_in_gt": 100.0 * float(centre.mean()), "n": int(len(ious))}
