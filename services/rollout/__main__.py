"""Entry point: ``python -m services.rollout --run-id ID`` (see services/rollout/cli.py)."""

import sys

from services.rollout.cli import main

sys.exit(main())
