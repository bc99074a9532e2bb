"""benchmarks/teacher_seeds.py: the claims decided in two projects (two teacher seeds), side by side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from dcm import config

REPO = Path(__file__).resolve().parents[1]


def _project(folder: Path, means: dict[str, float]) -> None:
    """A project folder: the smoke params and, per row, 64 (prompt, seed) rows around its mean Total."""
    (folder / "metrics").mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(config.load_raw(REPO / "params.yaml", "smoke")))
    noise = np.random.default_rng(0).normal(0, 0.004, 64)
    for row, mean in means.items():
        totals = mean + noise  # every row the same row-level noise: tight paired intervals
        per_row = [{"prompt": f"p{i}", "seed": 1000 + i, "total": float(t)} for i, t in enumerate(totals)]
        steps = 50 if row == "teacher" else 4
        record = {"total": float(totals.mean()), "total_ci95": [mean - 0.01, mean + 0.01], "steps": steps,
                  "per_row": per_row}
        (folder / "metrics" / f"{row}.json").write_text(json.dumps(record))


def test_a_verdict_the_teacher_seed_moves_is_marked(tmp_path):
    # A: DCM-4 > PCM-4 holds (+2 points); B: PCM above DCM (does not hold). PCM-4 > LCM-4 holds in both.
    _project(tmp_path / "a", {"teacher": 0.90, "euler4": 0.85, "dcm": 0.89, "pcm": 0.87, "lcm": 0.84})
    _project(tmp_path / "b", {"teacher": 0.90, "euler4": 0.85, "dcm": 0.86, "pcm": 0.88, "lcm": 0.84})
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "teacher_seeds.py"), str(tmp_path / "a"),
                          str(tmp_path / "b"), "--bootstrap", "200"], capture_output=True, text=True,
                         check=True).stdout
    single, pooled = out.split("\npooled: ")
    rows = {line.split("|")[1].strip(): line for line in single.splitlines() if line.startswith("| ")}
    rows.update({line.split("|")[1].strip(): line for line in pooled.split("\n\n| row |")[1].splitlines()
                 if line.startswith("| ")})
    pooled_rows = {line.split("|")[1].strip(): line.split("|")
                   for line in pooled.split("\n\n| row |")[0].splitlines() if line.startswith("| ")}
    assert rows["DCM-4 > PCM-4"].rstrip().endswith("| **yes** |")
    cells = rows["DCM-4 > PCM-4"].split("|")
    assert cells[2].strip().startswith("holds") and cells[4].strip().startswith("does not hold")
    assert "so does Euler-4" in rows["PCM-4 > LCM-4"]  # the control beside each verdict
    assert rows["PCM-4 > LCM-4"].rstrip().endswith("| no |")
    assert "verdicts (or controls) the teacher's seed moved: 1" in out  # DCM ≈ teacher fails in both
    assert rows["dcm"].rstrip().endswith("| **no** |") and rows["teacher"].rstrip().endswith("| yes |")
    # pooled over both teachers: DCM +2 under A, −2 under B → 0, inconclusive: A's own "holds" moved
    dcm_pcm = [c.strip() for c in pooled_rows["DCM-4 > PCM-4"]]
    assert dcm_pcm[2].startswith("holds") and dcm_pcm[4].startswith("inconclusive")
    assert dcm_pcm[5] == "+0.00 [-2.00, +2.00]" and dcm_pcm[6] == "64 paired rows, over 2 teachers"
    assert dcm_pcm[7] == "**yes**" and pooled_rows["PCM-4 > LCM-4"][7].strip() == "no"
