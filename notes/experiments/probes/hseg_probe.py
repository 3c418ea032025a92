"""Does the LLM's [SEG] hidden state hold more of the box than P_seg_txt = text_hidden_fcs(h[SEG])?

    python notes/experiments/probes/hseg_probe.py RUN_DIR SEED VARIANT [N_TRAIN_PER_SUITE]

Fits `fit_box_probe` (F_Map's shape) on h[SEG] (the LLM width) and on P_seg_txt (SAM's prompt width) of the same
train expressions of the variant's finished stage-3 checkpoint; scores both on the first 150 val expressions of
every suite.
"""

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset

from ppcr.data.dataset import ReferSegDataset
from ppcr.data.refer import Refer
from ppcr.model.modeling_ppcr import PPCRModel
from ppcr.training.diagnostics import batches
from ppcr.training.profile import load_profile
from ppcr.training.prompt_probe import _first, box_figures, fit_box_probe


@torch.no_grad()
def semantic_states(model, data, batch_size=32):
    model.eval()
    seen = []
    hook = model.text_hidden_fcs.register_forward_hook(lambda m, inp, out: seen.append(inp[0].float()))
    h, p, boxes = [], [], []
    for batch in batches(data, batch_size):
        features, index = model.clip_features(batch)
        p_seg_txt, _, _ = model.semantic_stage(features, index, batch["expression"], None)
        h.append(seen.pop())
        p.append(p_seg_txt.float())
        wh = torch.tensor([[w, hh, w, hh] for hh, w in batch["original_size"]], dtype=torch.float32)
        boxes.append(torch.stack([torch.as_tensor(b, dtype=torch.float32) for b in batch["box"]]) / wh)
    hook.remove()
    return torch.cat(h), torch.cat(p), torch.cat(boxes)


def main(run_dir, seed, variant, n_train="800"):
    torch.set_num_threads(1)
    run = Path(run_dir)
    profile = load_profile("demo")
    model = PPCRModel.from_pretrained(next((run / "stages" / f"seed{seed}").glob(f"{variant}-*/model")))
    prep = model.image_prep()
    refers = {s.name: Refer(run / "data", s.name, s.split_by) for s in profile.datasets}
    train = ConcatDataset([_first(ReferSegDataset(refers[s.name], "train", prep), int(n_train))
                           for s in profile.datasets])
    h, p, y = semantic_states(model, train)
    probes = {"h_seg": fit_box_probe(h, y, steps=1000), "p_seg_txt": fit_box_probe(p, y, steps=1000)}
    out = {}
    for s in profile.datasets:
        hv, pv, yv = semantic_states(model, _first(ReferSegDataset(refers[s.name], "val", prep), 150))
        out[s.name] = {"h_seg": box_figures(probes["h_seg"](hv), yv),
                       "p_seg_txt": box_figures(probes["p_seg_txt"](pv), yv)}
    print(json.dumps({"run": str(run), "seed": int(seed), "variant": variant, "splits": out}))


if __name__ == "__main__":
    main(*sys.argv[1:])
