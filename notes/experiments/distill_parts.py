"""Stage 3 from a stage-2 checkpoint with a variant of the distillation term (`train_spatial_distill`): only one of
its parts, the image tokens or the query position (a patch of `ppcr.model.modeling_ppcr.spatial_distillation`), or
the teacher with branch B's current LoRA instead of none (`lora_teacher`, a patch of `MultimodalLLM.run_base`).
Experiment-only patches.

    python notes/experiments/distill_parts.py {image,query,lora_teacher} GLAMM_INIT_MODEL PROFILE VARIANT SEED OUT

The other arguments are those of `stage3_from.py`; PROFILE must set `model: {train_spatial_distill: W}`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import ppcr.model.modeling_ppcr as modeling  # noqa: E402
from ppcr.losses import relative_mse  # noqa: E402
from ppcr.model.mllm import MultimodalLLM, image_token_states, query_states  # noqa: E402

PARTS = {
    "image": lambda query, image, t_query, t_image: relative_mse(image, t_image),
    "query": lambda query, image, t_query, t_image: relative_mse(query, t_query),
}



@torch.no_grad()
def run_with_branch_b(self, encoded, image_features, image_index):
    """`run_base` with branch B's LoRA as it is now (no gradient) instead of no LoRA."""
    self.use_branch("spatial")
    hidden = self._full_pass(encoded, image_features, image_index)
    return query_states(hidden, encoded), image_token_states(hidden, encoded.input_ids, self.image_token_id)


if __name__ == "__main__":
    part, *rest = sys.argv[1:]
    if part == "lora_teacher":
        MultimodalLLM.run_base = run_with_branch_b
    else:
        modeling.spatial_distillation = PARTS[part]
    import stage3_from  # noqa: E402

    stage3_from.main(*rest)
