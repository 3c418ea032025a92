"""Stage 3 of ppcr with the expression beside the soft token early on, faded out (a curriculum; not kept unless
notes/learning.md says so).

    CURRIC_STEPS=270 python notes/experiments/expr_curriculum.py GLAMM_INIT_MODEL PROFILE ppcr SEED OUT

For each training batch of ppcr's spatial pass, with probability max(0, 1 - k / CURRIC_STEPS) (k: the batch's
index) branch B reads the spatial_re_seg template ("Take the region marked by [P_SEG] for <expression>, ...")
instead of ppcr's, so LoRA B, the soft-token projection and F_Map first learn with the expression there and then
must do without it. Evaluation and the diagnostics read ppcr's templates only. The rest as `stage3_from.py`.
"""

import os
import random
import sys

from ppcr.model import prompts
from ppcr.model.modeling_ppcr import PPCRModel

sys.path.insert(0, os.path.dirname(__file__))
from stage3_from import main  # noqa: E402

STEPS = int(os.environ.get("CURRIC_STEPS", "270"))
_plain_templates = prompts.spatial_templates
_plain_stage = PPCRModel.spatial_stage
_state = {"batches": 0, "with_expression": 0}
_draw = random.Random(int(os.environ.get("CURRIC_SEED", "0")))


def _with_expression(source: str) -> tuple[str, ...]:
    return prompts.SPATIAL_RE_SEG_TEMPLATES if source == "seg" else _plain_templates(source)


def _curriculum_stage(self, *args, **kwargs):
    if not (self.training and self.config.spec.spatial_source == "seg"):
        return _plain_stage(self, *args, **kwargs)
    _state["batches"] += 1
    if _draw.random() >= max(0.0, 1.0 - _state["batches"] / STEPS):
        return _plain_stage(self, *args, **kwargs)
    _state["with_expression"] += 1
    prompts.spatial_templates = _with_expression
    try:
        return _plain_stage(self, *args, **kwargs)
    finally:
        prompts.spatial_templates = _plain_templates


PPCRModel.spatial_stage = _curriculum_stage

if __name__ == "__main__":
    main(*sys.argv[1:])
    print(f"curriculum: {_state['with_expression']} of {_state['batches']} training batches read the expression")
