"""Stage 3 from a stage-2 checkpoint with only one part of the distillation term (`train_spatial_distill`): the
image tokens or the query position (an experiment-only patch of `ppcr.model.modeling_ppcr.spatial_distillation`).

    python notes/experiments/distill_parts.py {image,query} GLAMM_INIT_MODEL PROFILE VARIANT SEED OUT

The other arguments are those of `stage3_from.py`; PROFILE must set `model: {train_spatial_distill: W}`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import ppcr.model.modeling_ppcr as modeling  # noqa: E402
from ppcr.losses import relative_mse  # noqa: E402

PARTS = {
    "image": lambda query, image, t_query, t_image: relative_mse(image, t_image),
    "query": lambda query, image, t_query, t_image: relative_mse(query, t_query),
}

if __name__ == "__main__":
    part, *rest = sys.argv[1:]
    modeling.spatial_distillation = PARTS[part]
    import stage3_from  # noqa: E402

    stage3_from.main(*rest)
