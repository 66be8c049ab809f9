"""``python -m mbf_analysis.cli``: the same as ``mbf-analyze``."""

import sys

from mbf_analysis.cli import main

sys.exit(main())
