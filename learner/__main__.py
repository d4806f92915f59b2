"""Entry point: ``python -m learner --run-id ID`` (see learner/cli.py)."""

import sys

from learner.cli import main

sys.exit(main())
