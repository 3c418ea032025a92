"""Stages 0-1 (trained in the run or shipped) evaluated on the run's own val splits, once per seed: SAM with the
ground-truth box and with one point, the LLaVA's answers, and the box it decodes itself for each "where"
question of the results files' val expressions (the box every reader of this LLaVA starts from), with the share
it gets right by the target's size, whether the expression names the target's colour, and occlusion."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ppcr.data.dataset import ReferSegDataset
from ppcr.data.stats import OCCLUSION_GROUPS, SIZE_BINS, occlusion_group, ref_geometry, size_group
from ppcr.metrics import box_figures, box_ious
from ppcr.model.tokenizer import load_tokenizer
from ppcr.recipe.profile import Profile
from ppcr.training.data import data_root, data_version, split_datasets
from ppcr.training.diagnostics import batches, sam_prompt_metrics, val_subset
from ppcr.training.mllm_pretrain import MllmPretrainer, WithTargetAttributes, normalised_boxes
from ppcr.training.ris import build_ris_model
from ppcr.training.stage import done_info, relative, stage_dir

# 2: the decoded "where" answers (`where_answer`); 3: their breakdown (`where_breakdown`). Bump when it changes.
FOUNDATION_EVAL_VERSION = 3
WHERE_RIGHT_FROM = 0.5  # box IoU from which the LLaVA's "where" answer counts as right


@torch.no_grad()
def where_answer_boxes(mllm: MllmPretrainer, data: Dataset, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 4) the boxes the LLaVA decodes itself for each "where" question (`data`: items of a
    `WithTargetAttributes`) and (n, 4) the ground-truth boxes, both normalised by the image's width/height."""
    pred, gt = [], []
    for batch in batches(data, batch_size):
        pred.append(mllm.where_answer_boxes(batch))
        gt.append(normalised_boxes(batch, [True] * len(batch["box"])))
    return torch.cat(pred), torch.cat(gt)


def where_answer_ious(mllm: MllmPretrainer, data: Dataset, batch_size: int = 16) -> np.ndarray:
    """(n,) IoU of the box the LLaVA decodes itself for each "where" question with the ground-truth box."""
    return box_ious(*where_answer_boxes(mllm, data, batch_size))


def where_answer_figures(mllm: MllmPretrainer, data: Dataset, batch_size: int = 16) -> dict[str, float]:
    """Box IoU, accuracy@0.5 and centre-in-GT (%) of the box the LLaVA decodes for each "where" question."""
    return box_figures(*where_answer_boxes(mllm, data, batch_size))


# --------------------------------------------------------------------------------------------------------------
# which expressions the "where" answer gets right
# --------------------------------------------------------------------------------------------------------------


COLOUR_GROUPS = ("names the colour", "no colour word")
WHERE_GROUPS = {"size": [label for _, _, label in SIZE_BINS], "colour": list(COLOUR_GROUPS),
                "occlusion": list(OCCLUSION_GROUPS)}


def colour_group(expression: str, attributes: dict[str, Any]) -> str | None:
    """Whether the expression contains the target's colour word (SynRef's attributes; None without them). In
    synrefg the word may name the anchor object instead; the group says only that the word is there."""
    colour = attributes.get("color")
    if not colour:
        return None
    return COLOUR_GROUPS[0] if colour in expression.lower().replace(",", " ").split() else COLOUR_GROUPS[1]


def where_groups(ds: ReferSegDataset, index: int, grid: int) -> dict[str, str | None]:
    """The `WHERE_GROUPS` of expression `index` of `ds` on a `grid` x `grid` vision-token grid."""
    ref_id, sent_idx = ds.items[index]
    ref = ds.refer.ref(ref_id)
    geometry = ref_geometry(ds.refer, ref, grid)
    attributes = ds.refer.ann(ref["ann_id"]).get("synref", {})
    return {"size": size_group(geometry["box_tokens"]),
            "colour": colour_group(ref["sentences"][sent_idx]["sent"], attributes),
            "occlusion": occlusion_group(geometry["visible_fraction"])}


def group_shares(right: np.ndarray, groups: Sequence[dict[str, str | None]]) -> dict[str, Any]:
    """(n,) bool and each expression's groups -> {"all": {"n", "right"}, by: {label: {"n", "right"}}} with "right"
    the share (%) right; groups no expression falls in are left out."""
    right = np.asarray(right, dtype=bool)
    if len(right) != len(groups):
        raise ValueError(f"{len(right)} answers for {len(groups)} expressions")

    def cell(mask: np.ndarray) -> dict[str, Any]:
        return {"n": int(mask.sum()), "right": 100.0 * float(right[mask].mean())}

    out: dict[str, Any] = {"all": cell(np.ones(len(right), dtype=bool))} if len(right) else {}
    for by, labels in WHERE_GROUPS.items():
        found = np.array([g[by] for g in groups], dtype=object)
        cells = {label: cell(found == label) for label in labels if (found == label).any()}
        if cells:
            out[by] = cells
    return out


def foundation_eval_dir(profile: Profile, out: Path, seed: int, weights: dict[str, str | None]) -> Path:
    """The `<out>/stages/seed<k>/foundation_eval-<fingerprint>` folder of these stage 0-1 weights."""
    local = {k: relative(v, out) for k, v in weights.items()}
    stamps = {k: _file_stamp(v) for k, v in weights.items()}
    fp = profile.fingerprint("foundation_eval", local, stamps, profile.datasets, profile.eval_max_expressions,
                             data_version(profile), FOUNDATION_EVAL_VERSION)
    return stage_dir(out, seed, "foundation_eval", fp)


def evaluate_foundation(profile: Profile, out: Path, seed: int, weights: dict[str, str | None]) -> dict[str, Any]:
    """Stages 0-1 (trained here or shipped) on this run's val splits: SAM with the ground-truth box and one point
    per suite (next to filling the box), the MLLM's answers, and the box the LLaVA decodes for each "where"
    question of the results files' val expressions. Cached in `foundation_eval_dir`."""
    config = profile.model_config("glamm", seed)
    local = {k: relative(v, out) for k, v in weights.items()}
    stage = foundation_eval_dir(profile, out, seed, weights)
    if (info := done_info(stage)) is not None:
        return info
    stage.mkdir(parents=True, exist_ok=True)
    root = data_root(profile, out)
    model = build_ris_model(profile, "glamm", seed, weights)
    model.eval()
    prep = model.image_prep()
    per = profile.eval_max_expressions or 10**9
    val_sets = split_datasets(profile, root, prep, "val")
    figures: dict[str, Any] = {}
    for spec, ds in zip(profile.datasets, val_sets):
        sam = sam_prompt_metrics(model.segmenter, val_subset([ds], per), profile.eval_batch_size)
        figures.update({f"{spec.name}/{k}": v for k, v in sam.items()})
    del model
    mllm = MllmPretrainer(config.replace(llava_path=weights["llava_path"]), load_tokenizer(weights["tokenizer_path"]))
    val = val_subset([WithTargetAttributes(d) for d in val_sets], profile.diag_expressions or 48)
    answers = mllm.eval().val_metrics(val, profile.eval_batch_size)
    figures.update({f"mllm/{k}": v for k, v in answers.items() if "probe" not in k})  # probe not shipped
    # the LLaVA's own decoded "where" box on the expressions of the results files (the first of each val split):
    # the box a reader of this LLaVA gets before stages 2-3 (`report.prompt_probe_table`), and which of them it
    # gets right (`report.where_answer_table`)
    where, breakdown = {}, {}
    grid = config.vision.patch_grid
    for spec, ds in zip(profile.datasets, val_sets):
        n = min(per, len(ds))
        pred, gt = where_answer_boxes(mllm, Subset(WithTargetAttributes(ds), range(n)), profile.eval_batch_size)
        key = f"{spec.name}/val"
        where[key] = box_figures(pred, gt)
        right = box_ious(pred, gt) >= WHERE_RIGHT_FROM
        breakdown[key] = group_shares(right, [where_groups(ds, i, grid) for i in range(n)])
    info = {"final_eval": figures, "where_answer": where, "where_breakdown": breakdown, "weights": local,
            "foundation": profile.foundation}
    (stage / "DONE.json").write_text(json.dumps(info, indent=2))
    return info


def _file_stamp(path: str | None) -> str | None:
    """A cheap identity of a weights file or folder (sizes and mtimes), so re-trained weights are re-evaluated."""
    if not path:
        return None
    p = Path(path)
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    return json.dumps([(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.is_file()])

