"""The report stage renders the paper-shaped table, plots, and the side-by-side grid from metrics files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from dcm import config
from dcm.pipeline.stages import report

REPO = Path(__file__).resolve().parents[1]


def _write_method(root: Path, name: str, total: float, latency: float, steps: int) -> None:
    (root / "metrics").mkdir(exist_ok=True)
    record = {"method": name, "steps": steps, "nfe": steps, "latency_s": latency,
              "dimensions": {"colour": total, "motion_smoothness": 0.9},
              "quality": total + 0.01, "semantic": total - 0.02, "total": total,
              "total_ci95": [total - 0.03, total + 0.03],
              "diff_vs_teacher": {"total": {"mean": total - 0.8, "ci95": [total - 0.85, total - 0.75]}},
              "psnr_vs_teacher": float("inf") if name == "teacher" else 20.0}
    (root / "metrics" / f"{name}.json").write_text(json.dumps(record))
    samples = root / "samples" / name
    samples.mkdir(parents=True)
    rng = np.random.default_rng(len(name))
    save_file({"videos": rng.uniform(-1, 1, (4, 3, 8, 16, 16)).astype(np.float16)}, str(samples / "videos.safetensors"))
    hist = root / "checkpoints" / name
    hist.mkdir(parents=True)
    (hist / "history.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0 / (i + 1)}) + "\n" for i in range(5)))


def test_report_writes_table_plots_and_video_grid(project):
    params = config.load("params.yaml", preset="smoke")
    methods = params.default_methods
    for k, m in enumerate(methods):
        _write_method(project, m, total=0.8 - 0.01 * k, latency=2.0 if m == "teacher" else 0.2,
                      steps=params.methods[m].sample_steps)
    report.run(params)
    summary = (project / "reports" / "summary.md").read_text()
    for m in methods:
        assert f"| {m} |" in summary
    assert "10.0×" in summary  # speedup = teacher latency / method latency, measured side by side
    assert "80.00 [77.00, 83.00]" in summary  # Total ×100 with its interval
    for f in ("index.html", "scores.png", "dimensions.png", "losses.png", "side_by_side.gif"):
        assert (project / "reports" / f).stat().st_size > 0, f
    assert "<table>" in (project / "reports" / "index.html").read_text()


def test_report_refuses_to_run_with_missing_metrics(project):
    params = config.load("params.yaml", preset="smoke")
    with pytest.raises(FileNotFoundError, match="metrics missing for"):
        report.run(params)
    assert not (project / "reports").exists()


def test_ablation_report_puts_the_ablation_rows_beside_the_default_methods(project):
    from dcm.pipeline.stages import report_ablations

    params = config.load("params.yaml", preset="smoke")
    rows = [m for m, c in params.methods.items()
            if not (c.nfe_curve or c.replicate_of) and (c.kind != "teacher" or not c.ablation)]
    for k, m in enumerate(rows):
        _write_method(project, m, total=0.8 - 0.01 * k, latency=2.0 if m == "teacher" else 0.2,
                      steps=params.methods[m].sample_steps)
    report_ablations.run(params)
    summary = (project / "ablations" / "summary.md").read_text()
    for m in rows:
        assert f"| {m} |" in summary
    assert summary.index("| dcm |") < summary.index("| od |")  # the ablation rows after the methods
    # the paper report's: the NFE-curve rows and the training seeds of paper.seeds
    assert not any(f"| {m} |" in summary for m, c in params.methods.items() if c.nfe_curve or c.replicate_of)
    assert (project / "ablations" / "scores.png").stat().st_size > 0
    report.run(params)
    assert "| od |" not in (project / "reports" / "summary.md").read_text()  # the default report: no ablations
