"""Can the small LLaVA's *LLM* learn the retrieval that grounding needs, when the image tokens already say what
and where each patch is? Oracle patch features (per 16-px patch of an 8x8 grid: colour and shape one-hot of the
object covering it, that object's normalised box, and the patch centre) go through a trained linear projector into
the `<image>` slots of the stage-1 "where" conversation; the rest is MllmPretrainer as the foundation trains it
(answer CE + probe L1 at the first box-bin position). No vision tower: this isolates the LLM.

    NOBJ=4 LR=3e-4 OMP_NUM_THREADS=1 python notes/experiments/retrieval/retrieve.py NAME STEPS

Env: NOBJ objects per scene (0: 1-4 at random; distinct colours; "the <colour> <shape>"), LR, BS (16), FEAT=oracle|nobox (no box
channels: the LLM must read the position from the patch centres), PW probe weight (5), EMB_STD (0: LLaMA's init, std 0.02), PROBE_ALL=1 (probe
at every answer position).
"""
import os, random, sys, time
import numpy as np, torch
from torchvision.ops import box_iou
from ppcr.training import stages as S
from ppcr.training.profile import load_profile
from ppcr.data import synref_scene as SC
from ppcr.data.synref_language import COLORS, SHAPES

name, steps = sys.argv[1], int(sys.argv[2])
NOBJ = int(os.environ.get("NOBJ", "4")); LR = float(os.environ.get("LR", "3e-4")); BS = int(os.environ.get("BS", "16"))
FEAT = os.environ.get("FEAT", "oracle"); PW = float(os.environ.get("PW", "5")); WD = float(os.environ.get("WD", "0"))
PROBE_ALL = os.environ.get("PROBE_ALL", "0") == "1"
prof = load_profile("foundation"); config = prof.model_config("glamm", 0)
torch.manual_seed(0); tok = S.synref_tokenizer(); m = S.MllmPretrainer(config, tok)
EMB_STD = float(os.environ.get("EMB_STD", "0"))  # >0: re-initialise the LLM's token embeddings with this std
if EMB_STD:
    torch.nn.init.normal_(m.llava.get_input_embeddings().weight, std=EMB_STD)
G = config.vision.image_size // config.vision.patch_size  # 8 x 8 patches
NF = len(COLORS) + 1 + len(SHAPES) + 1 + 4 + 2
proj = torch.nn.Linear(NF, config.text.hidden_size)
S.llava_image_features = lambda llava, feats, layer: proj(feats)  # answer_hidden's image features: the oracle's
IMGPOS = os.environ.get("IMGPOS", "first")  # "after": the question before the image tokens (they can attend to it)
if IMGPOS == "after":
    from ppcr.model import prompts as P
    S.prompts.conversation = lambda q, a, sp: (f"{sp} USER: {q}\n{P.IMAGE_TOKEN} ASSISTANT:" if sp else f"USER: {q}\n{P.IMAGE_TOKEN} ASSISTANT:", f" {a}")

centres = torch.stack(torch.meshgrid((torch.arange(G) + 0.5) / G, (torch.arange(G) + 0.5) / G, indexing="xy"), -1).reshape(-1, 2)

def sample(rng):
    n = NOBJ if NOBJ > 0 else int(rng.integers(1, 5))  # NOBJ=0: 1-4 objects per scene
    cols = rng.choice(len(COLORS), n, replace=False)
    attrs = [{"shape": SHAPES[int(rng.integers(len(SHAPES)))], "color": COLORS[c],
              "size": ["small", "medium", "large"][int(rng.integers(3))], "pattern": "plain"} for c in cols]
    objs = SC.place_objects(rng, attrs, 256)
    t = objs[int(rng.integers(len(objs)))]
    f = torch.zeros(G * G, NF); cover = np.zeros((G, G))
    f[:, 0] = 1; f[:, len(COLORS) + 1] = 1  # background colour / shape
    for o in objs:
        frac = o.visible.reshape(G, 256 // G, G, 256 // G).mean(axis=(1, 3))
        better = torch.from_numpy(((frac > cover) & (frac >= 0.2)).reshape(-1))
        cover = np.maximum(cover, frac * better.reshape(G, G).numpy())
        row = torch.zeros(NF); row[COLORS.index(o.color) + 1] = 1; row[len(COLORS) + 1 + SHAPES.index(o.shape) + 1] = 1
        if FEAT == "oracle":
            row[-6:-2] = torch.tensor(o.box, dtype=torch.float32) / 256
        f[better] = row
    f[:, -2:] = centres
    tgt_patches = torch.from_numpy((t.visible.reshape(G, 256 // G, G, 256 // G).mean(axis=(1, 3)) >= 0.2).reshape(-1)).float()
    return {"clip_pixel_values": f, "target_patches": tgt_patches, "expression": f"the {t.color} {t.shape}",
            "attributes": {"shape": t.shape, "color": t.color, "size": t.size, "pattern": t.pattern},
            "box": torch.tensor(t.box), "original_size": (256, 256)}

def batch(rng, n):
    items = [sample(rng) for _ in range(n)]
    return {"clip_pixel_values": torch.stack([i["clip_pixel_values"] for i in items]),
            "target_patches": torch.stack([i["target_patches"] for i in items]),
            **{k: [i[k] for i in items] for k in ("expression", "attributes", "box", "original_size")}}

# AUX>0: a softmax over the image tokens' last hidden states picks the target's patches (CE, weight AUX)
AUX = float(os.environ.get("AUX", "0")); cap = {}
aux_head = torch.nn.Linear(config.text.hidden_size, 1)
_enc = S.encode_pass
def _enc_capture(*a, **k):
    e = _enc(*a, **k); cap["ids"] = e.input_ids; return e
S.encode_pass = _enc_capture
m.llava.model.language_model.register_forward_hook(lambda mod, inp, out: cap.__setitem__("h", out.last_hidden_state))
IMAGE_ID = tok.convert_tokens_to_ids("<image>")

def image_token_logits():
    ids, h = cap["ids"], cap["h"]
    pos = (ids == IMAGE_ID).nonzero()[:, 1].reshape(ids.shape[0], -1)  # (B, N_img)
    return aux_head(h[torch.arange(ids.shape[0])[:, None], pos]).squeeze(-1)  # (B, N_img)

vrng = np.random.default_rng(123); val = [batch(vrng, 32) for _ in range(2)]

def evaluate():
    m.eval(); ious = []
    with torch.no_grad():
        for b in val:
            h, t = m.answer_hidden(b, ["where"] * 32)
            ious += torch.diag(box_iou(S._ordered(m.probe_boxes(h, t)), S.normalised_boxes(b, [True] * 32))).tolist()
    m.train(); return round(100 * float(np.mean(ious)), 1), round(100 * float(np.mean(np.array(ious) >= 0.5)), 1)

params = [p for n, p in m.named_parameters() if "vision_tower" not in n and "multi_modal_projector" not in n]
opt = torch.optim.AdamW(params + list(proj.parameters()) + list(aux_head.parameters()), lr=LR, betas=(0.9, 0.95), weight_decay=WD)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
rng = np.random.default_rng(0); prng = random.Random(0); t0 = time.time()
print(name, dict(NOBJ=NOBJ, LR=LR, BS=BS, FEAT=FEAT, PW=PW, EMB_STD=EMB_STD, PROBE_ALL=PROBE_ALL, IMGPOS=IMGPOS, AUX=AUX), "val", evaluate(), flush=True)
for step in range(1, steps + 1):
    b = batch(rng, BS)
    hidden, targets = m.answer_hidden(b, ["where"] * BS, prng)
    ce = torch.nn.functional.cross_entropy(m.llava.get_output_embeddings()(hidden).flatten(0, 1), targets.flatten(), ignore_index=-100)
    gt = S.normalised_boxes(b, [True] * BS)
    if PROBE_ALL:  # the probe regresses the box from every answer position, not only the first bin's
        valid = targets != -100
        l1 = (m.box_probe(hidden.float()) - gt[:, None]).abs().mean(-1)[valid].mean()
    else:
        l1 = torch.nn.functional.l1_loss(m.probe_boxes(hidden, targets), gt)
    loss = ce + PW * l1
    if AUX:  # softmax over the image tokens; the target's patches share the probability mass
        logp = torch.log_softmax(image_token_logits(), -1); tp = b["target_patches"]
        aux = -((logp * tp).sum(-1) / tp.sum(-1).clamp(min=1)).mean()
        hit = (tp.gather(1, logp.argmax(-1, keepdim=True)) > 0).float().mean()
    else:
        aux = hit = torch.zeros(())
    loss = loss + AUX * aux
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step()
    if step % 50 == 0:
        print(step, f"ce {ce.item():.3f} l1 {l1.item():.3f} aux {aux.item():.3f} hit {hit.item():.2f} val(iou,acc50) {evaluate()} {time.time()-t0:.0f}s", flush=True)
