"""Stage-1 grounding experiments behind notes/learning.md (a short loop outside the pipeline, same model classes).

    [SINCOS=1] OMP_NUM_THREADS=1 python notes/experiments/stage1_grounding.py NAME LR {giou,detr,l1} STEPS

Needs the foundation profile's data: `python -m ppcr.foundation train --out /work/runs/foundation` prepares it
(or any run of stage 1 with the foundation profile); set RUN to that --out. Prints val metrics every 100 steps.
"""
import json
import os
import random
import sys
import time
from pathlib import Path
import torch
from torch.utils.data import ConcatDataset, DataLoader
from torchvision.ops import generalized_box_iou_loss
from ppcr.training.profile import load_profile
from ppcr.training import stages as S
from ppcr.model.modeling_ppcr import image_prep_for
from ppcr.data.dataset import collate_refer

name, lr, loss_mode, steps = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
prof = load_profile("foundation"); out = Path(os.environ.get("RUN", "runs/foundation"))
config = prof.model_config("glamm", 0)
root = S.data_root(prof, out)
torch.manual_seed(0)
tok = S.synref_tokenizer()
m = S.MllmPretrainer(config, tok)
if os.environ.get("SINCOS"):
    import math
    emb = m.llava.model.vision_tower.embeddings
    n = int(math.isqrt(emb.num_patches)); d = emb.embed_dim
    ys, xs = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")
    q = d // 4; omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float32) / q)
    def enc(p): o = p.flatten()[:, None] * omega[None]; return torch.cat([o.sin(), o.cos()], 1)
    table = torch.cat([enc(xs), enc(ys)], 1)  # (n*n, d)
    with torch.no_grad():
        w = emb.position_embedding.weight
        patch_std = emb.patch_embedding(torch.randn(4, 3, config.vision.image_size, config.vision.image_size) * 0.5).std().item()
        scale = float(os.environ.get("SINCOS"))
        w[1:] = table * patch_std * scale / table.std(); w[0] = 0
        print("sincos init, patch std", patch_std, "scale", scale)
prep = image_prep_for(config)
data = ConcatDataset([S.WithTargetAttributes(d) for d in S.split_datasets(prof, root, prep)])
val = S.val_subset([S.WithTargetAttributes(d) for d in S.split_datasets(prof, root, prep, "val")], 48)

def fwd(batch, rng):
    tasks = [rng.choice(("describe", "where")) for _ in batch["expression"]]
    hidden, targets = m.answer_hidden(batch, tasks, rng)
    ce = torch.nn.functional.cross_entropy(m.llava.get_output_embeddings()(hidden).flatten(0, 1), targets.flatten(), ignore_index=-100)
    where = torch.tensor([t == "where" for t in tasks])
    pred = m.probe_boxes(hidden[where], targets[where]); gt = S.normalised_boxes(batch, where.tolist())
    l1 = torch.nn.functional.l1_loss(pred, gt)
    if loss_mode == "giou":
        box = l1 + generalized_box_iou_loss(S._ordered(pred), gt, reduction="mean")
    elif loss_mode == "detr":
        box = 5 * l1 + 2 * generalized_box_iou_loss(S._ordered(pred), gt, reduction="mean")
    else:
        box = 5 * l1
    return ce + box, ce, l1

opt = torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
rng = random.Random(0)
dl = DataLoader(data, batch_size=16, shuffle=True, collate_fn=collate_refer, drop_last=True)
it = iter(dl); t0 = time.time(); step = 0
while step < steps:
    try: b = next(it)
    except StopIteration: it = iter(dl); b = next(it)
    m.train(); loss, ce, l1 = fwd(b, rng)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); sched.step(); step += 1
    if step % 25 == 0: print(step, f"ce {ce.item():.3f} l1 {l1.item():.3f} {time.time()-t0:.0f}s", flush=True)
    if step % 100 == 0:
        m.eval(); v = m.val_metrics(val, 32); print("EVAL", name, step, json.dumps({k: round(x, 2) for k, x in v.items()}), flush=True)
