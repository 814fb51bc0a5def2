"""`python -m hf_zero.cli ...` runs the `hf-zero` command (how `hf-zero train` starts its workers)."""

import sys

from .main import main

sys.exit(main())
