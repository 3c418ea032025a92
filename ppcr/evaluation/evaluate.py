"""Evaluation: every split of every benchmark in one call, deterministic (fixed templates, teacher-forced answers).

`results.json` holds, per "dataset/split": the `RefSegMeter` metrics; per expression: ref_id, sent_id, IoU, box IoU,
the predicted box, the intersection/union (for bootstrap intervals of oIoU), the SynRef metadata (expression type,
distractors, visible fraction, blur) and the predicted mask as COCO RLE (for the explorer); and metadata: git
commit, profile, variant, seed, preset, device, wall time, expressions/s, the command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ppcr.data.dataset import ReferSegDataset, collate_refer
from ppcr.data.refer import Refer
from ppcr.metrics import RefSegMeter, box_iou, mask_iou
from ppcr.model.config import VARIANTS
from ppcr.model.modeling_ppcr import PPCRModel
from ppcr.provenance import device_name, git_commit, resolve_device
from ppcr.recipe.profile import DataSpec, load_profile, model_variant
from ppcr.training.data import data_root, prepare_data
from ppcr.training.diagnostics import box_fill_mask
from ppcr.training.loop import peak_memory_mb
from ppcr.training.ris import sam_cache_for, trained_checkpoint

META_KEYS = ("expr_type", "distractors_same_category", "visible_fraction", "blurred", "low_contrast")


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


@torch.no_grad()
def evaluate_split(model: PPCRModel, dataset: ReferSegDataset, batch_size: int, sam_cache=None,
                   max_expressions: int | None = None, keep_masks: bool = True, progress: bool = True,
                   desc: str = "eval") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics and per-expression rows of one split. Expressions keep the dataset's order (an image's expressions
    are adjacent, so its CLIP and SAM encodings are computed once per batch)."""
    model.eval()
    data = dataset if max_expressions is None else Subset(dataset, range(min(max_expressions, len(dataset))))
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_refer)
    meter = RefSegMeter()
    rows: list[dict[str, Any]] = []
    for batch in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True):
        out = model(batch, sam_cache=sam_cache, compute_loss=False)
        st = out.steps
        for j, logits in enumerate(out.mask_logits):
            pred = (logits > 0).cpu().numpy()
            gt = batch["mask"][j].numpy().astype(bool)
            h, w = batch["original_size"][j]
            gt_box = np.asarray(batch["box"][j], dtype=np.float32)
            pred_box = None
            if st.boxes_norm is not None:  # the model's own box (also reported for the oracle)
                pred_box = (st.boxes_norm[j].float().cpu().numpy() * np.array([w, h, w, h])).astype(np.float32)
            iou = meter.update(pred, gt, pred_box, gt_box) if pred_box is not None else meter.update(pred, gt)
            meta = batch["meta"][j]
            row = {
                "ref_id": meta["ref_id"], "sent_id": meta["sent_id"], "image_id": meta["image_id"],
                "expression": batch["expression"][j], "iou": float(iou),
                "intersection": int(meter.intersections[-1]), "union": int(meter.unions[-1]),
                "box_iou": None if pred_box is None else float(box_iou(pred_box, gt_box)),
                "pred_box": None if pred_box is None else [round(float(v), 2) for v in pred_box],
                "gt_box": [round(float(v), 2) for v in gt_box],
                # the target's pixels and the image's size: its size in vision tokens, the mask's completeness
                "target_area": int(gt.sum()), "image_size": [int(h), int(w)],
                "score": float(st.iou_pred[j, 0]),
                # sanity baselines: the IoU of simply filling the ground-truth / the predicted box
                "gt_box_fill_iou": float(mask_iou(box_fill_mask(gt_box, (h, w)), gt)),
                "pred_box_fill_iou": None if pred_box is None else float(mask_iou(box_fill_mask(pred_box, (h, w)), gt)),
                **{k: meta[k] for k in META_KEYS if k in meta},
            }
            if keep_masks:
                row["mask_rle"] = encode_rle(pred)
            rows.append(row)
    metrics = meter.compute()
    metrics = {k: v for k, v in metrics.items() if k not in ("ious", "box_ious", "intersections", "unions")}
    return metrics, rows


def evaluate_model(model: PPCRModel, root: str | Path, datasets: list[DataSpec], out_json: str | Path,
                   batch_size: int = 16, max_expressions: int | None = None, sam_cache=None,
                   meta: dict[str, Any] | None = None, splits: list[str] | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Evaluate on every (dataset, split) and write results.json."""
    t0 = time.perf_counter()
    prep = model.image_prep()
    results: dict[str, Any] = {"metrics": {}, "rows": {}}
    n = 0
    for spec in datasets:
        refer = Refer(root, spec.name, spec.split_by)
        for split in splits or spec.eval_splits:
            ds = ReferSegDataset(refer, split, prep)
            key = f"{spec.name}/{split}"
            metrics, rows = evaluate_split(model, ds, batch_size, sam_cache, max_expressions, progress=progress,
                                           desc=f"eval {model.config.variant} {key}")
            results["metrics"][key] = metrics
            results["rows"][key] = rows
            n += len(rows)
    wall = time.perf_counter() - t0
    device = model.device
    results["meta"] = {
        "git_commit": git_commit(), "variant": model.config.variant, "preset": model.config.preset,
        "seed": model.config.seed, "device": device_name(device), "torch": torch.__version__,
        "wall_s": round(wall, 2), "expressions": n, "expressions_per_s": round(n / max(wall, 1e-9), 3),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "max_expressions_per_split": max_expressions, "prefix_cache": getattr(model, "prefix_cache", None),
        "command": " ".join(sys.argv),
        **(meta or {}),
    }
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results))
    tmp.replace(out)
    return results


def load_for_evaluation(checkpoint: str | Path, variant: str, device: str = "cpu",
                        weights: dict[str, str] | None = None) -> PPCRModel:
    """A trained checkpoint as `variant` (the oracle is the ppcr checkpoint with ground-truth boxes). `weights`:
    where the base weights lie now ({"llava_path": ..., "sam_checkpoint": ...}), for a checkpoint that names them
    (the paper profile's) and was moved to another machine or folder."""
    overrides = {k: str(v) for k, v in (weights or {}).items() if v}
    model = PPCRModel.from_pretrained(checkpoint, variant=variant, **overrides)
    return model.to(resolve_device(device))


# --------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", required=True, help="smoke | demo | synthetic | paper, or a profile YAML")
    p.add_argument("--variant", required=True)
    p.add_argument("--checkpoint", help="a PPCR checkpoint folder (default: the variant's trained one in --run-dir; "
                   "evaluate never trains)")
    p.add_argument("--run-dir", help="where the profile's stages live (default runs/<profile>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", help="one dataset/suite of the profile (default: all)")
    p.add_argument("--split", help="one split (default: the profile's evaluation splits)")
    p.add_argument("--max-expressions", type=int, help="per split (default: the profile's)")
    p.add_argument("--data-root", help="root of the REFER layout (paper profile)")
    p.add_argument("--llava-path", help="where the checkpoint's base LLaVA lies now (paper profile; default: the "
                   "path it records)")
    p.add_argument("--sam-checkpoint", help="where the checkpoint's SAM lies now (paper profile)")
    p.add_argument("--device", help="cpu | cuda | auto (default: the profile's)")
    p.add_argument("--out", required=True, help="results.json to write")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="run every expression's full LLM sequences (default: each image's prompt prefix once)")


def run(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile, {"data_root": args.data_root})
    if args.variant not in VARIANTS and args.variant not in profile.recipe_variants():
        raise SystemExit(f"ppcr evaluate: unknown variant {args.variant!r}; choose one of {sorted(VARIANTS)} "
                         f"or {profile.recipe_variants()}")
    run_dir = Path(args.run_dir or f"runs/{profile.name}")
    datasets = [d for d in profile.datasets if args.dataset in (None, d.name)]
    if not datasets:
        raise SystemExit(f"ppcr evaluate: {args.dataset!r} is not in profile {profile.name} "
                         f"({[d.name for d in profile.datasets]})")
    checkpoint = Path(args.checkpoint) if args.checkpoint else trained_checkpoint(run_dir, args.variant, args.seed)
    if not (checkpoint / "config.json").is_file():
        raise SystemExit(f"ppcr evaluate: not a PPCR checkpoint: {checkpoint}")
    prepare_data(profile, run_dir, progress=not args.no_progress)
    model = load_for_evaluation(checkpoint, model_variant(args.variant), args.device or profile.device,
                                {"llava_path": args.llava_path, "sam_checkpoint": args.sam_checkpoint})
    model.prefix_cache = not args.no_prefix_cache
    evaluate_model(
        model, data_root(profile, run_dir), datasets, args.out, batch_size=profile.eval_batch_size,
        max_expressions=args.max_expressions or profile.eval_max_expressions,
        sam_cache=sam_cache_for(model, run_dir, profile), splits=[args.split] if args.split else None,
        meta={"profile": profile.name, "checkpoint": str(checkpoint)}, progress=not args.no_progress,
    )
    res = json.loads(Path(args.out).read_text())
    for key, m in res["metrics"].items():
        print(f"{args.variant:>15} {key:<16} oIoU {m['oIoU']:6.2f}  mIoU {m['mIoU']:6.2f}  n={m['n']}")
    return 0
