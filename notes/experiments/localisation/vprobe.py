"""Vision-only: can the small CLIP tower (+projector) localise a single object? flatten -> linear -> box.

    NOBJ=1 OMP_NUM_THREADS=1 python notes/experiments/localisation/vprobe.py v 300
"""
import os, sys, time
import numpy as np, torch
sys.argv += []
exec(open(os.path.join(os.path.dirname(__file__), "ground_common.py")).read())
head = torch.nn.Linear(64 * 256, 4)
params = list(m.llava.model.vision_tower.parameters()) + list(m.llava.model.multi_modal_projector.parameters()) + list(head.parameters())
opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
from torchvision.ops import box_iou
def boxes(b):
    f = S.llava_image_features(m.llava, b["clip_pixel_values"], -2)
    return head(f.flatten(1)).sigmoid()
def ev():
    with torch.no_grad():
        ious = []
        for b in val:
            ious += torch.diag(box_iou(S._ordered(boxes(b)), S.normalised_boxes(b, [True]*32))).tolist()
    return round(100*float(np.mean(ious)),2)
rng = np.random.default_rng(0); t0 = time.time()
for step in range(1, STEPS + 1):
    b = batch(rng, 16); l1 = torch.nn.functional.l1_loss(boxes(b), S.normalised_boxes(b, [True]*16))
    opt.zero_grad(); l1.backward(); opt.step(); sched.step()
    if step % 50 == 0: print(step, f"l1 {l1.item():.3f} val {ev()} {time.time()-t0:.0f}s", flush=True)
