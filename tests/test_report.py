"""The report stage renders the paper-shaped table, plots, and the side-by-side grid from metrics files."""

from __future__ import annotations

from pathlib import Path

import pytest

from dcm import config
from dcm.pipeline.stages import report
from helpers import write_method

REPO = Path(__file__).resolve().parents[1]


def test_report_writes_table_plots_and_video_grid(project):
    params = config.load("params.yaml", preset="smoke")
    methods = params.default_methods
    for k, m in enumerate(methods):
        write_method(project, m, total=0.8 - 0.01 * k, latency=2.0 if m == "teacher" else 0.2,
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
        write_method(project, m, total=0.8 - 0.01 * k, latency=2.0 if m == "teacher" else 0.2,
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
    # the default report: no ablations
    assert "| od |" not in (project / "reports" / "summary.md").read_text()
