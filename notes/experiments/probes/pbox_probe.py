"""How much of the target's box branch B's query state P_seg_box holds, read by a probe of F_Map's shape.

    python notes/experiments/probes/pbox_probe.py RUN_DIR SEED VARIANT {start,trained} [N_TRAIN_PER_SUITE]

start: the model stage 3 begins from (glamm_init's carried weights, branch B at zero LoRA, fresh soft-token
projection and F_Map, as `run_ris_stage` builds it); trained: the variant's finished stage-3 checkpoint. Fits
`ppcr.training.prompt_probe.fit_box_probe` on P_seg_box of train expressions, scores it on the first 150 val
expressions of every suite, and prints the model's own F_Map box beside it (trained only).
"""

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset

from ppcr.data.dataset import ReferSegDataset
from ppcr.data.refer import Refer
from ppcr.model.heads import order_box
from ppcr.model.modeling_ppcr import PPCRModel
from ppcr.model.persistence import load_weights_into
from ppcr.training.diagnostics import batches
from ppcr.training.profile import load_profile
from ppcr.training.prompt_probe import _first, box_figures, fit_box_probe
from ppcr.training.stages import STAGE2_CARRIED, base_weights, build_ris_model


@torch.no_grad()
def spatial_states(model, data, batch_size=32):
    model.eval()
    states, boxes, own = [], [], []
    for batch in batches(data, batch_size):
        features, index = model.clip_features(batch)
        p_seg_txt, _, _ = model.semantic_stage(features, index, batch["expression"], None)
        p_seg_box, box_raw, _, _, _ = model.spatial_stage(features, index, batch["expression"], p_seg_txt, None)
        states.append(p_seg_box.float())
        own.append(order_box(box_raw))
        wh = torch.tensor([[w, h, w, h] for h, w in batch["original_size"]], dtype=torch.float32)
        boxes.append(torch.stack([torch.as_tensor(b, dtype=torch.float32) for b in batch["box"]]) / wh)
    return torch.cat(states), torch.cat(boxes), torch.cat(own)


def main(run_dir, seed, variant, which, n_train="800"):
    torch.set_num_threads(1)
    run, seed = Path(run_dir), int(seed)
    profile = load_profile("demo")
    stages = run / "stages" / f"seed{seed}"
    if which == "start":
        glamm = next(stages.glob("glamm_init-*/model"))
        model = build_ris_model(profile, variant, seed, base_weights(profile, run, seed, False, False))
        load_weights_into(model, glamm, prefixes=STAGE2_CARRIED, branches=("semantic",))
    else:
        model = PPCRModel.from_pretrained(next(stages.glob(f"{variant}-*/model")))
    prep = model.image_prep()
    root = run / "data"
    specs = profile.datasets
    refers = {s.name: Refer(root, s.name, s.split_by) for s in specs}
    train = ConcatDataset([_first(ReferSegDataset(refers[s.name], "train", prep), int(n_train)) for s in specs])
    x, y, _ = spatial_states(model, train)
    probe = fit_box_probe(x, y, steps=1000)
    out = {}
    for s in specs:
        val = _first(ReferSegDataset(refers[s.name], "val", prep), 150)
        xv, yv, own = spatial_states(model, val)
        out[s.name] = {"probe": box_figures(probe(xv), yv)}
        if which == "trained":
            out[s.name]["own"] = box_figures(own, yv)
    print(json.dumps({"run": str(run), "seed": seed, "variant": variant, "which": which, "splits": out}))


if __name__ == "__main__":
    main(*sys.argv[1:])
