"""Stage 3 of one variant from an existing stage-2 checkpoint (`glamm_init`), with a profile's stage-3 recipe: one
change at a time against the same starting point, without re-running stage 2.

    python notes/experiments/stage3_from.py GLAMM_INIT_MODEL PROFILE VARIANT SEED OUT [LR_BY_PREFIX_JSON]

GLAMM_INIT_MODEL is a finished `stages/seed<k>/glamm_init-*/model` folder; PROFILE a profile name or yaml path whose
`model` and `stages.variants` carry the change. The stage lands in OUT/stages/seed<k>/<variant>-<fingerprint> with
its `eval.csv` and `DONE.json`, as in a study. LR_BY_PREFIX_JSON (e.g. '{"box_head.": 3e-3}') gives parameters
whose names start with a prefix their own peak learning rate, beside the profile's `sam_lr` (an experiment-only
option: the fingerprint does not see it, so give such a run its own OUT).
"""

import json
import sys
from pathlib import Path

import ppcr.training.stages as stages
from ppcr.training.profile import load_profile
from ppcr.training.stages import base_weights, prepare_data, run_ris_stage


def main(glamm: str, profile_name: str, variant: str, seed: str, out: str, lr_by_prefix: str = "{}") -> None:
    extra = json.loads(lr_by_prefix)
    if extra:
        plain = stages.loop_config

        def with_extra(*args, **kwargs):
            cfg = plain(*args, **kwargs)
            cfg.lr_by_prefix = {**cfg.lr_by_prefix, **extra}
            return cfg

        stages.loop_config = with_extra
    profile = load_profile(profile_name)
    out_dir, seed_k = Path(out), int(seed)
    prepare_data(profile, out_dir, True)
    weights = base_weights(profile, out_dir, seed_k, False, True)
    ckpt = run_ris_stage(profile, out_dir, variant, seed_k, "variants", Path(glamm), weights,
                         str(Path(glamm).resolve()), False, True)
    done = json.loads((ckpt.parent / "DONE.json").read_text())
    print(json.dumps({"checkpoint": str(ckpt), "final_eval": done.get("final_eval")}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
