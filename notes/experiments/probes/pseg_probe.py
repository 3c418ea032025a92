"""How much of the target's box can an MLP read from P_seg_txt alone (no LLM in between)?"""
import os
import sys, torch, numpy as np
from ppcr.data.dataset import ReferSegDataset, collate_refer
from ppcr.data.refer import Refer
from ppcr.model.modeling_ppcr import PPCRModel
from ppcr.model.heads import MLPBoxHead, order_box
from ppcr.metrics import box_iou
torch.manual_seed(0)
m = PPCRModel.from_pretrained(sys.argv[1], variant="glamm").eval()
root = os.environ.get("DATA", "runs/demo/data")  # a demo run's REFER-layout data
def feats(split, n):
    out_p, out_b = [], []
    for name, sb in (("synref", "unc"), ("synref+", "unc"), ("synrefg", "umd")):
        ds = ReferSegDataset(Refer(root, name, sb), split, m.image_prep())
        k = min(n, len(ds))
        for s in range(0, k, 32):
            b = collate_refer([ds[i] for i in range(s, min(k, s + 32))])
            with torch.no_grad():
                f, _, idx = m.encode_batch_images(b)
                p, _, _ = m.semantic_stage(f, idx, b["expression"], None)
            wh = torch.tensor([[w, h, w, h] for h, w in b["original_size"]], dtype=torch.float32)
            out_p.append(p); out_b.append(torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in b["box"]]) / wh)
    return torch.cat(out_p), torch.cat(out_b)
split_val = "val"
ptr, btr = feats("train", int(sys.argv[2]) if len(sys.argv) > 2 else 800)
pva, bva = feats(split_val, 96)
print("train", ptr.shape, "val", pva.shape, flush=True)
mu, sd = ptr.mean(0), ptr.std(0) + 1e-6
head = MLPBoxHead(ptr.shape[1], 256)
opt = torch.optim.Adam(head.parameters(), 1e-3, weight_decay=1e-4)
def evalb(p, b):
    with torch.no_grad():
        pb = order_box(head((p - mu) / sd))
    ious = [box_iou(x.numpy(), y.numpy()) for x, y in zip(pb, b)]
    cx, cy = (pb[:, 0] + pb[:, 2]) / 2, (pb[:, 1] + pb[:, 3]) / 2
    cin = ((cx >= b[:, 0]) & (cx <= b[:, 2]) & (cy >= b[:, 1]) & (cy <= b[:, 3])).float().mean().item()
    return 100 * np.mean(ious), 100 * np.mean(np.array(ious) >= 0.5), 100 * cin
for ep in range(2001):
    i = torch.randint(0, len(ptr), (64,))
    loss = (head((ptr[i] - mu) / sd) - btr[i]).abs().mean()
    opt.zero_grad(); loss.backward(); opt.step()
    if ep % 500 == 0:
        print(ep, "train", evalb(ptr[:300], btr[:300]), "val", evalb(pva, bva), flush=True)
