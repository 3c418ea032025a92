"""Stage 1a (dense per-patch pretraining of the CLIP tower) alone, on the foundation's SynRef data, with overrides
of the small preset's vision config, to see what limits the patch tokens' shape accuracy.

    OMP_NUM_THREADS=2 python notes/experiments/tower/tower.py base 1000
    VLAYERS=8 OMP_NUM_THREADS=2 python notes/experiments/tower/tower.py deep 1000
    LR=2e-3 ...; VHIDDEN=256 VINTER=768 ...; VIMG=256 VPATCH=32 ...; VIMG=192 VPATCH=24 ...

DATA: the foundation's SynRef folder (`python -m ppcr.foundation train --profile foundation_dense --out DIR` makes
it under DIR/data; default /work/runs/foundation_s1/data). Prints the val patch accuracies every 250 steps.
"""
import dataclasses, os, sys, time

import torch
from torch.utils.data import DataLoader

from ppcr.model.modeling_ppcr import image_prep_for
from ppcr.training.loop import warmup_decay
from ppcr.training.profile import load_profile
from ppcr.training.stages import synref_tokenizer
from ppcr.training.vision_pretrain import (DenseVisionPretrainer, build_vision_tower, collate_patch_targets,
                                           patch_targets_data)

name, steps = sys.argv[1], int(sys.argv[2])
env = os.environ.get
profile = load_profile("foundation_dense")
config = profile.model_config("glamm", 0)
vision = config.vision
for key, var in (("num_hidden_layers", "VLAYERS"), ("hidden_size", "VHIDDEN"), ("intermediate_size", "VINTER"),
                 ("image_size", "VIMG"), ("patch_size", "VPATCH")):
    if env(var):
        vision = dataclasses.replace(vision, **{key: int(env(var))})
config = config.replace(vision=vision)
root = env("DATA", "/work/runs/foundation_s1/data")
prep = image_prep_for(config)
grid = vision.image_size // vision.patch_size
train = patch_targets_data(root, profile.datasets, "train", prep, grid)
val = patch_targets_data(root, profile.datasets, "val", prep, grid, 48)
torch.manual_seed(0)
module = DenseVisionPretrainer(build_vision_tower(config, synref_tokenizer()), config.vision_feature_layer)
lr = float(env("LR", "1e-3"))
opt = torch.optim.AdamW(module.parameters(), lr=lr, betas=(0.9, 0.95))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_decay(s, 50, steps))
gen = torch.Generator().manual_seed(0)
loader = DataLoader(train, batch_size=16, shuffle=True, collate_fn=collate_patch_targets, generator=gen,
                    drop_last=True)
print(name, dataclasses.asdict(vision), "lr", lr, flush=True)
t0, step = time.time(), 0
while step < steps:
    for batch in loader:
        step += 1
        loss = module(batch)["total"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps:
            module.eval()
            m = module.val_metrics(val)
            module.train()
            print(step, {k: round(v, 3) for k, v in m.items()}, f"{time.time() - t0:.0f}s", flush=True)
        if step >= steps:
            break
