"""Stage 3 from a stage-2 checkpoint with F_Map started from a probe of the teacher's query states (experiment).

    python notes/experiments/fmap_warmstart.py N_TRAIN GLAMM_INIT_MODEL PROFILE VARIANT SEED OUT

Before stage 3 trains, the LLaVA without LoRA (the teacher of `train_spatial_distill`) reads the spatial template
with the expression for N_TRAIN train expressions per suite; a probe of F_Map's shape is fitted on its query
states (`ppcr.training.prompt_probe.fit_box_probe`) and, its input standardisation folded into the first layer,
becomes F_Map's start. The other arguments are those of `stage3_from.py`. An experiment-only patch: the stage's
fingerprint does not see it, so give the run its own OUT.
"""

import random
import sys
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset

sys.path.insert(0, str(Path(__file__).parent))

import ppcr.training.stages as stages  # noqa: E402
from ppcr.data.dataset import ReferSegDataset  # noqa: E402
from ppcr.data.refer import Refer  # noqa: E402
from ppcr.model import prompts  # noqa: E402
from ppcr.model.tokenizer import encode_pass  # noqa: E402
from ppcr.training.diagnostics import batches  # noqa: E402
from ppcr.training.prompt_probe import _first, fit_box_probe  # noqa: E402


@torch.no_grad()
def teacher_states(model, data, batch_size=32, seed=0):
    rng = random.Random(seed)
    cfg = model.config
    templates = prompts.spatial_templates(cfg.spec.spatial_source)
    states, boxes = [], []
    for batch in batches(data, batch_size):
        features, index = model.clip_features(batch)
        questions = [prompts.fill(prompts.pick_template(templates, rng, 0).replace("{P}", "{T}"), e)
                     for e in batch["expression"]]
        ctx, ans = zip(*[prompts.conversation(q, prompts.SPATIAL_ANSWER, cfg.system_prompt, cfg.image_after_prompt)
                         for q in questions])
        enc = encode_pass(model.tokenizer, ctx, ans, prompts.BOX_TOKEN, features.shape[1])
        query, _ = model.mllm.run_base(enc, features, index)
        states.append(query.float())
        wh = torch.tensor([[w, h, w, h] for h, w in batch["original_size"]], dtype=torch.float32)
        boxes.append(torch.stack([torch.as_tensor(b, dtype=torch.float32) for b in batch["box"]]) / wh)
    return torch.cat(states), torch.cat(boxes)


def warm_start(model, root, specs, n_train):
    prep = model.image_prep()
    train = ConcatDataset([_first(ReferSegDataset(Refer(root, s.name, s.split_by), "train", prep), n_train)
                           for s in specs])
    was = model.training
    model.eval()
    x, y = teacher_states(model, train)
    model.train(was)
    probe = fit_box_probe(x, y, steps=1000, hidden=model.config.box_head_hidden)
    first = probe.head.mlp[0]
    with torch.no_grad():
        w = first.weight / probe.std  # (h, d): standardisation folded in
        b = first.bias - (w * probe.mean).sum(1)
        target = model.box_head.mlp
        target[0].weight.copy_(w)
        target[0].bias.copy_(b)
        for i in (2, 4):
            target[i].weight.copy_(probe.head.mlp[i].weight)
            target[i].bias.copy_(probe.head.mlp[i].bias)
    print(f"F_Map warm start: {len(x)} teacher states", flush=True)


if __name__ == "__main__":
    n_train, *rest = sys.argv[1:]
    plain = stages.sam_cache_for
    state = {"done": False}

    def hooked(model, out):  # run_ris_stage calls this right after loading stage 2's weights
        if not state["done"]:
            from ppcr.training.profile import load_profile

            profile = load_profile(rest[1])
            warm_start(model, stages.data_root(profile, out), profile.datasets, int(n_train))
            state["done"] = True
        return plain(model, out)

    stages.sam_cache_for = hooked
    import stage3_from  # noqa: E402

    stage3_from.main(*rest)
