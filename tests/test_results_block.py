"""The README's results block: built from a project folder's metrics, report, paper report and teacher
record as the stages write them, and written between the README's markers only."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dcm.evaluation import reporting, results_block
from dcm.evaluation.verdicts import HOLDS, INCONCLUSIVE, NOT_RUN, Claim, Difference, Verdict
from dcm.io import write_json_atomic
from helpers import REPO

ROOT = Path(__file__).resolve().parents[1]
RUN_TIME = 1_796_212_800  # 2026-12-02 12:00 UTC: the metrics files' mtime, so the stamp's date is known


def _metrics(method: str, steps: int, nfe: int, latency: float, total: float, ci: list[float],
             diff: tuple[float, list[float]] | None, match: float) -> dict:
    """A metrics/<method>.json record with the keys dcm.evaluation.metrics.shapes_bench_metrics writes."""
    return {
        "method": method, "backend": "shapes-bench", "steps": steps, "nfe": nfe, "latency_s": latency,
        "dimensions": {"color": 0.9, "object_class": 0.8}, "total": total, "quality": total + 0.01,
        "semantic": total - 0.02, "total_ci95": ci,
        "dimensions_ci95": {"color": [0.85, 0.95], "object_class": [0.7, 0.9]},
        "diff_vs_teacher": {"total": {"mean": diff[0], "ci95": diff[1]}} if diff else {},
        "psnr_vs_teacher": None if method == "teacher" else 21.5, "match_rate": match,
        "per_row": [{"prompt": "a red square moves left", "seed": 1000, "total": total}],
    }


METRICS = {
    "teacher": _metrics("teacher", 50, 100, 2.0, 0.9023, [0.89, 0.91], (0.0, [0.0, 0.0]), 0.92),
    "lcm": _metrics("lcm", 4, 4, 0.1, 0.85, [0.83, 0.87], (-0.0523, [-0.07, -0.035]), 0.75),
    "dcm": _metrics("dcm", 4, 4, 0.125, 0.9057, [0.895, 0.915], (0.0034, [-0.0063, 0.0118]), 0.9),
}
ORDER = ["teacher", "dcm", "lcm"]  # the report's order, not the files' (alphabetical) one
# paper/summary.md's steps and coverage sections as report_paper writes them: a table, then a note
STEPS_SECTION = ["| family | 1 step | 2 steps | 4 steps |", "|---|---|---|---|",
                 "| LCM | 80.00 [78.00, 82.00]; FD excess 0.50 (`lcm1`) | — "
                 "| 85.00 [83.00, 87.00]; FD excess 0.25 (`lcm`) |", "| PCM | — | — | — |", "",
                 "Each cell: Total ×100. Reference, the teacher at 50 steps: 90.23 [89.00, 91.00]; "
                 "FD excess 0.00 (`teacher`)."]
COVERAGE_SECTION = ["| method | colour: TV excess [95% CI] | averaged-mode share [95% CI] |", "|---|---|---|",
                    "| dcm | +0.04 [-0.01, +0.09] | 0.06 [0.03, 0.12] |", "",
                    "TV excess: ≈ 0 is the data's coverage, > 0 coverage lost."]


def _write_project(root: Path, report: bool = True, paper: bool = True, teacher: bool = True) -> Path:
    for name, record in METRICS.items():
        write_json_atomic(root / "metrics" / f"{name}.json", record)
        os.utime(root / "metrics" / f"{name}.json", (RUN_TIME, RUN_TIME))
    if report:  # the report stage's first two tables, written with its own functions
        (root / "reports").mkdir()
        table = reporting.markdown_table(reporting.method_table(METRICS, ORDER))
        dims = reporting.dimension_table(METRICS, ORDER)
        summary = f"# shapes: results\n\n## Methods\n\n{table}\n\nlegend\n\n## Per dimension\n\n{dims}\n"
        (root / "reports" / "summary.md").write_text(summary)
    if paper:  # the report_paper stage's sections, their lines from Verdict.line as it writes them
        steps = {m: r["steps"] for m, r in METRICS.items()}
        claims = [Verdict(Claim("DCM-4 ≈ teacher-50", "dcm", "teacher", "equivalent"), HOLDS,
                          Difference(0.0034, (-0.0063, 0.0118), 64)),
                  Verdict(Claim("PCM-4 > LCM-4", "pcm", "lcm", "better"), NOT_RUN, missing=("pcm",))]
        mcm = [Verdict(Claim("MCM-4 > LCM-4 (MCM's claim)", "mcm", "lcm", "better"), INCONCLUSIVE,
                       Difference(0.004, (-0.002, 0.01), 64))]
        md = ["# shapes: the paper's claims\n", "## Claims\n", "Each verdict is the paired difference.", "",
              *(v.line(steps) for v in claims), "", "## Quality at 1, 2 and 4 steps\n", *STEPS_SECTION, "",
              "## Coverage of open attributes\n", *COVERAGE_SECTION, "", "## Training seeds\n",
              "| row | seeds |", "|---|---|", "| dcm | 3 |", "", "## MCM in its own setting\n",
              "The `mcm` preset's pipeline.", "",
              *(v.line(steps) for v in mcm), "", "## Methods and ablation rows (scores ×100)\n",
              "- not a claim"]
        (root / "paper").mkdir()
        (root / "paper" / "summary.md").write_text("\n".join(md) + "\n")
    if teacher:  # the keys the teacher stage writes to models/teacher/training.json
        write_json_atomic(root / "models" / "teacher" / "training.json",
                          {"steps": 3800, "final_loss": 0.05, "wall_s": 567.2, "steps_per_s": 6.7,
                           "batch_size": 16, "torch_threads": 2, "log_every": 50, "loss_curve": [1.0, 0.05]})
    return root


def _git_commit(root: Path, *more: str) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", "metrics", *more)
    git("commit", "-q", "-m", "run")
    return git("rev-parse", "--short=12", "HEAD")


def _table_rows(block: str) -> dict[str, list[str]]:
    """The rows of the block's first table (the methods, under the stamp) by method."""
    rows = block.split("\n\n")[1].splitlines()[2:]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows)}


def test_render_lists_the_reports_methods_in_its_order_with_scores_x100(tmp_path):
    block = results_block.render(_write_project(tmp_path))
    rows = _table_rows(block)
    assert list(rows) == ORDER
    assert rows["teacher"] == ["50", "100", "2.000", "1.0×", "90.23 [89.00, 91.00]", "91.23", "88.23", "",
                               "92%"]
    assert rows["dcm"] == ["4", "4", "0.125", "16.0×", "90.57 [89.50, 91.50]", "91.57", "88.57",
                           "+0.34 [-0.63, +1.18]", "90%"]
    assert rows["lcm"][7] == "-5.23 [-7.00, -3.50]"
    assert "Scores ×100 (shapes-bench)" in block


def test_after_make_paper_the_table_keeps_the_default_rows(tmp_path):
    """The report of a paper project lists every row; the block's table only the default DAG's (params.yaml's
    methods less ablation and NFE-curve rows; a training seed's row is not in the file)."""
    root = _write_project(tmp_path)
    extra = {"lcm_s1": _metrics("lcm_s1", 4, 4, 0.25, 0.86, [0.84, 0.88], (-0.04, [-0.05, -0.03]), 0.8),
             "euler2": _metrics("euler2", 2, 4, 0.1, 0.80, [0.78, 0.82], (-0.1, [-0.12, -0.08]), 0.7),
             "od": _metrics("od", 4, 4, 0.125, 0.85, [0.83, 0.87], (-0.05, [-0.06, -0.04]), 0.8)}
    for name, record in extra.items():
        write_json_atomic(root / "metrics" / f"{name}.json", record)
    table = reporting.markdown_table(reporting.method_table({**METRICS, **extra}, [*ORDER, *extra]))
    (root / "reports" / "summary.md").write_text(f"# shapes: results\n\n## Methods\n\n{table}\n")
    assert list(_table_rows(results_block.render(root))) == [*ORDER, *extra]  # no params.yaml: as reported
    (root / "params.yaml").write_text("methods:\n" + "".join(f"  {m}: {{kind: x}}\n" for m in ORDER)
                                      + "  euler2: {kind: teacher, sample_steps: 2, nfe_curve: true}\n"
                                      + "  od: {kind: dcm, ablation: true}\n")
    assert list(_table_rows(results_block.render(root))) == ORDER
    (root / "reports" / "summary.md").unlink()  # a paper project built by `dvc repro report_paper` alone
    assert list(_table_rows(results_block.render(root))) == ORDER  # params.yaml's order


def test_render_without_a_report_shows_every_metrics_file_teacher_first(tmp_path):
    block = results_block.render(_write_project(tmp_path, report=False, paper=False))
    assert list(_table_rows(block)) == ["teacher", "dcm", "lcm"]
    assert "claims" not in block


def test_stamp_names_the_commit_the_run_date_the_machine_and_the_teacher_speed(tmp_path):
    commit = _git_commit(_write_project(tmp_path))
    stamp = results_block.render(tmp_path).splitlines()[0]
    assert stamp.startswith("Last run: metrics written 2026-12-02 12:00 UTC")
    assert f"commit `{commit}`" in stamp and "uncommitted" not in stamp
    assert results_block.cpu_model() in stamp and " cores" in stamp
    assert "teacher 3800 steps in 9.5 min at 6.70 steps/s on 2 torch threads" in stamp

    write_json_atomic(tmp_path / "metrics" / "dcm.json", {**METRICS["dcm"], "total": 0.5})
    assert f"commit `{commit}` with uncommitted changes to metrics/dcm.json" in results_block.render(tmp_path)


def test_stamp_of_a_make_paper_checkout_names_the_switch_as_its_only_change(tmp_path):
    """`make paper` switches pipeline.paper on in params.yaml and rewrites dvc.yaml: the stamp says so, and
    any other change to params.yaml is an uncommitted change."""
    _write_project(tmp_path)
    committed = (REPO / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(committed)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    commit = _git_commit(tmp_path, "params.yaml", "dvc.yaml")
    (tmp_path / "params.yaml").write_text(committed.replace("  paper: false", "  paper: true", 1))
    (tmp_path / "dvc.yaml").write_text("stages: {report_paper: {cmd: x}}\n")
    assert (f"commit `{commit}` with params.yaml changed only in switching `pipeline.paper` on and dvc.yaml "
            "with it") in results_block.render(tmp_path)
    (tmp_path / "params.yaml").write_text(committed.replace("  paper: false", "  paper: true", 1)
                                          .replace("seeds: 3", "seeds: 2", 1))
    assert f"commit `{commit}` with uncommitted changes to dvc.yaml, params.yaml" in \
        results_block.render(tmp_path)


def test_stamp_outside_git_and_without_a_trained_teacher(tmp_path):
    stamp = results_block.render(_write_project(tmp_path, teacher=False)).splitlines()[0]
    assert "commit unknown (not a git checkout)" in stamp
    assert "steps/s" not in stamp


def test_paper_claims_are_quoted_with_their_verdicts_per_section(tmp_path):
    block = results_block.render(_write_project(tmp_path))
    lines = block.splitlines()
    claims = lines.index(next(line for line in lines if line.startswith("The paper's claims (written ")))
    assert lines[claims + 2:claims + 4] == [
        "- **holds** — DCM-4 ≈ teacher-50: Total(dcm, 4 steps) − Total(teacher, 50 steps) = "
        "+0.34 [-0.63, +1.18] over 64 paired rows",
        "- **not run** — PCM-4 > LCM-4: no metrics for `pcm` (`dcm run evaluate --method <row>`)"]
    assert any(line.startswith("MCM's claims in its own setting (written ") for line in lines)
    assert "- **inconclusive** — MCM-4 > LCM-4 (MCM's claim)" in block
    assert "- not a claim" not in block  # bullets of other sections are not verdicts


def test_the_steps_and_coverage_sections_are_quoted_whole_after_the_claims(tmp_path):
    lines = results_block.render(_write_project(tmp_path)).splitlines()

    def quoted(title: str, n: int) -> list[str]:
        """The ``n`` lines under the block's heading ``title`` and its blank line."""
        start = lines.index(next(line for line in lines if line.startswith(f"{title} (written ")))
        return lines[start + 2:start + 2 + n]

    assert quoted("Quality at 1, 2 and 4 steps", len(STEPS_SECTION) + 1) == [*STEPS_SECTION, ""]
    assert quoted("Coverage of open attributes", len(COVERAGE_SECTION) + 1) == [*COVERAGE_SECTION, ""]
    titles = [line.split(" (written ")[0] for line in lines if " (written " in line]
    assert titles == ["The paper's claims", "Quality at 1, 2 and 4 steps", "Coverage of open attributes",
                      "MCM's claims in its own setting"]
    assert "| dcm | 3 |" not in lines  # the training seeds' table is not quoted


def test_render_errors_name_the_folder_or_the_file_and_key(tmp_path):
    with pytest.raises(results_block.ResultsError, match=r"no metrics/<method>\.json in .*make demo"):
        results_block.render(tmp_path)
    write_json_atomic(tmp_path / "metrics" / "lcm.json", {"method": "lcm", "total": 0.8})
    with pytest.raises(results_block.ResultsError, match=r"lcm\.json has no \['quality', 'semantic'\]"):
        results_block.render(tmp_path)


README = """# project

intro
<!-- results:start -->
old figures
old table
<!-- results:end -->

## More
- docs
"""


def test_update_readme_replaces_only_the_marked_block_and_keeps_the_mode(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    readme.chmod(0o644)
    assert results_block.update_readme(readme, "\nnew block\n| a | b |\n\n")
    assert readme.read_text() == README.replace("old figures\nold table\n", "new block\n| a | b |\n")
    assert readme.stat().st_mode & 0o777 == 0o644
    assert not results_block.update_readme(readme, "new block\n| a | b |")  # unchanged: False


@pytest.mark.parametrize("text, found", [
    ("# no markers\n", "found 0 start and 0 end"),
    (README.replace("<!-- results:end -->\n", ""), "found 1 start and 0 end"),
    (README + "<!-- results:start -->\n", "found 2 start and 1 end"),
    ("<!-- results:end -->\nx\n<!-- results:start -->\n", "in the wrong order"),
])
def test_update_readme_without_the_markers_names_the_file_and_leaves_it(tmp_path, text, found):
    readme = tmp_path / "README.md"
    readme.write_text(text)
    expected = re.escape(f"{readme}: needs one line {results_block.START}") + f".*{found}"
    with pytest.raises(results_block.ResultsError, match=expected):
        results_block.update_readme(readme, "block")
    assert readme.read_text() == text


def test_the_projects_readme_has_the_markers_and_takes_a_rendered_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    block = results_block.render(_write_project(tmp_path / "project"))
    assert results_block.update_readme(readme, block)
    before, after = (ROOT / "README.md").read_text(), readme.read_text()
    assert before.split(results_block.START)[0] == after.split(results_block.START)[0]
    assert before.split(results_block.END)[1] == after.split(results_block.END)[1]
    assert block.strip() in after


def test_main_prints_the_block_or_writes_the_readme(tmp_path, capsys):
    project = _write_project(tmp_path / "project")
    assert results_block.main(str(project), None) == 0
    assert capsys.readouterr().out == results_block.render(project)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert results_block.main(str(project), str(readme)) == 0
    assert "| dcm | 4 |" in readme.read_text()
    assert f"{readme} updated" in capsys.readouterr().out
    readme.write_text("# no markers\n")
    assert results_block.main(str(project), str(readme)) == 2
    assert f"error: {readme}: needs one line" in capsys.readouterr().err


def test_the_module_imports_without_torch_or_plotting():
    code = ("import sys, dcm.evaluation.results_block; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
