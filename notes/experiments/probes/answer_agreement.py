"""Is a variant's box right where the foundation LLaVA's own decoded "where" answer is right, and elsewhere?

    python notes/experiments/probes/answer_agreement.py RUN_DIR [VARIANT ...]

For the first 150 val expressions of each suite (those of the results files): the LLaVA's decoded box
(`MllmPretrainer.where_answer_boxes`, the shipped foundation) against each variant's F_Map box from
`RUN_DIR/results/<variant>/seed<k>.json` (every seed there); prints P(variant right | LLaVA right / wrong), IoU >= 0.5.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from ppcr.metrics import box_iou
from ppcr.model.modeling_ppcr import image_prep_for
from ppcr.model.tokenizer import load_tokenizer
from ppcr.training.diagnostics import batches
from ppcr.training.profile import load_profile
from ppcr.training.stages import (MllmPretrainer, WithTargetAttributes, base_weights, data_root, normalised_boxes,
                                  split_datasets)


def main(run_dir, *variants):
    torch.set_num_threads(2)
    variants = variants or ("ppcr", "spatial_re")
    profile, out = load_profile("demo"), Path(run_dir)
    weights, config = base_weights(profile, out, 0, False, False), profile.model_config("glamm", 0)
    mllm = MllmPretrainer(config.replace(llava_path=weights["llava_path"]),
                          load_tokenizer(weights["tokenizer_path"])).eval()
    n = profile.eval_max_expressions
    for spec, ds in zip(profile.datasets, split_datasets(profile, data_root(profile, out), image_prep_for(config), "val")):
        key = f"{spec.name}/val"
        ious = []
        for batch in batches(Subset(WithTargetAttributes(ds), range(min(n, len(ds)))), 32):
            gt = normalised_boxes(batch, [True] * len(batch["box"]))
            ious += [box_iou(p.tolist(), g.tolist()) for p, g in zip(mllm.where_answer_boxes(batch), gt)]
        llava = np.array(ious) >= 0.5
        for variant in variants:
            for path in sorted((out / "results" / variant).glob("seed*.json")):
                rows = json.loads(path.read_text())["rows"][key]
                right = np.array([r["box_iou"] for r in rows]) >= 0.5
                print(f"{key} {variant} {path.stem}: LLaVA right {100 * llava.mean():.1f} %; {variant} right "
                      f"{100 * right.mean():.1f} %: {100 * right[llava].mean():.1f} % where the LLaVA is right, "
                      f"{100 * right[~llava].mean():.1f} % where it is wrong")


if __name__ == "__main__":
    main(*sys.argv[1:])
