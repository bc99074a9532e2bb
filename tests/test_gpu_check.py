"""``benchmarks/gpu_check.sh --tiny``: the prepared GPU check runs end to end on tiny CPU transformers
(the plan, a SemE and a DetE step, the teacher against DCM, the plan beside the measured peaks)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_in_its_tiny_cpu_mode(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable,
           "DCM": str(Path(sys.executable).with_name("dcm")), "OMP_NUM_THREADS": "2"}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--tiny"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = done.stdout
    assert re.search(r"^seme: median step \S+ s", out, re.MULTILINE), out
    assert re.search(r"^dete: median step \S+ s", out, re.MULTILINE), out
    assert re.search(r"^speedup: \S+x", out, re.MULTILINE), out
    compared = re.search(r"^SemE: plan \d+\.\d GiB \(tiny models on the CPU: not compared\)", out,
                         re.MULTILINE)
    assert compared, out
    assert (tmp_path / "plan.json").is_file() and (tmp_path / "train_step.txt").is_file()
