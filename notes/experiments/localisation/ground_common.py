"""Shared by vprobe.py (exec'd; the scene generator and the model of ground.py). Does the small LLaVA localise at all? On-the-fly scenes with NOBJ objects of distinct colours;
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
STEPS = steps
