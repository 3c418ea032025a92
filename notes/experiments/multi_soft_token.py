"""Stage 3 of ppcr with P_seg_txt projected to K soft tokens instead of one (measured only; not in the package).

    SOFT_K=4 python notes/experiments/multi_soft_token.py GLAMM_INIT_MODEL PROFILE ppcr SEED OUT

`[P_SEG]` in the spatial templates becomes K `[P_SEG]` slots, and the soft-token projection a Linear(C, K*d) whose
output fills them in order (one vector P_seg_txt still carries everything; the LLM gets K input positions to read it
from). The rest as `stage3_from.py`.
"""

import os
import sys

import torch

import ppcr.model.mllm as mllm
import ppcr.model.modeling_ppcr as modeling
from ppcr.model import prompts

sys.path.insert(0, os.path.dirname(__file__))
from stage3_from import main  # noqa: E402

K = int(os.environ.get("SOFT_K", "4"))
_plain_fill = prompts.fill


def _fill(template: str, expression: str | None = None) -> str:
    return _plain_fill(template.replace("{P}", " ".join(["{P}"] * K)), expression)


class _Projector(torch.nn.Linear):
    def __init__(self, prompt_dim: int, llm_dim: int):
        super().__init__(prompt_dim, K * llm_dim)


def _embeddings(llava, input_ids, image_features, image_token_id, soft_tokens=None, soft_token_id=None):
    embeds = llava.get_input_embeddings()(input_ids)
    image_slots = (input_ids == image_token_id).unsqueeze(-1)
    if image_features is not None:
        embeds = embeds.masked_scatter(image_slots, image_features.to(embeds.dtype))
    elif bool(image_slots.any()):
        raise ValueError("image slots in the input but no image features given")
    if soft_tokens is not None:
        soft_slots = input_ids == soft_token_id
        assert bool((soft_slots.sum(dim=1) == K).all()), "every row needs K soft slots"
        embeds = embeds.masked_scatter(soft_slots.unsqueeze(-1), soft_tokens.contiguous().to(embeds.dtype))
    return embeds


prompts.fill = _fill
modeling.SoftTokenProjector = _Projector
mllm.multimodal_embeddings = _embeddings

if __name__ == "__main__":
    main(*sys.argv[1:])
