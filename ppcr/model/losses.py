"""The training objective, Eq. 7:  L = l1 * L_BCE + l2 * L_Dice + l3 * L_l1(box) + l4 * L_CE.

The paper's weights are (2, 0.5, 2, 0.5) and are configurable (`LossWeights`).

Choice the paper leaves open (documented here and in the book): L_CE is the next-token cross-entropy on the
answer text of each LLM pass ("Sure, it is [SEG]." for branch A, "Sure, the bounding box is [BOX]." for branch B),
as LISA and GLaMM use; with both passes it is the mean of the two. Mask losses are computed per expression at the
original image resolution and averaged over expressions; the box L1 is on normalised (x1, y1, x2, y2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ppcr.model.config import LossWeights


def mask_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel sigmoid BCE of one mask. logits, target: (H, W)."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def mask_dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of one mask (LISA's smoothing, eps=1). logits, target: (H, W)."""
    p = torch.sigmoid(logits.float()).flatten()
    t = target.float().flatten()
    return 1.0 - (2.0 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)


def box_l1(pred_norm: torch.Tensor, target_norm: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of (B, 4) normalised boxes."""
    return F.l1_loss(pred_norm.float(), target_norm.float())


def image_grounding_ce(logits: torch.Tensor, target_patches: torch.Tensor) -> torch.Tensor:
    """Not in Eq. 7 (the small presets' recipe, `PPCRConfig.train_image_grounding`): cross-entropy of the image
    tokens' softmax (B, N_img) against the target's patches (B, N_img) in {0, 1}, their mass shared equally."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    tp = target_patches.to(logp.device, logp.dtype)
    return -((logp * tp).sum(-1) / tp.sum(-1).clamp(min=1)).mean()


def total_loss(
    weights: LossWeights,
    mask_logits: list[torch.Tensor],
    target_masks: list[torch.Tensor],
    pred_boxes_norm: torch.Tensor | None,
    target_boxes_norm: torch.Tensor | None,
    ce_terms: list[torch.Tensor],
    grounding_terms: list[torch.Tensor] | None = None,
    grounding_weight: float = 0.0,
    semantic_boxes_norm: torch.Tensor | None = None,
    semantic_box_weight: float = 0.0,
    distill_term: torch.Tensor | None = None,
    distill_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Each term and the weighted total. A term absent for a variant (no box for `glamm`) is 0 and not weighted.
    `grounding_terms` (one `image_grounding_ce` per LLM pass) add their mean times `grounding_weight`, and
    `semantic_boxes_norm` (B, 4) (the box read from P_seg_txt) its L1 times `semantic_box_weight`, and
    `distill_term` (branch B against the teacher, `spatial_distillation`) times `distill_weight` (none is in Eq. 7)."""
    if len(mask_logits) != len(target_masks):
        raise ValueError(f"{len(mask_logits)} predicted masks for {len(target_masks)} targets")
    for pred, tgt in zip(mask_logits, target_masks):
        if pred.shape != tgt.shape:
            raise ValueError(f"mask of the wrong size: predicted {tuple(pred.shape)}, target {tuple(tgt.shape)}")
    device = mask_logits[0].device
    bce = torch.stack([mask_bce(p, t) for p, t in zip(mask_logits, target_masks)]).mean()
    dice = torch.stack([mask_dice(p, t) for p, t in zip(mask_logits, target_masks)]).mean()
    l1 = box_l1(pred_boxes_norm, target_boxes_norm) if pred_boxes_norm is not None else torch.zeros((), device=device)
    ce = torch.stack(ce_terms).mean() if ce_terms else torch.zeros((), device=device)
    total = weights.bce * bce + weights.dice * dice + weights.l1 * l1 + weights.ce * ce
    out = {"total": total, "bce": bce, "dice": dice, "l1": l1, "ce": ce}
    if grounding_terms:
        out["grounding"] = torch.stack(grounding_terms).mean()
        out["total"] = out["total"] + grounding_weight * out["grounding"]
    if semantic_boxes_norm is not None:
        if target_boxes_norm is None:
            raise ValueError("the box term on P_seg_txt needs the ground-truth boxes")
        out["semantic_box"] = box_l1(semantic_boxes_norm, target_boxes_norm)
        out["total"] = out["total"] + semantic_box_weight * out["semantic_box"]
    if distill_term is not None:
        out["distill"] = distill_term
        out["total"] = out["total"] + distill_weight * distill_term
    return out


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error of `student` against a fixed `teacher` of the same shape, divided by the teacher's mean
    square: 1 for a zero student, whatever the hidden states' scale."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape")
    teacher = teacher.detach().float()
    return F.mse_loss(student.float(), teacher) / teacher.pow(2).mean().clamp_min(1e-12)


def spatial_distillation(query: torch.Tensor, image: torch.Tensor, teacher_query: torch.Tensor,
                         teacher_image: torch.Tensor) -> torch.Tensor:
    """Branch B's last hidden states against the teacher's (`PPCRConfig.train_spatial_distill`): the mean of the
    relative MSE at the query position (B, d) and on the image tokens (B, N_img, d)."""
    return 0.5 * (relative_mse(query, teacher_query) + relative_mse(image, teacher_image))
