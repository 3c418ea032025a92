"""The demo's foundation diagnostics (`foundation_eval`: SAM with the GT box and one point, the LLaVA's answers) for a
candidate foundation folder in place of the package's, without training anything.

    python notes/experiments/foundation_candidate_eval.py FOUNDATION_DIR OUT

FOUNDATION_DIR has the layout of `ppcr/resources/foundation` (e.g. a `python -m ppcr.foundation train --dest` folder);
OUT is a scratch run folder (the demo's data and the stage folder land there).
"""

import json
import sys
from pathlib import Path

import ppcr.foundation as foundation

foundation.foundation_dir = lambda: Path(sys.argv[1])
from ppcr.training.profile import load_profile  # noqa: E402  (after the swap)
from ppcr.training.stages import base_weights, evaluate_foundation, prepare_data  # noqa: E402

profile = load_profile("demo")
out = Path(sys.argv[2])
prepare_data(profile, out, False)
weights = base_weights(profile, out, 0, False, False)
print(json.dumps(evaluate_foundation(profile, out, 0, weights)["final_eval"], indent=0))
