"""benchmarks/compare_runs.py: each figure of a second run against the first run's 95% interval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _record(total, lo, hi, diff, fd=100.0, diversity=1.0):
    return {"total": total, "total_ci95": [lo, hi],
            "diff_vs_teacher": {"total": {"mean": diff, "ci95": [diff - 0.01, diff + 0.01]}},
            "fd": fd, "fd_ci95": [fd - 10, fd + 10], "diversity": diversity,
            "diversity_ci95": [diversity - 0.1, diversity + 0.1]}


def test_figures_inside_and_outside_the_first_runs_intervals(tmp_path):
    for run, records in {"a": {"teacher": _record(0.90, 0.89, 0.91, 0.0),
                               "dcm": _record(0.88, 0.87, 0.89, -0.02)},
                         "b": {"teacher": _record(0.905, 0.89, 0.92, 0.0),
                               "dcm": _record(0.86, 0.85, 0.87, -0.045),
                               "lcm": _record(0.5, 0.4, 0.6, -0.4)}}.items():
        (tmp_path / run / "metrics").mkdir(parents=True)
        for method, record in records.items():
            (tmp_path / run / "metrics" / f"{method}.json").write_text(json.dumps(record))
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare_runs.py"), str(tmp_path / "a"),
                          str(tmp_path / "b")], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert "lcm" not in out  # only the methods both runs have
    total = lines.index(next(line for line in lines if line.startswith("Total ×100")))
    rows = {line.split("|")[0].strip(): line for line in lines[total + 1:total + 3]}
    assert rows["dcm"].endswith("| NO") and "86.00 [85.00, 87.00]" in rows["dcm"]
    assert rows["teacher"].endswith("| yes")
    # dcm's total and paired difference fall outside; everything else inside: 6 of 8
    assert lines[-1] == "6 of 8 figures of the second run lie inside the first run's 95% intervals"
