"""Stage-1 recipe test: dense per-patch attribute pretraining of the CLIP tower (VSTEPS), then the LLM where-probe
on multi-object scenes (STEPS).

    BOXW=5 NOBJ=4 VSTEPS=300 OMP_NUM_THREADS=1 python notes/experiments/localisation/dense.py densebox 300
    BOXW=5 NOBJ=0 VSTEPS=300 PW=25 PROBE_ALL=1 OMP_NUM_THREADS=1 python notes/experiments/localisation/dense.py d 600
    FREEZE_V=1 BOXW=5 NOBJ=0 VSTEPS=900 PW=25 PROBE_ALL=1 OMP_NUM_THREADS=1 python ... dense.py freeze900 500

NOBJ=0: 1-4 objects per scene; PW, PROBE_ALL: the probe's weight and positions (as retrieval/retrieve.py);
FREEZE_V=1: the dense-pretrained tower stays frozen in the LLM phase; TOWER=<vision_tower.safetensors>: start from
stage 1a's tower; IMGPOS=after: the question before the image (image_after_prompt); AUX=w: the image-token grounding
loss with weight w (MllmPretrainer's image_grounding).
"""
import os, random, sys, time
import numpy as np, torch
from torchvision.ops import box_iou
from ppcr.training import stages as S
from ppcr.training.profile import load_profile
from ppcr.model.modeling_ppcr import image_prep_for
from ppcr.data import synref_scene as SC
from ppcr.data.synref_language import COLORS, SHAPES
name, steps = sys.argv[1], int(sys.argv[2])
NOBJ = int(os.environ.get("NOBJ", "4")); VSTEPS = int(os.environ.get("VSTEPS", "0")); LR = float(os.environ.get("LR", "3e-4")); BOXW = float(os.environ.get("BOXW", "0"))
PW = float(os.environ.get("PW", "5")); PROBE_ALL = os.environ.get("PROBE_ALL", "0") == "1"  # as retrieval/retrieve.py
FREEZE_V = os.environ.get("FREEZE_V", "0") == "1"  # keep the (dense-pretrained) vision tower frozen in the LLM phase
prof = load_profile("foundation"); config = prof.model_config("glamm", 0)
if os.environ.get("VIMG"):  # VIMG=256 VPATCH=32: the CLIP view at full resolution, the same 8 x 8 tokens
    import dataclasses
    config = config.replace(vision=dataclasses.replace(config.vision, image_size=int(os.environ["VIMG"]), patch_size=int(os.environ["VPATCH"])))
AUX = float(os.environ.get("AUX", "0"))
if os.environ.get("IMGPOS") == "after":
    config = config.replace(image_after_prompt=True)
from ppcr.data.transforms import target_patches
torch.manual_seed(0); tok = S.synref_tokenizer(); m = S.MllmPretrainer(config, tok, image_grounding=AUX); prep = image_prep_for(config)
G = config.vision.image_size // config.vision.patch_size  # 8

def sample(rng):
    cols = rng.choice(len(COLORS), NOBJ if NOBJ > 0 else int(rng.integers(1, 5)), replace=False)  # NOBJ=0: 1-4
    attrs = [{"shape": SHAPES[int(rng.integers(len(SHAPES)))], "color": COLORS[c], "size": ["small", "medium", "large"][int(rng.integers(3))], "pattern": "plain"} for c in cols]
    objs = SC.place_objects(rng, attrs, 256); img = SC.render_image(rng, objs, 256, False, False)
    t = objs[int(rng.integers(len(objs)))]
    # per-patch labels: the object covering most of the patch (>= 20 %), else background (index 0)
    cl = np.zeros((G, G), np.int64); sh = np.zeros((G, G), np.int64); cover = np.zeros((G, G)); bx = np.zeros((G, G, 4), np.float32)
    for o in objs:
        frac = o.visible.reshape(G, 256 // G, G, 256 // G).mean(axis=(1, 3))
        better = (frac > cover) & (frac >= 0.2)
        cl[better] = COLORS.index(o.color) + 1; sh[better] = SHAPES.index(o.shape) + 1; cover = np.maximum(cover, frac * better)
        bx[better] = np.array(o.box, np.float32) / 256
    return {"clip_pixel_values": prep.clip(img), "expression": f"the {t.color} {t.shape}",
            "attributes": {"shape": t.shape, "color": t.color, "size": t.size, "pattern": t.pattern},
            "box": torch.tensor(t.box), "original_size": (256, 256), "cl": torch.from_numpy(cl).flatten(), "sh": torch.from_numpy(sh).flatten(), "bx": torch.from_numpy(bx).reshape(-1, 4),
            "target_patches": target_patches(t.visible, G)}

def batch(rng, n):
    items = [sample(rng) for _ in range(n)]
    b = {k: [i[k] for i in items] for k in ("expression", "attributes", "box", "original_size", "target_patches")}
    for k in ("clip_pixel_values", "cl", "sh", "bx"): b[k] = torch.stack([i[k] for i in items])
    return b

vrng = np.random.default_rng(123); val = [batch(vrng, 32) for _ in range(2)]
t0 = time.time()
if VSTEPS:
    vt = m.llava.model.vision_tower; hv = config.vision.hidden_size
    heads = torch.nn.ModuleDict({"cl": torch.nn.Linear(hv, len(COLORS) + 1), "sh": torch.nn.Linear(hv, len(SHAPES) + 1), "bx": torch.nn.Linear(hv, 4)})
    opt = torch.optim.AdamW(list(vt.parameters()) + list(heads.parameters()), lr=1e-3, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.0, 1 - s / VSTEPS))
    rng = np.random.default_rng(7)
    def dense(b):
        h = vt(b["clip_pixel_values"], output_hidden_states=True).hidden_states[config.vision_feature_layer][:, 1:]
        return {k: heads[k](h) for k in heads}
    for step in range(1, VSTEPS + 1):
        b = batch(rng, 16); out = dense(b)
        loss = sum(torch.nn.functional.cross_entropy(out[k].flatten(0, 1), b[k].flatten()) for k in ("cl", "sh"))
        fg = b["cl"] > 0
        if BOXW: loss = loss + BOXW * torch.nn.functional.l1_loss(out["bx"].sigmoid()[fg], b["bx"][fg])
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        if step % 50 == 0:
            with torch.no_grad():
                o = dense(val[0]); fg = val[0]["cl"] > 0
                acc = {k: round(float((o[k].argmax(-1) == val[0][k])[fg].float().mean()), 3) for k in ("cl", "sh")}
                acc["bx_l1"] = round(float((o["bx"].sigmoid()[fg] - val[0]["bx"][fg]).abs().mean()), 3)
            print("V", step, f"loss {loss.item():.3f} fg-acc {acc} {time.time()-t0:.0f}s", flush=True)

def evaluate():
    m.eval(); ious = []
    with torch.no_grad():
        for b in val:
            h, t = m.answer_hidden(b, ["where"] * 32)
            ious += torch.diag(box_iou(S._ordered(m.probe_boxes(h, t)), S.normalised_boxes(b, [True] * 32))).tolist()
    m.train(); return round(100 * float(np.mean(ious)), 2), round(100 * float(np.mean(np.array(ious) >= 0.5)), 2)

if os.environ.get("TOWER"):  # TOWER=<stage 1a's vision_tower.safetensors>: the pipeline's dense-pretrained tower
    from safetensors.torch import load_file
    m.llava.model.vision_tower.load_state_dict(load_file(os.environ["TOWER"]), strict=True)
if FREEZE_V:
    m.llava.model.vision_tower.requires_grad_(False)
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR, betas=(0.9, 0.95))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
rng = np.random.default_rng(0); prng = random.Random(0)
print(name, "NOBJ", NOBJ, "VSTEPS", VSTEPS, "BOXW", BOXW, "PW", PW, "PROBE_ALL", PROBE_ALL,
      "FREEZE_V", FREEZE_V, "val", evaluate(), flush=True)
for step in range(1, steps + 1):
    b = batch(rng, 16); tasks = ["where"] * 16
    seq, enc = m.sequence_hidden(b, tasks, prng); hidden, targets = m.answer_positions(seq, enc)
    aux, hit = m.image_grounding_loss(seq, enc, b) if AUX else (torch.zeros(()), torch.zeros(()))
    ce = torch.nn.functional.cross_entropy(m.llava.get_output_embeddings()(hidden).flatten(0, 1), targets.flatten(), ignore_index=-100)
    gt = S.normalised_boxes(b, [True] * 16)
    if PROBE_ALL:
        l1 = (m.box_probe(hidden) - gt[:, None]).abs().mean(-1)[targets != -100].mean()
    else:
        l1 = torch.nn.functional.l1_loss(m.probe_boxes(hidden, targets), gt)
    loss = ce + PW * l1 + AUX * aux
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); sched.step()
    if step % 50 == 0: print(step, f"ce {ce.item():.3f} l1 {l1.item():.3f} aux {aux.item():.3f} hit {hit.item():.2f} val {evaluate()} {time.time()-t0:.0f}s", flush=True)
