"""Figures for the book: overlays, the paper's Fig. 1 / 6 / 7 layouts, bar charts and the stage panel.

Every function builds a `matplotlib.figure.Figure` directly (never through `pyplot`), so nothing here depends on,
or changes, the active backend: the figures work headless, in scripts and in notebooks alike (a notebook shows a
returned Figure through its rich display), and they never accumulate in pyplot's global figure list.
Save one with `fig.savefig(path)`.

Conventions: images are uint8 (H, W, 3); masks are (H, W) booleans (or 0/1); boxes are pixel xyxy. Predictions
are drawn with solid lines, ground truth with dashed lines.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ppcr.metrics import box_iou, mask_iou

Box = Sequence[float] | np.ndarray

PRED_COLOR = "tab:red"
GT_COLOR = "tab:green"
MASK_ALPHA = 0.45
# Colours of the entities of Fig. 1 (cycled).
ENTITY_COLORS = ("tab:blue", "tab:orange", "tab:purple", "tab:cyan", "tab:olive", "tab:pink", "tab:brown")
PANEL_INCHES = 3.0


# ---------------------------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------------------------


def new_figure(nrows: int = 1, ncols: int = 1, panel_inches: float = PANEL_INCHES,
               squeeze: bool = False) -> tuple[Figure, np.ndarray]:
    """A pyplot-free Figure with an (nrows, ncols) grid of Axes (always a 2-D array unless `squeeze`)."""
    fig = Figure(figsize=(panel_inches * ncols, panel_inches * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=squeeze)
    return fig, axes


def mask_rgba(mask: np.ndarray, color: Any = PRED_COLOR, alpha: float = MASK_ALPHA) -> np.ndarray:
    """(H, W) mask -> (H, W, 4) float RGBA layer: `color` at `alpha` on the mask, transparent elsewhere."""
    m = np.asarray(mask) != 0
    layer = np.zeros((*m.shape, 4), dtype=np.float32)
    layer[m] = to_rgba(color, alpha)
    return layer


def draw_box(ax: Axes, box: Box, color: Any = PRED_COLOR, dashed: bool = False, label: str | None = None,
             linewidth: float = 2.0) -> Rectangle:
    """Draw a pixel xyxy box as a rectangle (solid for predictions, dashed for ground truth), optionally labelled."""
    x1, y1, x2, y2 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(4))
    rect = Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=linewidth,
                     linestyle="--" if dashed else "-")
    ax.add_patch(rect)
    if label:
        ax.text(x1, y1, label, color="white", fontsize=7, va="bottom", ha="left",
                bbox={"facecolor": color, "edgecolor": "none", "pad": 1.0, "alpha": 0.85})
    return rect


def blank_panel(ax: Axes, text: str) -> None:
    """An axis that only says why it is empty."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, color="0.4", transform=ax.transAxes, wrap=True)


def _fmt_iou(name: str, value: float | None) -> str:
    return name if value is None else f"{name} (IoU {100 * value:.1f})"


def overlay(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    box: Box | None = None,
    gt_mask: np.ndarray | None = None,
    gt_box: Box | None = None,
    color: Any = PRED_COLOR,
    gt_color: Any = GT_COLOR,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """Draw an image with translucent masks and box outlines; returns the Axes drawn on.

    The ground-truth mask is drawn under the prediction in `gt_color`; the predicted box is solid, the
    ground-truth box dashed. Without `ax`, a new one-panel Figure is made (reach it with `ax.figure`).
    """
    if ax is None:
        _, axes = new_figure(1, 1)
        ax = axes[0, 0]
    image = np.asarray(image)
    ax.imshow(image, interpolation="nearest")
    if gt_mask is not None:
        ax.imshow(mask_rgba(gt_mask, gt_color, MASK_ALPHA * 0.8), interpolation="nearest")
    if mask is not None:
        ax.imshow(mask_rgba(mask, color), interpolation="nearest")
    if gt_box is not None:
        draw_box(ax, gt_box, gt_color, dashed=True)
    if box is not None:
        draw_box(ax, box, color)
    h, w = image.shape[:2]
    ax.set_xlim(-0.5, w - 0.5)  # boxes outside the image must not rescale the view
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def save_overlay_png(path: str | Path, image: np.ndarray, mask: np.ndarray | None = None, box: Box | None = None,
                     title: str | None = None, dpi: int = 120) -> Path:
    """Save a one-panel overlay (image, predicted mask and box) as a PNG; returns the path."""
    ax = overlay(image, mask=mask, box=box, title=title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ax.figure.savefig(path, dpi=dpi)
    return path


def prediction_grid(image: np.ndarray, predictions: Sequence[Mapping[str, Any]], gt_box: Box | None = None,
                    max_cols: int = 4) -> Figure:
    """One panel per prediction of `PPCRModel.predict` on one image: mask + box, expression and score as title."""
    n = max(1, len(predictions))
    ncols = min(n, max_cols)
    nrows = -(-n // ncols)
    fig, axes = new_figure(nrows, ncols)
    flat = axes.ravel()
    for ax, pred in zip(flat, predictions):
        title = f"{pred['expression']!r}\nscore {float(pred['score']):.3f}"
        overlay(image, mask=pred.get("mask"), box=pred.get("box"), gt_box=gt_box, ax=ax, title=title)
    for ax in flat[len(predictions):]:
        ax.remove()
    return fig


# ---------------------------------------------------------------------------------------------------------------
# the paper's figures
# ---------------------------------------------------------------------------------------------------------------


def fig1_entities(image: np.ndarray, expression: str, entity_boxes: Mapping[str, Box],
                  target_mask: np.ndarray | None, target: str | None = None) -> Figure:
    """Fig. 1 style: one expression naming several entities; each entity's box is labelled, the target's mask
    highlighted. `target` names the entity the expression refers to (its box is drawn thicker)."""
    fig, axes = new_figure(1, 1, panel_inches=4.5)
    ax = axes[0, 0]
    overlay(image, mask=target_mask, color=PRED_COLOR, ax=ax)
    for i, (name, box) in enumerate(entity_boxes.items()):
        is_target = name == target
        draw_box(ax, box, PRED_COLOR if is_target else ENTITY_COLORS[i % len(ENTITY_COLORS)], label=name,
                 linewidth=3.0 if is_target else 1.5)
    ax.set_title(f"\u201c{expression}\u201d", fontsize=9)
    return fig


FIG6_COLUMNS = ("GT mask", "GLaMM-style", "PPCR", "GT box as Spatial SP", "Predicted box (Spatial SP)")


def fig6_qualitative(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """Fig. 6: one row per example, columns GT mask | GLaMM-style | PPCR | GT box as Spatial SP | predicted box.

    Each row holds image, expression, gt_mask, gt_box, glamm_mask, ppcr_mask, ppcr_box and optionally
    oracle_mask (the `gt_box_oracle` prediction). IoUs shown in the titles are taken from glamm_iou, ppcr_iou,
    oracle_iou and box_iou when given, otherwise computed from the masks and boxes.
    """
    if not rows:
        raise ValueError("fig6_qualitative needs at least one row")
    fig, axes = new_figure(len(rows), len(FIG6_COLUMNS), panel_inches=2.4)
    for r, row in enumerate(rows):
        image, gt_mask, gt_box = row["image"], row["gt_mask"], row["gt_box"]
        glamm_iou = row.get("glamm_iou", mask_iou(row["glamm_mask"], gt_mask))
        ppcr_iou = row.get("ppcr_iou", mask_iou(row["ppcr_mask"], gt_mask))
        b_iou = row.get("box_iou", None if row.get("ppcr_box") is None else box_iou(row["ppcr_box"], gt_box))
        ax = axes[r]
        overlay(image, mask=gt_mask, box=gt_box, color=GT_COLOR, ax=ax[0], title=FIG6_COLUMNS[0])
        ax[0].set_ylabel(_wrap(row.get("expression", ""), 28), fontsize=8)
        overlay(image, mask=row["glamm_mask"], ax=ax[1], title=_fmt_iou(FIG6_COLUMNS[1], glamm_iou))
        overlay(image, mask=row["ppcr_mask"], ax=ax[2], title=_fmt_iou(FIG6_COLUMNS[2], ppcr_iou))
        if row.get("oracle_mask") is not None:
            oracle_iou = row.get("oracle_iou", mask_iou(row["oracle_mask"], gt_mask))
            overlay(image, mask=row["oracle_mask"], gt_box=gt_box, ax=ax[3],
                    title=_fmt_iou(FIG6_COLUMNS[3], oracle_iou))
        else:
            blank_panel(ax[3], "no oracle prediction")
            ax[3].set_title(FIG6_COLUMNS[3], fontsize=8)
        if row.get("ppcr_box") is not None:
            overlay(image, box=row["ppcr_box"], gt_box=gt_box, ax=ax[4],
                    title=f"{FIG6_COLUMNS[4]}\nbox IoU {100 * float(b_iou):.1f}")
        else:
            blank_panel(ax[4], "no predicted box")
            ax[4].set_title(FIG6_COLUMNS[4], fontsize=8)
    return fig


def fig7_failures(rows: Sequence[Mapping[str, Any]], reasons: Sequence[str]) -> Figure:
    """Fig. 7: failure cases, one panel each, GT (green, dashed box) under the prediction (red, solid box).

    Each row holds image, expression, gt_mask, gt_box, pred_mask and optionally pred_box and iou (computed when
    absent); `reasons` gives one reason per row (e.g. "occlusion", "blur", "ambiguity"), shown with the IoU.
    """
    if len(rows) != len(reasons):
        raise ValueError(f"{len(reasons)} reasons for {len(rows)} failure rows")
    if not rows:
        raise ValueError("fig7_failures needs at least one row")
    fig, axes = new_figure(1, len(rows), panel_inches=2.8)
    for ax, row, reason in zip(axes[0], rows, reasons):
        iou = row.get("iou", mask_iou(row["pred_mask"], row["gt_mask"]))
        overlay(row["image"], mask=row["pred_mask"], box=row.get("pred_box"), gt_mask=row["gt_mask"],
                gt_box=row.get("gt_box"), ax=ax, title=f"{reason} \u00b7 IoU {100 * float(iou):.1f}")
        ax.set_xlabel(_wrap(row.get("expression", ""), 32), fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# charts
# ---------------------------------------------------------------------------------------------------------------


def bar_with_errors(table: Mapping[str, tuple[float, float]], ylabel: str, title: str | None = None) -> Figure:
    """One bar per entry (mean) with its std as an error bar, values printed on the bars."""
    names = list(table)
    means = np.array([float(table[n][0]) for n in names])
    stds = np.array([float(table[n][1]) for n in names])
    fig = Figure(figsize=(max(3.0, 1.1 * len(names) + 1.5), 3.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(names))
    bars = ax.bar(x, means, yerr=stds, capsize=4, color=[ENTITY_COLORS[i % len(ENTITY_COLORS)] for i in x])
    ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], padding=2, fontsize=7)
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def _records(rows: Any) -> list[dict[str, Any]]:
    """A list of dicts, or anything with pandas' `to_dict("records")` -> list of dicts."""
    if hasattr(rows, "to_dict"):
        return list(rows.to_dict("records"))
    return [dict(r) for r in rows]


def breakdown_plot(rows: Iterable[Mapping[str, Any]] | Any, value: str = "mIoU", ylabel: str | None = None,
                   title: str | None = None) -> Figure:
    """Grouped bars: for each group (expression type, number of distractors, ...) one bar per variant.

    rows: dicts (or a DataFrame) with keys group, variant, `value` (default mIoU) and n (expressions in the
    group, printed under the group name). Groups and variants keep their order of first appearance.
    """
    records = _records(rows)
    groups = list(dict.fromkeys(str(r["group"]) for r in records))
    variants = list(dict.fromkeys(str(r["variant"]) for r in records))
    lookup = {(str(r["group"]), str(r["variant"])): r for r in records}
    counts = {g: max((int(r.get("n", 0)) for r in records if str(r["group"]) == g), default=0) for g in groups}
    fig = Figure(figsize=(max(4.0, 0.9 * len(groups) * max(1, len(variants)) / 2 + 2), 3.4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(variants))
    for j, variant in enumerate(variants):
        heights = [float(lookup[(g, variant)][value]) if (g, variant) in lookup else np.nan for g in groups]
        ax.bar(x + (j - (len(variants) - 1) / 2) * width, heights, width, label=variant,
               color=ENTITY_COLORS[j % len(ENTITY_COLORS)])
    ax.set_xticks(x, [f"{g}\n(n={counts[g]})" for g in groups], fontsize=8)
    ax.set_ylabel(ylabel or value)
    if len(variants) > 1:
        ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def distribution_plot(values: Mapping[str, Sequence[float]], xlabel: str, title: str | None = None,
                      mark: float | None = None, mark_label: str | None = None, bins: int = 30) -> Figure:
    """Overlaid step histograms, one per group (e.g. each dataset's target sizes), as shares of the group; `mark`
    draws a vertical reference line (e.g. one vision token)."""
    fig = Figure(figsize=(6.0, 3.2), layout="constrained")
    ax = fig.subplots()
    every = [v for group in values.values() for v in group]
    edges = np.linspace(0.0, max(every, default=1.0) * 1.02, bins + 1)
    for j, (name, group) in enumerate(values.items()):
        weights = np.full(len(group), 100.0 / max(len(group), 1))
        ax.hist(group, bins=edges, weights=weights, histtype="step", linewidth=1.6, label=f"{name} (n={len(group)})",
                color=ENTITY_COLORS[j % len(ENTITY_COLORS)])
    if mark is not None:
        ax.axvline(mark, color="0.3", linestyle="--", linewidth=1.0, label=mark_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of the refs (%)")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# the intermediate outputs of one expression
# ---------------------------------------------------------------------------------------------------------------


def _heat_strip(ax: Axes, vector: np.ndarray | None, name: str) -> None:
    """A (1, D) heat strip of a prompt vector, or a note when the stage did not run."""
    if vector is None:
        blank_panel(ax, f"{name}: n/a (no spatial step)")
        return
    v = np.asarray(vector, dtype=np.float32).reshape(1, -1)
    ax.imshow(v, aspect="auto", cmap="coolwarm", interpolation="nearest")
    ax.set_yticks([])
    ax.set_title(f"{name} (d={v.shape[1]}, |v|={float(np.linalg.norm(v)):.2f})", fontsize=8)


def stage_panel(image: np.ndarray, prediction: Mapping[str, Any], gt_mask: np.ndarray | None = None,
                gt_box: Box | None = None) -> Figure:
    """The intermediate outputs for one expression (a dict of `PPCRModel.predict`), side by side.

    Top: the image with the predicted box (stage 2) and the mask (stage 3, with SAM's score); bottom: heat
    strips of P_seg_txt (stage 1) and P_seg_box (stage 2). Optional ground truth is drawn dashed / in green.
    """
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    grid = fig.add_gridspec(3, 2, height_ratios=[4, 0.7, 0.7])
    ax_box, ax_mask = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    ax_txt, ax_sp = fig.add_subplot(grid[1, :]), fig.add_subplot(grid[2, :])
    box = prediction.get("box")
    box_title = "step 2: box" if box is not None else "step 2: no box (variant without a spatial step)"
    overlay(image, box=box, gt_box=gt_box, ax=ax_box, title=box_title)
    overlay(image, mask=prediction.get("mask"), gt_mask=gt_mask, ax=ax_mask,
            title=f"stage 3: mask (score {float(prediction.get('score', float('nan'))):.3f})")
    _heat_strip(ax_txt, prediction.get("p_seg_txt"), "stage 1: P_seg_txt")
    _heat_strip(ax_sp, prediction.get("p_seg_box"), "stage 2: P_seg_box")
    expression = prediction.get("expression")
    if expression:
        fig.suptitle(f"\u201c{expression}\u201d", fontsize=9)
    return fig


def _wrap(text: str, width: int) -> str:
    """Wrap a caption on word boundaries."""

    return "\n".join(textwrap.wrap(str(text), width)) if text else ""
