"""Stage 3 with the soft-token projection started where the LLM can read it (an experiment, not in the package).

Branch B of ppcr sees the target only through one soft token, `seg_to_llm(P_seg_txt)`, whose projection starts
from random weights, so the LLM's grounding (stage 1 taught its image tokens to find the object the question's
words name) has nothing it knows to read at first. This run starts `seg_to_llm` as the ridge regression of the mean
input embedding of the expression's words on P_seg_txt, fitted on N train expressions with the stage-2 weights:
at step 0 the soft token is as close as a linear map gets to "the expression's words, averaged".

    python notes/experiments/soft_token_init.py GLAMM_INIT_MODEL PROFILE VARIANT SEED OUT [N] [RIDGE]

Otherwise as `stage3_from.py` (the stage lands in OUT/stages/seed<k>/<variant>-<fingerprint>; the fingerprint does
not see the initialisation, so give the run its own OUT).
"""

import json
import sys
from pathlib import Path

import torch

import ppcr.training.stages as stages
from ppcr.data.dataset import collate_refer
from ppcr.training.profile import load_profile
from ppcr.training.stages import base_weights, data_root, prepare_data, run_ris_stage, train_dataset

FIT: dict[str, float] = {}


@torch.no_grad()
def fit_soft_token(model, profile, out: Path, n: int, ridge: float) -> None:
    data = train_dataset(profile, data_root(profile, out), model.image_prep())
    was = model.training
    model.eval()
    embed = model.mllm.llava.get_input_embeddings()
    xs, ys = [], []
    step = max(1, len(data) // n)
    rows = [data[i] for i in range(0, len(data), step)][:n]
    for start in range(0, len(rows), 32):
        batch = collate_refer(rows[start:start + 32])
        features, index = model.clip_features(batch)
        p_seg_txt, _, _ = model.semantic_stage(features, index, batch["expression"], None)
        xs.append(p_seg_txt.float())
        for expr in batch["expression"]:
            ids = torch.tensor(model.tokenizer(expr, add_special_tokens=False)["input_ids"], device=model.device)
            ys.append(embed(ids).float().mean(0))
    x = torch.cat(xs)
    y = torch.stack(ys)
    x1 = torch.cat([x, torch.ones(len(x), 1)], 1)
    w = torch.linalg.solve(x1.T @ x1 + ridge * torch.eye(x1.shape[1]), x1.T @ y)  # (C + 1, d)
    pred = x1 @ w
    r2 = 1 - ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    model.seg_to_llm.weight.copy_(w[:-1].T)
    model.seg_to_llm.bias.copy_(w[-1])
    FIT.update({"n": len(x), "r2": float(r2), "target_norm": float(y.norm(dim=1).mean()),
                "soft_norm": float(pred.norm(dim=1).mean())})
    print("soft-token fit:", FIT, flush=True)
    model.train(was)


def main(glamm: str, profile_name: str, variant: str, seed: str, out: str, n: str = "1024",
         ridge: str = "1.0") -> None:
    profile = load_profile(profile_name)
    out_dir = Path(out)
    plain = stages.load_weights_into

    def load_then_fit(model, src, prefixes=None, branches=("semantic", "spatial")):
        plain(model, src, prefixes=prefixes, branches=branches)
        if prefixes == stages.STAGE2_CARRIED and model.config.spec.spatial_source in ("seg", "re_seg"):
            fit_soft_token(model, profile, out_dir, int(n), float(ridge))

    stages.load_weights_into = load_then_fit
    seed_k = int(seed)
    prepare_data(profile, out_dir, True)
    weights = base_weights(profile, out_dir, seed_k, False, True)
    ckpt = run_ris_stage(profile, out_dir, variant, seed_k, "variants", Path(glamm), weights,
                         str(Path(glamm).resolve()), False, True)
    done = json.loads((ckpt.parent / "DONE.json").read_text())
    print(json.dumps({"checkpoint": str(ckpt), "soft_token_fit": FIT, "final_eval": done.get("final_eval")},
                     indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
