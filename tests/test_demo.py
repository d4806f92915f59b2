"""`distill demo` end to end with small budgets: teacher training (then cached), the student's
held-out accuracy before and after a hybrid run through the real local stack, and both plots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import ROOT, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]
DISTILL = str(Path(sys.executable).parent / "distill")


def _demo(work: Path) -> str:
    cmd = [DISTILL, "demo", "--work-dir", str(work), "--steps", "10", "--port", str(free_port()),
           "--teacher-steps", "8", "--student-warmup-steps", "3", "--eval-count", "20"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_demo_trains_once_then_reports_before_and_after(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    first = _demo(work)
    assert "training the teacher" in first and "training the student" in first
    for row in ("teacher", "student before", "student after"):
        line = next(x for x in first.splitlines() if x.startswith(row + " ") and x.endswith("%"))
        cells = [float(c.rstrip("%")) for c in line[23:].split()]
        assert len(cells) == 4 and all(0.0 <= c <= 100.0 for c in cells), line
    assert (work / "demo.png").stat().st_size > 0 and (work / "accuracy.png").stat().st_size > 0
    assert "dense KL to the teacher" in first
    # cached models: the second run trains nothing and measures the same teacher
    second = _demo(work)
    assert "training the teacher" not in second and "training the student" not in second
    assert "using the cached teacher" in second
    def teacher_row(out: str) -> list[str]:
        return [x for x in out.splitlines() if x.startswith("teacher ") and x.endswith("%")]

    assert teacher_row(first) and teacher_row(first) == teacher_row(second)
