"""Run the `ppcr` CLI with another folder in place of the package's shipped foundation (a swap experiment).

    python notes/experiments/swap_foundation.py FOUNDATION_DIR train --profile P --variant ppcr --seed 0 --out OUT

FOUNDATION_DIR has the layout of `ppcr/resources/foundation` (sam.safetensors, llava/, manifest.json). To mix the
halves of two foundations, copy one folder, replace one file from the other and write that file's sha256 into the
copy's manifest (`files`); `verify_foundation` checks every hash and the config signature as usual.
"""

import sys
from pathlib import Path

import ppcr.foundation as foundation

foundation.foundation_dir = lambda: Path(sys.argv[1])
from ppcr.cli import main  # noqa: E402  (after the swap, so every import sees it)

sys.exit(main(sys.argv[2:]))
