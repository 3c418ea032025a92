"""The length of the [P_SEG] soft token against the LLM's word embeddings and image features (one checkpoint)."""
import os
import sys, torch
from ppcr.data.dataset import ReferSegDataset, collate_refer
from ppcr.data.refer import Refer
from ppcr.model.modeling_ppcr import PPCRModel
ck = sys.argv[1]
m = PPCRModel.from_pretrained(ck, variant="ppcr").eval()
root = os.environ.get("DATA", "runs/demo/data")  # a demo run's REFER-layout data
ds = ReferSegDataset(Refer(root, "synref", "unc"), "val", m.image_prep())
b = collate_refer([ds[i] for i in range(32)])
with torch.no_grad():
    f, s, idx = m.encode_batch_images(b)
    p, _, _ = m.semantic_stage(f, idx, b["expression"], None)
    soft = m.seg_to_llm(p)
    emb = m.mllm.peft.get_input_embeddings().weight
print("p_seg_txt norm", p.norm(dim=-1).mean().item(), "soft norm", soft.norm(dim=-1).mean().item())
print("soft pairwise cos mean", torch.nn.functional.cosine_similarity(soft[:,None], soft[None], dim=-1).mean().item())
print("image feat norm", f.norm(dim=-1).mean().item())
if emb is not None:
    print("emb row norm", emb.norm(dim=-1).mean().item(), emb.shape)
