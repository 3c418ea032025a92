"""The P_seg_txt box probe (ppcr.evaluation.prompt_probe): it reads a box the prompts hold, and not one they do not."""

from __future__ import annotations

import math

import torch

from ppcr.metrics import box_figures
from ppcr.evaluation.prompt_probe import fit_box_probe


def boxes_from(prompts: torch.Tensor) -> torch.Tensor:
    """Normalised xyxy boxes that are a fixed smooth function of the prompts: centre and size from two projections."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(prompts.shape[1], 4, generator=g)
    z = torch.sigmoid(prompts @ w / math.sqrt(prompts.shape[1]) * 2)
    centre, size = 0.2 + 0.6 * z[:, :2], 0.1 + 0.2 * z[:, 2:]
    return torch.cat([centre - size / 2, centre + size / 2], dim=1)


def test_probe_reads_the_box_the_prompts_hold() -> None:
    g = torch.Generator().manual_seed(0)
    prompts = torch.randn(1200, 16, generator=g)
    boxes = boxes_from(prompts)
    train, val = slice(0, 1000), slice(1000, None)
    probe = fit_box_probe(prompts[train], boxes[train], steps=800)
    with torch.no_grad():
        held_out = box_figures(probe(prompts[val]), boxes[val])
    # the same probe on prompts that say nothing about the box (the boxes of other rows)
    shuffled = fit_box_probe(prompts[train], boxes[train][torch.randperm(1000, generator=g)], steps=800)
    with torch.no_grad():
        blind = box_figures(shuffled(prompts[val]), boxes[val])
    assert held_out["n"] == blind["n"] == 200
    assert held_out["box_iou"] > 60 and held_out["box_centre_in_gt"] > 90
    assert blind["box_iou"] < 35 and held_out["box_iou"] - blind["box_iou"] > 30


def test_box_figures_by_hand() -> None:
    gt = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7]])
    pred = torch.tensor([[0.0, 0.0, 0.2, 0.2],      # exact: IoU 1, centre inside
                         [0.55, 0.45, 0.95, 0.85]])  # IoU 0.15 / 0.21 < 0.5, centre (0.75, 0.65) outside
    fig = box_figures(pred, gt)
    inter, union = 0.15 * 0.2, 0.2 * 0.2 + 0.4 * 0.4 - 0.15 * 0.2
    assert math.isclose(fig["box_iou"], 100 * (1 + inter / union) / 2, rel_tol=1e-5)
    assert fig["box_acc50"] == 50.0 and fig["box_centre_in_gt"] == 50.0 and fig["n"] == 2
