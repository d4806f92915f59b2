"""Schemathesis against the live control plane's ``/openapi.json`` (RELIABILITY 27).

Generated requests (positive and negative, coverage, fuzzing and stateful phases, 20 examples per
operation, deterministic) go to a real uvicorn + redis-server with a valid token. Checks: no 5xx,
documented status codes, content types and headers, responses valid against the schema, 405s with
a correct ``Allow``, auth actually enforced where declared. Excluded: ``positive_data_acceptance``
and ``negative_data_rejection`` — cross-field rules (a run needs a teacher or a reward; ports
1..65535) are not expressible in JSON Schema, and pydantic's lax mode coerces ``false`` to 0.
Run: ``.venv/bin/pytest tests/test_control_schemathesis.py -q`` (about 40 s).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.control_stack import TOKEN, ControlStack, stack_fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


stack = stack_fixture()


@pytest.mark.timeout(240)
def test_schemathesis_finds_no_5xx_and_schema_conforming_responses(
    stack: ControlStack, tmp_path: Path
) -> None:
    assert SCHEMATHESIS.exists(), f"{SCHEMATHESIS} missing: install the dev extras (pip install -e '.[dev]')"
    command = [
        str(SCHEMATHESIS), "run", f"{stack.url}/openapi.json",
        "--max-examples", "20",
        "--generation-deterministic",
        "--workers", "1",
        "--request-timeout", "20",
        "--header", f"Authorization: Bearer {TOKEN}",
        "--checks", "all",
        "--exclude-checks", "positive_data_acceptance,negative_data_rejection",
        "--no-color",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=220, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", output)
    assert generated is not None, output[-4000:]
    # It really exercised the API (16 operations), and every case passed every check.
    assert int(generated[1]) >= 200 and generated[1] == generated[2], generated[0]
    assert "Traceback" not in stack.proc.log(), stack.proc.log()[-4000:]
