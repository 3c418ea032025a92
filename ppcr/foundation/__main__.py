"""`python -m ppcr.foundation train | verify` (see `ppcr.foundation.recipe`)."""

import sys

from ppcr.foundation.recipe import main

sys.exit(main())
