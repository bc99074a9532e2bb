"""benchmarks/grad_norms.py: medians of each term's gradient norm over the first and last thirds of a run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_grad_norm_table_from_a_history(tmp_path):
    run = tmp_path / "dete"
    run.mkdir()
    rows = []
    for step in range(9):  # logged every step; thirds = steps 0-2 and 6-8
        rows.append({"step": step, "grad_norm/consistency": 1.0 + step,
                     "grad_norm/gan/gan_g": 0.1 * (1 + step),
                     "grad_norm": 2.0 + step, "gan/d_real": 0.5, "gan/d_fake": 0.25, "loss": 1.0})
        rows.append({"step": step, "loss": 1.0})  # an unlogged record is ignored
    (run / "history.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "grad_norms.py"), str(run),
                          "--labels", "toy"],
                         capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("| toy"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # consistency first/last medians 2 and 8; gan_g 0.2 and 0.8; share 0.1; total last 9; margin +0.25
    assert cells[1:8] == ["9 (9)", "2", "8", "0.2", "0.8", "gan/gan_g 0.1", "9"]
    assert cells[8] == "+0.25"


def test_grad_norms_refuses_a_history_without_per_term_norms(tmp_path):
    (tmp_path / "history.jsonl").write_text(json.dumps({"step": 0, "loss": 1.0}) + "\n")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "grad_norms.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "no grad_norm/<term>" in res.stderr
