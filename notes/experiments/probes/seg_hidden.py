"""The [SEG] hidden state of a foundation LLaVA before stage 2: how alike across expressions, how much box it holds."""
import os
import sys, torch, numpy as np
from pathlib import Path
from ppcr.data.dataset import ReferSegDataset, collate_refer
from ppcr.data.refer import Refer
from ppcr.training.profile import load_profile
from ppcr.training.stages import build_ris_model
from ppcr.model.heads import MLPBoxHead, order_box
from ppcr.model import prompts
from ppcr.model.tokenizer import encode_pass
from ppcr.metrics import box_iou
d = Path(sys.argv[1])
weights = {"sam_checkpoint": str(d / "sam.safetensors"), "llava_path": str(d / "llava"), "tokenizer_path": str(d / "llava")}
torch.manual_seed(0)
m = build_ris_model(load_profile("demo"), "glamm", 0, weights).eval()
root = os.environ.get("DATA", "runs/demo/data")  # a demo run's REFER-layout data
def feats(split, n):
    H, B = [], []
    for name, sb in (("synref", "unc"), ("synref+", "unc"), ("synrefg", "umd")):
        ds = ReferSegDataset(Refer(root, name, sb), split, m.image_prep())
        for s in range(0, min(n, len(ds)), 32):
            b = collate_refer([ds[i] for i in range(s, min(n, len(ds), s + 32))])
            with torch.no_grad():
                f, _, idx = m.encode_batch_images(b)
                ctx, ans = zip(*[prompts.conversation(prompts.fill(prompts.SEMANTIC_TEMPLATES[0], e), prompts.SEMANTIC_ANSWER,
                                 m.config.system_prompt, m.config.image_after_prompt) for e in b["expression"]])
                enc = encode_pass(m.tokenizer, ctx, ans, prompts.SEG_TOKEN, f.shape[1])
                h, _, _ = m.mllm.run_branch("semantic", enc, f, idx, compute_ce=False)
            wh = torch.tensor([[w, h_, w, h_] for h_, w in b["original_size"]], dtype=torch.float32)
            H.append(h.float()); B.append(torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in b["box"]]) / wh)
    return torch.cat(H), torch.cat(B)
htr, btr = feats("train", 800); hva, bva = feats("val", 96)
cos = torch.nn.functional.cosine_similarity(hva[:, None], hva[None], dim=-1)
print("norm", hva.norm(dim=-1).mean().item(), "mean pairwise cos", cos.mean().item(),
      "share of variance off the mean", ((hva - hva.mean(0)).norm(dim=-1) ** 2).mean().item() / (hva.norm(dim=-1) ** 2).mean().item())
mu, sd = htr.mean(0), htr.std(0) + 1e-6
head = MLPBoxHead(htr.shape[1], 256); opt = torch.optim.Adam(head.parameters(), 1e-3, weight_decay=1e-4)
def ev(p, b):
    with torch.no_grad(): pb = order_box(head((p - mu) / sd))
    ious = np.array([box_iou(x.numpy(), y.numpy()) for x, y in zip(pb, b)])
    cx, cy = (pb[:, 0] + pb[:, 2]) / 2, (pb[:, 1] + pb[:, 3]) / 2
    cin = ((cx >= b[:, 0]) & (cx <= b[:, 2]) & (cy >= b[:, 1]) & (cy <= b[:, 3])).float().mean().item()
    return round(100 * ious.mean(), 1), round(100 * (ious >= 0.5).mean(), 1), round(100 * cin, 1)
for it in range(1501):
    i = torch.randint(0, len(htr), (64,))
    loss = (head((htr[i] - mu) / sd) - btr[i]).abs().mean(); opt.zero_grad(); loss.backward(); opt.step()
    if it % 250 == 0: print(it, "val box IoU / acc / centre-in", ev(hva, bva), flush=True)
