"""How much of the target's box the Semantic Segmentation Prompt holds: a probe beside PPCR's own box.

PPCR's branch B reads P_seg_txt alone (as the soft token `[P_SEG]`) and must turn it into a box. Whether a poor
box comes from branch B (it cannot read the prompt) or from P_seg_txt (it does not say where the object is) is not
visible in the box's accuracy. The probe separates the two: an MLP of F_Map's shape, fitted by L1 on P_seg_txt of
train expressions (the LLM not in between), regresses the target's box; its box on held-out expressions is what a
reader that sees nothing but P_seg_txt gets. The trained model is frozen; only the probe learns.

    prompts, boxes = semantic_prompts(model, data)        # (n, C) P_seg_txt, (n, 4) normalised xyxy
    probe = fit_box_probe(prompts, boxes)                 # standardised inputs -> MLPBoxHead
    box_figures(probe(prompts_val), boxes_val)           # box IoU %, accuracy@0.5 %, centre in the GT box %

`run_prompt_probe` does this for one checkpoint on the study's data: train expressions of every suite, and the
first `max_expressions` of each evaluated val split, the expressions its results file holds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset
from tqdm.auto import tqdm

from ppcr.data.dataset import ReferSegDataset
from ppcr.data.refer import Refer
from ppcr.metrics import box_figures
from ppcr.model.heads import MLPBoxHead, order_box
from ppcr.training.diagnostics import batches

PROBE_VERSION = 1  # bump when the probe's recipe changes (invalidates the cached results)


@torch.no_grad()
def semantic_prompts(model, data: Dataset, batch_size: int = 32, progress: bool = False,
                     desc: str = "P_seg_txt") -> tuple[torch.Tensor, torch.Tensor]:
    """P_seg_txt of every expression of `data` (the semantic pass alone, fixed template) -> (n, C) prompts and the
    (n, 4) ground-truth boxes normalised by the image size."""
    model.eval()
    prompts, boxes = [], []
    total = (len(data) + batch_size - 1) // batch_size
    for batch in tqdm(batches(data, batch_size), total=total, desc=desc, disable=not progress, dynamic_ncols=True):
        features, index = model.clip_features(batch)
        p_seg_txt, _, _ = model.semantic_step(features, index, batch["expression"], None)
        prompts.append(p_seg_txt.float().cpu())
        wh = torch.tensor([[w, h, w, h] for h, w in batch["original_size"]], dtype=torch.float32)
        boxes.append(torch.stack([torch.as_tensor(b, dtype=torch.float32) for b in batch["box"]]) / wh)
    return torch.cat(prompts), torch.cat(boxes)


class BoxProbe(nn.Module):
    """Standardised P_seg_txt (B, C) -> ordered normalised xyxy box (B, 4) through an F_Map-shaped MLP."""

    def __init__(self, prompt_dim: int, hidden: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.reshape(1, prompt_dim))
        self.register_buffer("std", std.reshape(1, prompt_dim))
        self.head = MLPBoxHead(prompt_dim, hidden)

    def forward(self, prompts: torch.Tensor) -> torch.Tensor:
        return order_box(self.head((prompts - self.mean) / self.std))


def fit_box_probe(prompts: torch.Tensor, boxes: torch.Tensor, steps: int = 1000, batch_size: int = 64,
                  lr: float = 1e-3, hidden: int = 256, seed: int = 0) -> BoxProbe:
    """Fit a `BoxProbe` by L1 to the normalised boxes (Adam, constant lr, batches drawn with replacement)."""
    if len(prompts) != len(boxes) or len(prompts) == 0:
        raise ValueError(f"need as many boxes as prompts (> 0), got {len(prompts)} and {len(boxes)}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = BoxProbe(prompts.shape[1], hidden, prompts.mean(0), prompts.std(0) + 1e-6)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        i = torch.randint(0, len(prompts), (batch_size,), generator=gen)
        loss = (probe(prompts[i]) - boxes[i]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return probe.eval()


def _first(ds: Dataset, n: int | None) -> Dataset:
    return ds if n is None else Subset(ds, range(min(n, len(ds))))


def run_prompt_probe(model, root: str | Path, datasets: Sequence[Any], out_json: str | Path,
                     train_per_dataset: int = 800, max_expressions: int | None = None, steps: int = 1000,
                     batch_size: int = 32, seed: int = 0, meta: dict[str, Any] | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Fit the probe on P_seg_txt of the first `train_per_dataset` train expressions of every dataset (a
    `DataSpec`: name, split_by, eval_splits) and score it on each val split's first `max_expressions` (the
    expressions of the results files). Writes and returns {"splits": {"<dataset>/val": figures}, "meta": ...}."""
    t0 = time.perf_counter()
    prep = model.image_prep()
    refers = {spec.name: Refer(root, spec.name, spec.split_by) for spec in datasets}
    train = ConcatDataset([_first(ReferSegDataset(refers[spec.name], "train", prep), train_per_dataset)
                           for spec in datasets])
    train_prompts, train_boxes = semantic_prompts(model, train, batch_size, progress, "P_seg_txt (train)")
    probe = fit_box_probe(train_prompts, train_boxes, steps=steps, seed=seed)
    splits: dict[str, Any] = {}
    for spec in datasets:
        if "val" not in spec.eval_splits:
            continue
        val = _first(ReferSegDataset(refers[spec.name], "val", prep), max_expressions)
        prompts, boxes = semantic_prompts(model, val, batch_size, progress, f"P_seg_txt ({spec.name}/val)")
        with torch.no_grad():
            splits[f"{spec.name}/val"] = box_figures(probe(prompts), boxes)
    results = {"splits": splits, "meta": {
        "version": PROBE_VERSION, "train_expressions": len(train), "steps": steps, "seed": seed,
        "variant": model.config.variant, "wall_s": round(time.perf_counter() - t0, 2), **(meta or {})}}
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out)
    return results
