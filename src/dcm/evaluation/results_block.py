"""The README's results section, generated from the last run's outputs instead of typed in.

``render(project)`` builds a Markdown block from a project folder after ``make demo`` (and, when it ran,
``make paper``): the method table from ``metrics/<method>.json`` in the order of ``reports/summary.md``,
the paper's claims with their verdicts and their controls (plain Euler at the claim's step count, no
distillation), the quality of each family at 1, 2 and 4 steps and the coverage of open attributes from
``paper/summary.md``, and a stamp saying which commit, when, on what machine and how fast its teacher
trained (``models/teacher/training.json``).
``update_readme(readme, block)`` puts the block between the marker lines, atomically.  ``dcm results
[--project DIR] [--write README.md]`` is ``main``.

Light on purpose (no torch, no plotting): it runs wherever the outputs are, a login node or CI included.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

from dcm import paths
from dcm.io import read_json, write_bytes_atomic

START = "<!-- results:start -->"
END = "<!-- results:end -->"
TEACHER = "teacher"
# The per-method keys the block reads: the metrics/<method>.json contract (dcm.evaluation.metrics).
REQUIRED_KEYS = ("total", "quality", "semantic")
# The sections of paper/summary.md (written by the report_paper stage) the block quotes: of a claims section
# its verdict lines and claims table (the table whose header starts CLAIMS_TABLE: each claim with its Euler
# control); of a section in WHOLE_SECTIONS every line (a table and the notes under it).
PAPER_SECTIONS = {"## Claims": "The paper's claims",
                  "## Quality at 1, 2 and 4 steps": "Quality at 1, 2 and 4 steps",
                  "## Coverage of open attributes": "Coverage of open attributes",
                  "## MCM in its own setting": "MCM's claims in its own setting"}
WHOLE_SECTIONS = ("## Quality at 1, 2 and 4 steps", "## Coverage of open attributes")
CLAIMS_TABLE = "| claim |"


class ResultsError(ValueError):
    """A project folder or README the results block cannot be built from or written into."""


def _load_metrics(project: Path) -> dict[str, dict]:
    folder = project / paths.METRICS
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise ResultsError(f"results: no metrics/<method>.json in {project.resolve()} "
                           f"(run `make demo`, or `dcm run evaluate --method M` per method)")
    metrics = {}
    for file in files:
        record = read_json(file)
        missing = [k for k in REQUIRED_KEYS if not isinstance(record, dict) or record.get(k) is None]
        if missing:
            raise ResultsError(f"results: {file} has no {missing} (a metrics record needs "
                               f"{list(REQUIRED_KEYS)}; re-run `dcm run evaluate --method {file.stem}`)")
        metrics[file.stem] = record
    return metrics


def _default_rows(project: Path) -> list[str] | None:
    """The default DAG's rows of the project's params.yaml, in its order: its methods less the opt-in ones
    (``ablation``, ``nfe_curve``; paper.seeds' ``<row>_s<k>`` are never in the file); None without a
    readable file."""
    import yaml

    try:
        methods = (yaml.safe_load((project / "params.yaml").read_text()) or {}).get("methods")
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(methods, dict):
        return None
    return [m for m, row in methods.items()
            if not (isinstance(row, dict) and (row.get("ablation") or row.get("nfe_curve")))]


def _report_order(project: Path, metrics: dict[str, dict]) -> list[str]:
    """The rows of the report's first table, the default DAG's methods only, as `make demo` shows them
    (after `make paper` the report lists every row: its curves, seeds and ablations stay in its own
    tables).  Without a report (`make paper` builds report_paper only): the default rows with metrics in
    params.yaml's order, else every method with metrics, teacher first."""
    summary = project / paths.REPORTS / "summary.md"
    order: list[str] = []
    if summary.is_file():
        in_table = False
        for line in summary.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("| method |"):
                in_table = True
            elif in_table and line.startswith("|"):
                if not set(cells[0]) <= set("-:"):
                    order.append(cells[0].split(" ", 1)[0])  # the key, less a label beside it
            elif in_table:
                break
    default = _default_rows(project)
    order = [m for m in order if m in metrics and (default is None or m in default)]
    return (order or [m for m in default or () if m in metrics]
            or sorted(metrics, key=lambda m: (m != TEACHER, m)))


def _ci(ci, scale: float = 100.0, signed: bool = False) -> str:
    if not ci:
        return ""
    spec = "+.2f" if signed else ".2f"
    return f" [{format(scale * ci[0], spec)}, {format(scale * ci[1], spec)}]"


def _cell(value, spec: str, suffix: str = "") -> str:
    return "" if value is None else format(value, spec) + suffix


def shown_name(name: str, metrics: dict) -> str:
    """A row as every table shows it: its key, and its label where it has one (``dmd2 — DMD2 (no GAN)``)."""
    return f"{name} — {metrics['label']}" if metrics.get("label") else name


def method_table(metrics: dict[str, dict], order: list[str]) -> str:
    """Markdown: one row per method; scores ×100, intervals the metrics' 95% bootstrap ones."""
    teacher_latency = metrics.get(TEACHER, {}).get("latency_s")
    lines = ["| method | steps | NFE | s/video | speedup | Total [95% CI] | Quality | Semantic "
             "| Total − teacher [95% CI] | prompt match |", "|" + "---|" * 10]
    for name in order:
        m = metrics[name]
        latency = m.get("latency_s")
        speedup = teacher_latency / latency if teacher_latency and latency else None
        diff = (m.get("diff_vs_teacher") or {}).get("total")
        diff_text = ("" if not diff or name == TEACHER
                     else f"{100 * diff['mean']:+.2f}{_ci(diff.get('ci95'), signed=True)}")
        match = m.get("match_rate")
        match_text = _cell(None if match is None else 100 * match, ".0f", "%")
        lines.append(f"| {shown_name(name, m)} | {_cell(m.get('steps'), 'd')} | {_cell(m.get('nfe'), 'd')} "
                     f"| {_cell(latency, '.3f')} | {_cell(speedup, '.1f', '×')} "
                     f"| {100 * m['total']:.2f}{_ci(m.get('total_ci95'))} | {100 * m['quality']:.2f} "
                     f"| {100 * m['semantic']:.2f} | {diff_text} | {match_text} |")
    return "\n".join(lines)


def paper_claims(project: Path) -> list[str]:
    """The claims tables and verdict lines of paper/summary.md, and its steps and coverage sections whole,
    under a heading per section; [] when `make paper` has not run."""
    summary = project / paths.PAPER / "summary.md"
    if not summary.is_file():
        return []
    out, section, whole, in_table, blank = [], None, False, False, False
    for line in summary.read_text().splitlines():
        if line.startswith("## "):
            section, whole, in_table = PAPER_SECTIONS.get(line.strip()), line.strip() in WHOLE_SECTIONS, False
            if section:
                out += ["", f"{section} ({_written(summary)}, `{paths.PAPER / 'summary.md'}`):", ""]
        elif whole and line.strip():
            out += ["", line] if blank and out[-1] else [line]  # its parts one blank line apart
        elif section and (line.startswith(CLAIMS_TABLE) or in_table and line.startswith("|")):
            in_table = True
            out.append(line)
        elif section and line.startswith("- "):
            in_table = False
            out += ["", line] if out[-1].startswith("|") else [line]  # a list after a table: a blank line
        else:
            in_table = False
        blank = not line.strip()
    return out


def _written(file: Path) -> str:
    when = datetime.datetime.fromtimestamp(file.stat().st_mtime, datetime.timezone.utc)
    return f"written {when:%Y-%m-%d %H:%M} UTC"


def _switches_only(project: Path, committed: str) -> list[str] | None:
    """The opt-in groups switched on in the project's params.yaml where they are its only difference from
    the ``committed`` text (what `make paper` / `make ablations` leave); None otherwise."""
    import yaml

    try:
        now, then = yaml.safe_load((project / "params.yaml").read_text()), yaml.safe_load(committed)
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(now, dict) or not isinstance(then, dict):
        return None
    switches_now, switches_then = now.pop("pipeline", None) or {}, then.pop("pipeline", None) or {}
    if now != then:
        return None
    on = [g for g, value in switches_now.items() if value and not switches_then.get(g)]
    off = [g for g, value in switches_then.items() if value and not switches_now.get(g)]
    return on if on and not off else None


def git_commit(project: Path) -> str:
    """The checkout's commit, short, naming the tracked files that differ from it (`make paper` and
    `make ablations` rewrite params.yaml and dvc.yaml to switch their rows on)."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(project), *args], capture_output=True, text=True, check=False)

    try:
        head = git("rev-parse", "--short=12", "HEAD")
    except OSError:
        return "commit unknown (no git)"
    if head.returncode != 0:
        return "commit unknown (not a git checkout)"
    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").stdout.splitlines()]
    if not changed:
        return f"commit `{head.stdout.strip()}`"
    switches = _switches_only(project, git("show", "HEAD:params.yaml").stdout) \
        if set(changed) <= {"params.yaml", "dvc.yaml"} and "params.yaml" in changed else None
    if switches:
        on = ", ".join(f"`pipeline.{g}`" for g in switches)
        rest = " and dvc.yaml with it" if "dvc.yaml" in changed else ""
        return f"commit `{head.stdout.strip()}` with params.yaml changed only in switching {on} on{rest}"
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    return f"commit `{head.stdout.strip()}` with uncommitted changes to {shown}"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return " ".join(value.split())
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> str:
    """CPU model and the cores this process may use (of the machine's, when fewer)."""
    total = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    cores = f"{usable} cores" if usable == total else f"{usable} of {total} cores"
    return f"{cpu_model()}, {cores}"


def teacher_speed(project: Path) -> str | None:
    """How the shapes teacher trained (models/teacher/training.json); None for a real teacher, which is
    recorded, not trained."""
    file = project / paths.TEACHER / "training.json"
    if not file.is_file():
        return None
    t = read_json(file)
    if t.get("steps_per_s") is None:
        return None
    n = t.get("torch_threads")
    threads = f" on {n} torch thread{'s' * (n != 1)}" if n else ""
    wall = f" in {t['wall_s'] / 60:.1f} min" if t.get("wall_s") else ""
    return f"teacher {t.get('steps', '?')} steps{wall} at {t['steps_per_s']:.2f} steps/s{threads}"


def stamp(project: Path) -> str:
    newest = max((project / paths.METRICS).glob("*.json"), key=lambda f: f.stat().st_mtime)
    parts = [f"metrics {_written(newest)}", git_commit(project), machine(), teacher_speed(project)]
    return "Last run: " + " · ".join(p for p in parts if p) + "."


def render(project: Path) -> str:
    """The results block of ``project``'s last run (module docstring)."""
    project = Path(project)
    metrics = _load_metrics(project)
    order = _report_order(project, metrics)
    backends = sorted({metrics[m].get("backend", "unknown") for m in order})
    lines = [stamp(project), "", method_table(metrics, order), "",
             f"Scores ×100 ({', '.join(backends)}), the same prompts and seeds for every method; "
             f"intervals: 95% bootstrap over the evaluation rows (Total − teacher paired). Prompt match: "
             f"the share of videos whose colour, shape and direction all match the prompt. Everything "
             f"else: `{paths.REPORTS / 'summary.md'}` (after `make paper`: `{paths.PAPER / 'summary.md'}`). "
             f"Regenerate: `dcm results --write README.md`."]
    lines += paper_claims(project)
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, block: str) -> bool:
    """Replace the text between the ``START`` and ``END`` marker lines of ``readme`` with ``block``
    (atomically; the file keeps its permissions).  True if the file changed."""
    readme = Path(readme)
    text = readme.read_text()
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == START]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(starts) != 1 or len(ends) != 1 or starts[0] > ends[0]:
        raise ResultsError(f"{readme}: needs one line {START} and, after it, one line {END} around the "
                           f"results block; found {len(starts)} start and {len(ends)} end marker(s)"
                           + (" in the wrong order" if len(starts) == len(ends) == 1 else ""))
    new = "".join(lines[:starts[0] + 1]) + block.strip("\n") + "\n" + "".join(lines[ends[0]:])
    if new == text:
        return False
    mode = readme.stat().st_mode & 0o7777
    write_bytes_atomic(readme, new.encode())
    os.chmod(readme, mode)  # the temporary file was created 0600
    return True


def main(project: str = ".", write: str | None = None) -> int:
    """``dcm results``: print the block of ``project``'s last run, or write it into the README ``write``."""
    try:
        block = render(Path(project))
        if write is None:
            sys.stdout.write(block)
            return 0
        changed = update_readme(Path(write), block)
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"results: {write} {'updated' if changed else 'already up to date'}")
    return 0
