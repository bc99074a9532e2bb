"""The paper report end to end on hand-written metrics files (evaluate's format): the claims table first, a
verdict per claim decided by the constructed differences and beside it its control (Euler-k in place of the
distilled row); each family's quality at 1, 2 and 4 steps; the coverage of open attributes, or a sentence
where the world has no open prompts; the headline tables at 2 and 4 steps; the curves against NFE; rows
that never ran reported as not run.  And no plot of the reports puts its legend over the data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from dcm import config
from dcm.evaluation import reporting, results_block
from dcm.evaluation.scoring import bootstrap
from dcm.pipeline.stages import report_paper

ROWS = 64
BASE = 0.85 + 0.04 * np.random.default_rng(0).standard_normal(ROWS)  # the teacher's per-row Totals
ALTERNATE = np.tile([1.0, -1.0], ROWS // 2)  # zero-mean spread: widens an interval, keeps the mean

# row -> per-row Totals; what the claims should conclude is in the test below
TOTALS = {
    "teacher": BASE,
    "dcm": BASE + 0.001,
    "pcm": BASE - 0.02,
    "lcm": BASE - 0.02 + 0.06 * ALTERNATE,
    "vcm": BASE - 0.05,
    "od": BASE - 0.03,
    "od_pe": BASE - 0.04,
    "dmd2": BASE + 0.03,
    "euler1": BASE - 0.2, "euler2": BASE - 0.1, "euler4": BASE - 0.015, "euler8": BASE, "euler16": BASE,
    "lcm1": BASE - 0.05, "lcm2": BASE - 0.03,
    "pcm2": BASE - 0.04, "dcm2": BASE - 0.02, "dcm8": BASE, "mcm": BASE - 0.03,
    "dmd2_1": BASE - 0.01, "dmd2_2": BASE, "mcm_raw": BASE - 0.04,
}  # no od_pe_tc, lcm8, ...: never ran


@pytest.fixture
def project(project):
    """The repo's params with one teacher: these tests write one project's metrics (two teachers pooled:
    test_with_two_teachers_...)."""
    raw = config.deep_merge(config.load_raw("params.yaml"), {"paper": {"teachers": 1}})
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return project


def section(summary: str, heading: str) -> str:
    """The text of ``summary``'s section ``## heading…``, up to the next section."""
    return summary.split(f"\n## {heading}")[1].split("\n## ")[0]


def table_rows(summary: str, heading: str) -> dict[str, dict[str, str]]:
    """The table of the section ``heading``: each row's cells by column header, keyed by its first cell."""
    table = [line for line in section(summary, heading).splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table]
    return {row[0]: dict(zip(cells[0], row, strict=True)) for row in cells[2:]}


def claim_row(summary: str, text: str) -> dict[str, str]:
    """The cells of the claims table's row for the claim ``text``, by column header."""
    row = table_rows(summary, "Claims")[text]
    assert tuple(row) == report_paper.CLAIMS_HEADER
    return row


def steps_cell(record: dict, row: str) -> str:
    """A cell of the steps table as the report must write it from ``row``'s metrics."""
    lo, hi = record["total_ci95"]
    return (f"{100 * record['total']:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]; "
            f"FD excess {record['fd_excess']:.2f} (`{row}`)")


def open_world(colour: float, shape: float, share: float) -> dict:
    """An ``open_world`` block with the keys ``distribution.open_world_metrics`` writes (the ones the report
    reads: coverage.<attribute>.tv_excess and its interval, averaged_mode.share and its interval)."""
    def coverage(excess: float) -> dict:
        return {"rows": 16, "prompts": 8, "tv": excess + 0.1, "tv_ci95": [excess, excess + 0.2],
                "tv_real_floor": 0.1, "tv_excess": excess, "tv_excess_ci95": [excess - 0.05, excess + 0.05]}

    return {"open_rows": 16, "rows": 80, "coverage": {"colour": coverage(colour), "shape": coverage(shape)},
            "averaged_mode": {"share": share, "ci95": [share / 2, 2 * share], "real_floor": 0.0,
                              "excess": share},
            "note": "coverage over the 16 rows whose prompt leaves an attribute open"}


def write_metrics(params, name: str, totals: np.ndarray, **extra) -> dict:
    """metrics/<name>.json as ``evaluate`` writes it (dcm.evaluation.metrics), with made-up scores (and the
    keys ``extra``)."""
    m = params.methods[name]
    n, seed = params.evaluation.bootstrap, params.seed
    rows = [{"prompt": f"prompt {i // 2}", "seed": i % 2} for i in range(ROWS)]
    diff = totals - TOTALS["teacher"]
    total = float(totals.mean())
    fd_excess = float(5 * (0.9 - total))
    record = {
        "method": name, "backend": "shapes-bench", "steps": m.sample_steps,
        "nfe": 2 * m.sample_steps if m.kind == "teacher" else m.sample_steps,
        "latency_s": 0.01 * m.sample_steps, "dimensions": {"color": total}, "quality": total,
        "semantic": total, "total": total, "total_ci95": list(bootstrap(totals, np.mean, n, seed)),
        "diff_vs_teacher": {"total": {"mean": float(diff.mean()),
                                      "ci95": list(bootstrap(diff, np.mean, n, seed))}},
        "psnr_vs_teacher": 30.0, "match_rate": total,
        "fd": fd_excess + 1.0, "fd_ci95": [fd_excess + 0.5, fd_excess + 1.5], "fd_real_floor": 1.0,
        "fd_excess": fd_excess, "fd_excess_ci95": [fd_excess - 0.5, fd_excess + 0.5],
        "diversity": total, "diversity_ci95": [total - 0.05, total + 0.05],
        "per_row": [{**r, "total": float(t), "color": float(t)} for r, t in zip(rows, totals)], **extra,
    }
    Path("metrics").mkdir(exist_ok=True)
    Path(f"metrics/{name}.json").write_text(json.dumps(record))
    return record


def test_paper_report_gives_a_computed_verdict_per_claim_tables_and_curves(project):
    params = config.load("params.yaml")
    params.world.open_share, params.world.eval_open_prompts = 0.0, 0  # a full-caption world: no coverage
    records = {name: write_metrics(params, name, totals) for name, totals in TOTALS.items()}
    report_paper.run(params)
    summary = (project / "paper" / "summary.md").read_text()

    def verdict(text: str) -> str:
        return claim_row(summary, text)["verdict"]

    so_does = "holds, but so does Euler-4 (no distillation)"
    assert verdict("DCM-4 ≈ teacher-50") == "holds"  # Euler-4 is 1.5 below the teacher: its control fails
    assert verdict("DCM-4 > PCM-4") == so_does  # Euler-4 beats PCM-4 too
    assert verdict("PCM-4 > LCM-4") == "inconclusive"
    assert verdict("ablation: + trajectory split helps (OD > VCM)") == so_does
    assert verdict("ablation: + parameter-efficient DetE helps (OD+PE > OD)") == "does not hold"
    for claim in ("ablation: + temporal coherence helps (OD+PE+TC > OD+PE)",
                  "ablation: + GAN and feature matching help (DCM > OD+PE+TC)"):
        assert verdict(claim) == "not run"
        assert "`od_pe_tc`" in claim_row(summary, claim)["a − b ×100 [95% CI]"]
    comparison = next(x for x in summary.splitlines() if "— DCM vs DMD2 at 4 steps" in x)
    assert comparison.startswith("- **dmd2 higher**")
    # the interval is the metrics' own paired Total − teacher (same rows, bootstrap, seed)
    dcm = claim_row(summary, "DCM-4 ≈ teacher-50")
    lo, hi = records["dcm"]["diff_vs_teacher"]["total"]["ci95"]
    assert dcm["a − b ×100 [95% CI]"].endswith(f"[{100 * lo:+.2f}, {100 * hi:+.2f}]")
    assert dcm["score (a vs b), pairs"] == "Total: dcm, 4 steps vs teacher, 50 steps; 64 paired rows"
    # the control: Euler-4's own metrics, Total − teacher, decided by the same rule
    lo, hi = records["euler4"]["diff_vs_teacher"]["total"]["ci95"]
    assert dcm["control verdict"] == "does not hold"
    assert dcm["Euler-k − b ×100 [95% CI]"] == f"-1.50 [{100 * lo:+.2f}, {100 * hi:+.2f}]"
    assert dcm["a − Euler-k ×100 [95% CI]"].startswith("+1.60 [")
    assert claim_row(summary, "DCM-4 > PCM-4")["Euler-k − b ×100 [95% CI]"].startswith("+0.50 [")
    assert "margin 1 point" in summary and "Control: each claim is decided again" in summary

    two, four = summary.split("## At 2 steps")[1].split("## At 4 steps")
    four = four.split("## Against NFE")[0]
    for row in ("teacher", "euler2", "lcm2", "pcm2", "dcm2", "dmd2_2"):
        assert f"| {row} |" in two, row
    for row in ("teacher", "euler4", "lcm", "pcm", "dcm", "mcm", "dmd2"):
        assert f"| {row} |" in four, row
    assert "| dcm8 |" not in two + four and "| vcm |" not in four  # other step counts; ablations apart
    assert summary.index("## Claims") < summary.index("## Quality at 1, 2 and 4 steps") \
        < summary.index("## Coverage of open attributes") < summary.index("## At 2 steps") \
        < summary.index("## Against NFE") < summary.index("## Methods and ablation rows")

    # every family of CURVES at 1, 2 and 4 steps, from its rows' metrics; — where no row at k ran
    quality = table_rows(summary, "Quality at 1, 2 and 4 steps")
    assert list(quality) == ["teacher (Euler)", "LCM", "PCM", "DCM", "DMD2", "MCM"]
    assert quality["LCM"] == {"family": "LCM", "1 step": steps_cell(records["lcm1"], "lcm1"),
                              "2 steps": steps_cell(records["lcm2"], "lcm2"),
                              "4 steps": steps_cell(records["lcm"], "lcm")}
    lcm1 = TOTALS["lcm1"].mean()  # 5 points below the teacher; FD excess 5 × (0.9 − Total)
    assert quality["LCM"]["1 step"].startswith(f"{100 * lcm1:.2f} [")
    assert quality["LCM"]["1 step"].endswith(f"]; FD excess {5 * (0.9 - lcm1):.2f} (`lcm1`)")
    assert quality["teacher (Euler)"]["4 steps"] == steps_cell(records["euler4"], "euler4")
    assert quality["PCM"]["1 step"] == quality["DCM"]["1 step"] == quality["MCM"]["2 steps"] == "—"
    assert quality["DMD2"]["1 step"] == steps_cell(records["dmd2_1"], "dmd2_1")
    assert f"Reference, the teacher at 50 steps: {steps_cell(records['teacher'], 'teacher')}." in summary
    # the world of params.yaml has no open prompts: a sentence, not an empty table
    assert section(summary, "Coverage of open attributes").strip() == (
        "The world has no open prompts (world.open_share = 0, world.eval_open_prompts = 0): every prompt "
        "names all its attributes, so there is no coverage to measure (docs/shapes-world.md, \"Open "
        "captions\").")
    assert "Not run: lcm8." in summary  # a curve's row that never ran
    ablations = summary.split("## Methods and ablation rows")[1]
    assert "| od_pe |" in ablations and "| euler1 |" not in ablations and "od_pe_tc" in ablations

    for key in ("total", "fd_excess", "diversity"):
        assert (project / "paper" / f"{key}_vs_nfe.png").stat().st_size > 0, key
        assert f"![{key}_vs_nfe.png]({key}_vs_nfe.png)" in summary
    page = (project / "paper" / "index.html").read_text()
    assert "<td><b>holds</b></td>" in page and f"<td><b>{so_does}</b></td>" in page
    assert "<img src='total_vs_nfe.png'>" in page

    # the README's results block (dcm results) quotes the claims table, controls included, then the list
    block = results_block.render(project).split("The paper's claims (written ")[1].split("MCM's claims")[0]
    lines = block.splitlines()
    assert lines[2] == "| " + " | ".join(report_paper.CLAIMS_HEADER) + " |"
    assert f"| DCM-4 > PCM-4 | {so_does} |" in block
    assert lines[2 + 2 + len(report_paper.CLAIMS)] == "" and "- **dmd2 higher**" in block
    # then the steps table and the coverage sentence, quoted whole
    block = results_block.render(project)
    steps_table = [line for line in section(summary, "Quality at").splitlines() if line.startswith("|")]
    quoted = block.split("Quality at 1, 2 and 4 steps (written ")[1].split("Coverage of open attributes (")
    assert len(steps_table) == 2 + len(report_paper.CURVES) and "\n".join(steps_table) in quoted[0]
    assert f"| LCM | {steps_cell(records['lcm1'], 'lcm1')} |" in quoted[0]
    assert "Reference, the teacher at 50 steps: " in quoted[0]
    assert "The world has no open prompts (world.open_share = 0" in quoted[1].split("MCM's claims")[0]
    assert block.index("The paper's claims (") < block.index("Quality at 1, 2 and 4 steps (") \
        < block.index("Coverage of open attributes (") < block.index("MCM's claims in its own setting (")


def test_paper_report_with_no_metrics_says_not_run_for_every_claim(project):
    params = config.load("params.yaml")
    report_paper.run(params)
    summary = (project / "paper" / "summary.md").read_text()
    lines = [line for line in summary.splitlines() if line.startswith("- **")]
    assert len(lines) == len(report_paper.COMPARISONS) + len(report_paper.MCM_CLAIMS)
    assert all(line.startswith("- **not run**") for line in lines)
    for c in report_paper.CLAIMS:
        row = claim_row(summary, c.text)
        assert row["verdict"] == "not run"
        # names euler4, and b's row where that is missing too
        assert row["control verdict"].startswith("control not run (euler4")
    assert "no row at 2 steps ran" in summary and not list((project / "paper").glob("*.png"))
    quality = table_rows(summary, "Quality at 1, 2 and 4 steps")
    assert list(quality) == ["teacher (Euler)", "LCM", "PCM", "DCM", "DMD2"]  # MCM: only where it ran
    assert {cell for row in quality.values() for cell in list(row.values())[1:]} == {"—"}
    assert "Reference, the teacher (`teacher`): not run." in summary


@pytest.fixture
def legend_checks(monkeypatch):
    """Every figure the reports save, checked for a legend overlapping its axes (in display pixels)."""
    overlaps: list[str] = []
    save = reporting._save

    def checked_save(fig, path):
        fig.canvas.draw()
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is not None and legend.get_window_extent().overlaps(ax.get_window_extent()):
                overlaps.append(Path(path).name)
        save(fig, path)

    monkeypatch.setattr(reporting, "_save", checked_save)
    return overlaps


def test_no_report_plot_puts_its_legend_over_the_data(tmp_path, legend_checks):
    params = config.load(Path(__file__).resolve().parents[1] / "params.yaml")
    metrics = {}
    for name in ("teacher", "dcm", "dcm2", "pcm", "lcm"):
        m = params.methods[name]
        total = float(TOTALS.get(name, BASE).mean())
        metrics[name] = {"method": name, "steps": m.sample_steps, "nfe": m.sample_steps, "total": total,
                         "total_ci95": [total - 0.01, total + 0.01], "quality": total, "semantic": total,
                         "dimensions": {"color": total, "motion_smoothness": 0.9}}
    rows = reporting.method_table(metrics, list(metrics))
    history = tmp_path / "history.jsonl"
    history.write_text("".join(json.dumps({"step": i, "loss": 1.0 / (i + 1)}) + "\n" for i in range(5)))
    assert reporting.bar_plot(rows, tmp_path / "scores.png", "scores")
    assert reporting.dimension_plot(metrics, list(metrics), tmp_path / "dimensions.png")
    assert reporting.loss_curves({"dcm/seme": history, "lcm": history}, tmp_path / "losses.png")
    assert reporting.nfe_curves(metrics, {"DCM": ["dcm2", "dcm"], "PCM": ["pcm"]}, "total",
                                tmp_path / "total.png", "Total", reference="teacher", scale=100.0)
    assert legend_checks == []


def test_training_seeds_pool_into_the_verdicts_and_the_seed_table(project):
    """paper.seeds rows (dcm_s1, dcm_s2) enter the claims through the hierarchical bootstrap: a DCM whose
    retrained runs sit 2 points either side of the first is no longer 'holds ≈ teacher' on one lucky run,
    and the seed table shows each run's Total and the spread."""
    params = config.load("params.yaml")
    assert params.paper.seeds == 3 and {"dcm_s1", "dcm_s2"} <= set(params.methods)
    for name in ("teacher", "dcm", "pcm"):
        write_metrics(params, name, TOTALS[name])
    report_paper.run(params)
    one_run = (project / "paper" / "summary.md").read_text()
    write_metrics(params, "dcm_s1", TOTALS["dcm"] - 0.02)
    write_metrics(params, "dcm_s2", TOTALS["dcm"] + 0.02)
    report_paper.run(params)
    pooled = (project / "paper" / "summary.md").read_text()

    def line(summary: str, text: str) -> str:
        row = claim_row(summary, text)
        return f"{row['verdict']}: {row['a − b ×100 [95% CI]']} over {row['score (a vs b), pairs']}"

    assert line(one_run, "DCM-4 ≈ teacher-50").startswith("holds: ")
    assert "training seeds" not in line(one_run, "DCM-4 ≈ teacher-50")
    assert line(pooled, "DCM-4 ≈ teacher-50").startswith("inconclusive: ")
    assert line(pooled, "DCM-4 ≈ teacher-50").endswith("; 64 paired rows × training seeds 3 vs 1")
    assert "× training seeds 3 vs 1" in line(pooled, "DCM-4 > PCM-4")
    table = pooled.split("## Training seeds")[1].split("##")[0]
    dcm = 100 * TOTALS["dcm"].mean()
    assert f"| dcm | 3 | {dcm:.1f}, {dcm - 2:.1f}, {dcm + 2:.1f} | {dcm:.1f} [" in table \
        and "| 4.0 |" in table
    assert "| pcm |" not in table  # one run: nothing to pool
    assert "hierarchical bootstrap" in pooled and "## Training seeds" not in one_run
    assert pooled.index("## Quality at") < pooled.index("## Coverage of") < pooled.index("## Training seeds")


def test_mcm_setting_section_gives_mcms_claims_from_its_own_metrics(project):
    """MCM's claims are decided on mcm_setting/metrics/ (the low-quality teacher's pipeline), apart from the
    main table's rows of the same names; the sharpness claim is decided on imaging_quality, not Total."""
    params = config.load("params.yaml")
    for name in ("teacher", "lcm", "mcm"):  # the main table's rows: must not enter MCM's verdicts
        write_metrics(params, name, TOTALS["teacher"])
    report_paper.run(params)
    before = (project / "paper" / "summary.md").read_text().split("## MCM in its own setting")[1]
    assert before.count("- **not run**") == len(report_paper.MCM_CLAIMS)
    folder = project / "mcm_setting" / "metrics"
    folder.mkdir(parents=True)
    sharper = {"teacher": 0.0, "lcm": 0.0, "mcm": 0.1}
    for name, totals in {"teacher": BASE, "lcm": BASE - 0.03, "mcm": BASE - 0.005}.items():
        record = write_metrics(params, name, totals)
        for r in record["per_row"]:
            r["imaging_quality"] = 0.5 + sharper[name]
        record["dimensions"]["imaging_quality"] = 0.5 + sharper[name]
        if name != "teacher":
            record["diff_vs_teacher"]["imaging_quality"] = {"mean": sharper[name],
                                                            "ci95": [sharper[name]] * 2}
        (folder / f"{name}.json").write_text(json.dumps(record))
    for name in ("teacher", "lcm", "mcm"):
        write_metrics(params, name, TOTALS["teacher"])
    report_paper.run(params)
    summary = (project / "paper" / "summary.md").read_text()
    section = summary.split("## MCM in its own setting")[1].split("## Methods and ablation rows")[0]

    def line(text: str) -> str:
        return next(x for x in section.splitlines() if f"— {text}" in x)

    assert line("MCM-4 > LCM-4").startswith("- **holds**") and "+2.50 [" in line("MCM-4 > LCM-4")
    assert line("MCM-4's frames sharper").startswith("- **holds**")
    assert "imaging_quality(mcm, 4 steps) − imaging_quality(teacher, 50 steps) = +10.00" \
        in line("MCM-4's frames")
    assert line("MCM-4 ≈ its low-quality teacher-50").startswith("- **inconclusive**")  # 0.5 below, surely
    assert "| mcm | 60.00 | +10.00 [+10.00, +10.00] |" in section and "| teacher | 50.00 |  |" in section
    assert "MCM in its own setting" in (project / "paper" / "index.html").read_text()


def test_coverage_section_gives_each_rows_tv_excess_per_open_attribute_and_its_averaged_modes(project):
    """With open prompts, the metrics' open_world blocks become one row per method that ran (teacher, Euler-4,
    the 4-step rows), one column per open attribute (TV excess [95%]) and the averaged-mode share; a row
    whose block holds only a note, or that has none, shows — ."""
    params = config.load("params.yaml")
    blocks = {"teacher": open_world(0.01, -0.02, 0.0), "euler4": open_world(0.12, 0.05, 0.25),
              "dcm": open_world(0.04, 0.0, 0.0625), "lcm": {"note": "not computed: coverage needs 2 videos"}}
    for name in ("teacher", "euler4", "lcm", "dcm", "pcm", "euler8"):
        write_metrics(params, name, TOTALS[name], **({"open_world": blocks[name]} if name in blocks else {}))
    report_paper.run(params)
    summary = (project / "paper" / "summary.md").read_text()
    rows = table_rows(summary, "Coverage of open attributes")
    assert list(rows) == ["teacher", "euler4", "lcm", "pcm", "dcm"]  # COVERAGE_ROWS' order; euler8 not one
    assert rows["euler4"] == {"method": "euler4", "colour: TV excess [95% CI]": "+0.12 [+0.07, +0.17]",
                              "shape: TV excess [95% CI]": "+0.05 [+0.00, +0.10]",
                              "averaged-mode share [95% CI]": "0.25 [0.12, 0.50]"}
    assert rows["teacher"]["shape: TV excess [95% CI]"] == "-0.02 [-0.07, +0.03]"
    assert rows["dcm"]["averaged-mode share [95% CI]"] == "0.06 [0.03, 0.12]"
    assert list(rows["lcm"].values())[1:] == list(rows["pcm"].values())[1:] == ["—"] * 3
    assert report_paper.COVERAGE_NOTE in section(summary, "Coverage of open attributes")
    assert "<th>colour: TV excess [95% CI]</th>" in (project / "paper" / "index.html").read_text()


def test_coverage_section_without_open_world_blocks_names_the_worlds_keys(project):
    """A world with open prompts whose metrics have no open_world block (metrics older than the option):
    the section says to re-run evaluate instead of claiming the world has none."""
    params = config.load("params.yaml")
    params.world.open_share, params.world.eval_open_prompts = 0.0, 8
    write_metrics(params, "teacher", TOTALS["teacher"])
    report_paper.run(params)
    coverage = section((project / "paper" / "summary.md").read_text(), "Coverage of open attributes")
    assert coverage.strip() == ("No row's metrics has an `open_world` block although the world has open "
                                "prompts (world.open_share = 0, world.eval_open_prompts = 8): re-run `dcm "
                                "run evaluate --method <row>`.")


SO_DOES = "holds, but so does Euler-4 (no distillation)"


@pytest.mark.parametrize("euler4, expect", [
    # plain Euler at 4 steps as good as the teacher on average (rows ±2 points either side), 2 above
    # PCM-4: both claims hold without distillation
    (BASE + 0.02 * ALTERNATE,
     {"DCM-4 ≈ teacher-50": (SO_DOES, "holds"), "DCM-4 > PCM-4": (SO_DOES, "holds")}),
    # Euler-4 5 points below the teacher and 3 below PCM-4: the controls fail, the claims hold on their own
    (BASE - 0.05, {"DCM-4 ≈ teacher-50": ("holds", "does not hold"),
                   "DCM-4 > PCM-4": ("holds", "does not hold")}),
    # no euler4 metrics: the claims keep their verdicts, the control says which row it needs
    (None, {"DCM-4 ≈ teacher-50": ("holds", "control not run (euler4)"),
            "DCM-4 > PCM-4": ("holds", "control not run (euler4)")}),
])
def test_each_claim_is_reported_beside_its_euler_control_in_the_first_table(project, euler4, expect):
    """A claim that Euler-4 (the teacher, plain Euler at 4 steps, no distillation) also satisfies is marked
    so; one Euler-4 fails stays a bare 'holds'; a missing Euler row is named.  The verdicts and the controls
    are computed from the written per-row Totals, and the claims table is the report's first table."""
    params = config.load("params.yaml")
    for name in ("teacher", "dcm", "pcm"):
        write_metrics(params, name, TOTALS[name])
    if euler4 is not None:
        write_metrics(params, "euler4", euler4)
    report_paper.run(params)
    summary = (project / "paper" / "summary.md").read_text()
    for text, (verdict, control) in expect.items():
        row = claim_row(summary, text)
        assert (row["verdict"], row["control verdict"]) == (verdict, control), text
        assert row["control: Euler-k as a"] == "`euler4`"
        if euler4 is None:
            assert row["Euler-k − b ×100 [95% CI]"] == "no metrics for `euler4`"
        else:
            assert row["Euler-k − b ×100 [95% CI]"].endswith("]")
    first_table = next(line for line in summary.splitlines() if line.startswith("|"))
    assert first_table == "| " + " | ".join(report_paper.CLAIMS_HEADER) + " |"
    assert summary.index(first_table) < summary.index("## At 2 steps")
    assert "holds, but so does Euler-k (no distillation)" in summary  # the rule, stated in the report


def test_with_two_teachers_each_claim_pools_this_project_and_the_second_teachers_folder(project, monkeypatch):
    """paper.teachers: 2 — the claims read teachers/s1/metrics/ beside metrics/ and pool them (each row
    against its own teacher's): DCM above PCM under teacher 0 and 2 points below it under teacher 1 moves
    DCM-4 > PCM-4 from holds (one teacher) to inconclusive.  Without the folder the report says which
    stage to run."""
    params = config.parse(config.deep_merge(config.load_raw("params.yaml"), {"paper": {"teachers": 2}}))
    for name in ("teacher", "euler4", "dcm", "pcm", "lcm"):
        write_metrics(params, name, TOTALS[name])
    with pytest.raises(config.ConfigError, match=r"paper.teachers.*dcm run teachers"):
        report_paper.run(params)
    second = project / "teachers" / "s1"
    second.mkdir(parents=True)
    monkeypatch.chdir(second)
    for name in ("teacher", "euler4", "pcm", "lcm"):
        write_metrics(params, name, TOTALS[name] + 0.01)
    write_metrics(params, "dcm", TOTALS["pcm"] - 0.01)
    monkeypatch.chdir(project)
    report_paper.run(params)
    summary = (project / "paper" / "summary.md").read_text()
    row = claim_row(summary, "DCM-4 > PCM-4")
    assert row["verdict"] == "inconclusive"
    assert row["score (a vs b), pairs"].endswith("64 paired rows, over 2 teachers")
    assert "The claims pool 2 teachers (paper.teachers" in summary
    one = config.load("params.yaml")
    report_paper.run(one)
    single = (project / "paper" / "summary.md").read_text()
    assert claim_row(single, "DCM-4 > PCM-4")["verdict"].startswith("holds")
    assert "conditional on one teacher (paper.teachers: 1)" in single
