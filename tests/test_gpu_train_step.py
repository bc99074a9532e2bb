"""``benchmarks/gpu_train_step.py --experts dmd2``: the DMD2 step runs end to end on a tiny CPU
transformer."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DMD2_LINE = re.compile(r"^dmd2: median step (?P<seconds>\S+) s .*?, (?P<tflops>\S+) TFLOP/s", re.MULTILINE)


def run_dmd2(family: str, *extra: str) -> str:
    cmd = [sys.executable, "benchmarks/gpu_train_step.py", "--family", family, "--tiny", "--experts", "dmd2",
           "--repeats", "1", "--warmup", "0", *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.parametrize("family, extra, teacher_forwards", [
    ("wan", (), 2),  # CFG: the real score is one forward on 2 rows
    ("hunyuan", ("--dmd2-fake-steps", "1"), 1),  # embedded guidance: one row
])
def test_the_dmd2_step_runs_and_reports_its_time_and_flops(family, extra, teacher_forwards):
    out = run_dmd2(family, *extra)
    line = DMD2_LINE.search(out)
    assert line, out
    assert math.isfinite(float(line["seconds"])) and float(line["seconds"]) > 0
    assert float(line["tflops"]) > 0
    assert "at generator step 4 of 4" in out
    assert not re.search(r"^(seme|dete):", out, re.MULTILINE)  # --experts dmd2 measures only DMD2
    assert f"teacher {teacher_forwards} fwd + 0 bwd" in out, out
