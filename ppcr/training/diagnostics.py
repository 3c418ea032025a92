"""Held-out diagnostics of every stage, so a run shows whether (and how fast) each part learned.

    stage 0 (SAM)      `sam_prompt_metrics`: val mIoU with the ground-truth box prompt and with one point prompt,
                       next to the mIoU of simply filling the ground-truth box (the floor a box-prompted SAM must
                       beat: SynRef objects are compact, so the filled box already overlaps them well).
    stage 1 (MLLM)     `MllmPretrainer.val_metrics` (stages.py): answer-token accuracy of "describe" and "where"
                       questions and the IoU of the box read off the "where" answer.
    stages 2-3 (RIS)   `ris_val_metrics`: val mIoU / oIoU, box accuracy@0.5 and the mIoU of filling the predicted box.

All of them run on a fixed, evenly spread subset of the val splits (`val_subset`), the same at every evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt
from torch.utils.data import ConcatDataset, Dataset, Subset

from ppcr.data.dataset import ReferSegDataset, collate_refer
from ppcr.metrics import RefSegMeter, box_iou, mask_iou
from ppcr.model.heads import order_box


def val_subset(datasets: Sequence[ReferSegDataset], per_dataset: int) -> Dataset:
    """`per_dataset` expressions spread evenly over each dataset (one per ref where possible), concatenated."""
    parts = []
    for ds in datasets:
        n = min(per_dataset, len(ds))
        index = np.unique(np.linspace(0, len(ds) - 1, n).round().astype(int)).tolist()
        parts.append(Subset(ds, index))
    return ConcatDataset(parts)


def batches(data: Dataset, batch_size: int, collate=collate_refer):
    for start in range(0, len(data), batch_size):
        yield collate([data[i] for i in range(start, min(start + batch_size, len(data)))])


def box_fill_mask(box_xyxy: Sequence[float], size: tuple[int, int]) -> np.ndarray:
    """The (H, W) mask of the pixels whose centres lie inside an xyxy box (pixel edges)."""
    h, w = size
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
    return (((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :])


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the mask pixel farthest from the mask's border: one deterministic positive point prompt."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return (m.shape[1] / 2.0, m.shape[0] / 2.0)
    dist = distance_transform_edt(m)
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return (float(x) + 0.5, float(y) + 0.5)


@torch.no_grad()
def sam_prompt_metrics(segmenter, data: Dataset, batch_size: int = 16) -> dict[str, float]:
    """Val mIoU (%) of SAM (a `SamSegmenter`) with the ground-truth box and with one interior point, and of
    filling the ground-truth box."""
    sam = segmenter.sam
    pe = sam.prompt_encoder
    device = sam.pixel_mean.device
    ious: dict[str, list[float]] = {"box": [], "point": [], "box_fill": []}
    for batch in batches(data, batch_size):
        sizes = [tuple(s) for s in batch["original_size"]]
        embeddings = segmenter.encode_images(batch["sam_pixel_values"].to(device))
        index = torch.arange(len(sizes), device=device)
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(len(sizes), -1, *pe.image_embedding_size)
        boxes = torch.stack([torch.as_tensor(b, dtype=torch.float32) for b in batch["box"]]).to(device)
        points = torch.tensor([[interior_point(m.numpy())] for m in batch["mask"]], device=device)  # (B, 1, 2)
        prompts = {
            "box": pe._embed_boxes(segmenter.boxes_to_input_frame(boxes, sizes)),
            "point": pe._embed_points(segmenter.coords_to_input_frame(points, sizes),
                                      torch.ones(len(sizes), 1, dtype=torch.long, device=device), pad=True),
        }
        for name, sparse in prompts.items():
            low_res, _ = segmenter.decode_prompts(embeddings, index, sparse, dense)
            masks = segmenter.postprocess(low_res, batch["sam_input_size"], sizes)
            ious[name] += [mask_iou((p > 0).cpu().numpy(), t.numpy()) for p, t in zip(masks, batch["mask"])]
        ious["box_fill"] += [mask_iou(box_fill_mask(b.tolist(), s), t.numpy())
                             for b, s, t in zip(boxes.cpu(), sizes, batch["mask"])]
    return {f"miou_{k}": 100.0 * float(np.mean(v)) for k, v in ious.items()}


@torch.no_grad()
def ris_val_metrics(model, data: Dataset, batch_size: int = 16, sam_cache=None, box: str | None = None
                    ) -> dict[str, float]:
    """Val figures of a PPCR model (in its variant's evaluation mode, or SAM given the `box` "pred" or "gt"): mIoU,
    oIoU, box accuracy@0.5 and mean box IoU of the predicted box, and the mIoU of filling that predicted box (does
    SAM add anything over it?)."""
    meter = RefSegMeter()
    fill: list[float] = []
    semantic: list[float] = []  # IoU of the box read from P_seg_txt (`train_semantic_box`)
    for batch in batches(data, batch_size):
        out = model(batch, sam_cache=sam_cache, compute_loss=False, box=box)
        st = out.steps
        for j, logits in enumerate(out.mask_logits):
            gt = batch["mask"][j].numpy().astype(bool)
            h, w = batch["original_size"][j]
            gt_box = np.asarray(batch["box"][j], dtype=np.float32)
            pred_box = None
            if st.boxes_norm is not None:
                pred_box = st.boxes_norm[j].float().cpu().numpy() * np.array([w, h, w, h])
                fill.append(mask_iou(box_fill_mask(pred_box, (h, w)), gt))
            if st.semantic_boxes is not None:
                sem = order_box(st.semantic_boxes[j].float()).cpu().numpy() * np.array([w, h, w, h])
                semantic.append(box_iou(sem, gt_box))
            meter.update((logits > 0).cpu().numpy(), gt, pred_box, gt_box if pred_box is not None else None)
    m = meter.compute()
    figures: dict[str, Any] = {"miou": m["mIoU"], "oiou": m["oIoU"]}
    if fill:
        figures.update({"box_acc50": m["box_acc@0.5"], "box_iou": m["box_mIoU"],
                        "box_centre_in": m["box_centre_in_gt"], "miou_pred_box_fill": 100.0 * float(np.mean(fill))})
    if semantic:
        figures["semantic_box_iou"] = 100.0 * float(np.mean(semantic))
    return figures
