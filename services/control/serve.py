"""Command line of the control-plane server: ``python -m services.control [--dev] [--port P] ...``.

Flags override the ``DISTILL_*`` environment (see ``settings.py``). Without a strong
``DISTILL_API_TOKEN`` the server refuses to start unless ``--dev`` is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import uvicorn

from services.control.app import create_app
from services.control.settings import ControlSettings, InsecureSettings


def parse_args(argv: list[str] | None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m services.control", description=__doc__)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--redis-url", help="default: an embedded redis-server in --data-dir")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--reward-address", help="reward service host:port (checks builtin verifiers)")
    parser.add_argument("--dev", action="store_true", default=None, help="allow the default dev token")
    parser.add_argument("--log-level", default="info")
    args = vars(parser.parse_args(argv))
    return {k: v for k, v in args.items() if v is not None}


def main(argv: list[str] | None = None) -> None:
    overrides = parse_args(argv)
    log_level = overrides.pop("log_level")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ControlSettings(**overrides)
    try:
        app = create_app(settings)
    except InsecureSettings as exc:
        sys.exit(f"refusing to start: {exc}")
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=log_level, timeout_graceful_shutdown=10
    )
