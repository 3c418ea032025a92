"""Stages 0-1 (trained in the run or shipped) evaluated on the run's own val splits, once per seed: SAM with the
ground-truth box and with one point, the LLaVA's answers, and the box it decodes itself for each "where"
question of the results files' val expressions (the box every reader of this LLaVA starts from)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from ppcr.evaluation.prompt_probe import box_figures
from ppcr.model.tokenizer import load_tokenizer
from ppcr.recipe.profile import Profile
from ppcr.training.data import data_root, data_version, split_datasets
from ppcr.training.diagnostics import batches, sam_prompt_metrics, val_subset
from ppcr.training.mllm_pretrain import MllmPretrainer, WithTargetAttributes, normalised_boxes
from ppcr.training.ris import build_ris_model
from ppcr.training.stage import done_info, relative, stage_dir

FOUNDATION_EVAL_VERSION = 2  # 2: the decoded "where" answers (`where_answer`); bump when the evaluation changes


@torch.no_grad()
def where_answer_figures(mllm: MllmPretrainer, data: Dataset, batch_size: int = 16) -> dict[str, float]:
    """Box IoU, accuracy@0.5 and centre-in-GT (%) of the box the LLaVA decodes for each "where" question."""
    pred, gt = [], []
    for batch in batches(data, batch_size):
        pred.append(mllm.where_answer_boxes(batch))
        gt.append(normalised_boxes(batch, [True] * len(batch["box"])))
    return box_figures(torch.cat(pred), torch.cat(gt))


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
    figures: dict[str, Any] = {}
    for spec, ds in zip(profile.datasets, split_datasets(profile, root, prep, "val")):
        sam = sam_prompt_metrics(model.segmenter, val_subset([ds], per), profile.eval_batch_size)
        figures.update({f"{spec.name}/{k}": v for k, v in sam.items()})
    del model
    mllm = MllmPretrainer(config.replace(llava_path=weights["llava_path"]), load_tokenizer(weights["tokenizer_path"]))
    val = val_subset([WithTargetAttributes(d) for d in split_datasets(profile, root, prep, "val")],
                     profile.diag_expressions or 48)
    answers = mllm.eval().val_metrics(val, profile.eval_batch_size)
    figures.update({f"mllm/{k}": v for k, v in answers.items() if "probe" not in k})  # probe not shipped
    # the LLaVA's own decoded "where" box on the expressions of the results files (the first of each val split):
    # the box a reader of this LLaVA gets before stages 2-3 (`report.prompt_probe_table`)
    where = {f"{spec.name}/val": where_answer_figures(mllm, Subset(WithTargetAttributes(ds), range(min(per, len(ds)))),
                                                      profile.eval_batch_size)
             for spec, ds in zip(profile.datasets, split_datasets(profile, root, prep, "val"))}
    info = {"final_eval": figures, "where_answer": where, "weights": local, "foundation": profile.foundation}
    (stage / "DONE.json").write_text(json.dumps(info, indent=2))
    return info


def _file_stamp(path: str | None) -> str | None:
    """A cheap identity of a weights file or folder (sizes and mtimes), so re-trained weights are re-evaluated."""
    if not path:
        return None
    p = Path(path)
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    return json.dumps([(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.is_file()])

