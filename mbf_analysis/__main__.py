"""`python -m mbf_analysis` runs `mbf-analyze` (so `torchrun ... -m mbf_analysis CMD` works)."""

import sys

from mbf_analysis.cli import main

sys.exit(main())
