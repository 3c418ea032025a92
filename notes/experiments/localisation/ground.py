"""Does the small LLaVA localise at all? On-the-fly scenes with NOBJ objects of distinct colours;
where-only task, probe + CE. Usage: NOBJ=1 python ground.py NAME STEPS [init=scratch|shipped]"""
import json, os, random, sys, time
import numpy as np, torch
from torchvision.ops import generalized_box_iou_loss
from ppcr.training import stages as S
from ppcr.training.profile import load_profile
from ppcr.model.modeling_ppcr import image_prep_for
from ppcr.data import synref_scene as SC
from ppcr.data.synref_language import COLORS, SHAPES
name, steps = sys.argv[1], int(sys.argv[2]); init = sys.argv[3] if len(sys.argv) > 3 else "scratch"
NOBJ = int(os.environ.get("NOBJ", "1")); LR = float(os.environ.get("LR", "3e-4")); BS = 16
PW = float(os.environ.get("PW", "1")); TASK = os.environ.get("TASK", "where")
prof = load_profile("foundation"); config = prof.model_config("glamm", 0)
torch.manual_seed(0)
tok = S.synref_tokenizer()
m = S.MllmPretrainer(config, tok)
if init == "shipped":
    from transformers import LlavaForConditionalGeneration
    src = LlavaForConditionalGeneration.from_pretrained("ppcr/resources/foundation/llava")
    print(m.llava.load_state_dict(src.state_dict(), strict=False))
prep = image_prep_for(config)

def sample(rng):
    n = NOBJ if NOBJ > 0 else int(rng.integers(1, 4))
    cols = rng.choice(len(COLORS), n, replace=False)
    attrs = [{"shape": SHAPES[int(rng.integers(len(SHAPES)))], "color": COLORS[c], "size": "medium", "pattern": "plain"} for c in cols]
    objs = SC.place_objects(rng, attrs, 256)
    img = SC.render_image(rng, objs, 256, False, False)
    t = objs[int(rng.integers(len(objs)))]
    return {"clip_pixel_values": prep.clip(img), "expression": f"the {t.color} {t.shape}",
            "attributes": {"shape": t.shape, "color": t.color, "size": t.size, "pattern": t.pattern},
            "box": torch.tensor(t.box), "original_size": (256, 256)}

def batch(rng, n):
    items = [sample(rng) for _ in range(n)]
    return {"clip_pixel_values": torch.stack([i["clip_pixel_values"] for i in items]),
            **{k: [i[k] for i in items] for k in ("expression", "attributes", "box", "original_size")}}

vrng = np.random.default_rng(123); val = [batch(vrng, 32) for _ in range(2)]
def evaluate():
    m.eval(); ious = []
    with torch.no_grad():
        for b in val:
            h, t = m.answer_hidden(b, ["where"] * 32)
            p = S._ordered(m.probe_boxes(h, t)); g = S.normalised_boxes(b, [True] * 32)
            from torchvision.ops import box_iou
            ious += torch.diag(box_iou(p, g)).tolist()
    m.train(); return 100 * float(np.mean(ious)), 100 * float(np.mean(np.array(ious) >= 0.5))

opt = torch.optim.AdamW(m.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
rng = np.random.default_rng(0); prng = random.Random(0); t0 = time.time()
print(name, "init", init, "NOBJ", NOBJ, "step 0 val", evaluate(), flush=True)
for step in range(1, steps + 1):
    b = batch(rng, BS)
    tasks = ["where"] * BS if TASK == "where" else [prng.choice(("describe", "where")) for _ in range(BS)]
    hidden, targets = m.answer_hidden(b, tasks, prng)
    ce = torch.nn.functional.cross_entropy(m.llava.get_output_embeddings()(hidden).flatten(0, 1), targets.flatten(), ignore_index=-100)
    w = torch.tensor([x == "where" for x in tasks])
    pred = m.probe_boxes(hidden[w], targets[w]); gt = S.normalised_boxes(b, w.tolist())
    l1 = torch.nn.functional.l1_loss(pred, gt)
    loss = ce + PW * 5 * l1
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); sched.step()
    if step % 50 == 0:
        print(step, f"ce {ce.item():.3f} l1 {l1.item():.3f} val {evaluate()} {time.time()-t0:.0f}s", flush=True)
