"""Stage 3 of ppcr with P_seg_txt in K soft-token slots instead of one (how `PPCRConfig.soft_prompt_tokens` was
measured before the demo turned it on; notes/learning.md, "P_seg_txt in four soft-token slots").

    SOFT_K=4 python notes/experiments/multi_soft_token.py GLAMM_INIT_MODEL PROFILE ppcr SEED OUT

The measurement first patched the model (a Linear(C, K*d) projection, K `[P_SEG]` slots); the package now has the
setting, so this writes PROFILE with `model.soft_prompt_tokens: K` next to OUT and runs `stage3_from.py` on it (the
same initialisation and training as the patched run: the book's ppcr equalled it to the last digit).
"""

import os
import sys
from pathlib import Path

import yaml

sys.path.insert(0, os.path.dirname(__file__))
from stage3_from import main  # noqa: E402

from ppcr.training.profile import load_profile  # noqa: E402


def with_slots(profile: str, out: str, k: int) -> str:
    data = yaml.safe_load(Path(load_profile(profile).source).read_text())
    data.setdefault("model", {})["soft_prompt_tokens"] = k
    target = Path(out) / f"profile_soft{k}.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(target)


if __name__ == "__main__":
    glamm, profile, variant, seed, out, *rest = sys.argv[1:]
    main(glamm, with_slots(profile, out, int(os.environ.get("SOFT_K", "4"))), variant, seed, out, *rest)
