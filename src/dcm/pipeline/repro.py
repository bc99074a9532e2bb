"""``dcm repro -j N``: the project's DVC pipeline with N stage runs at a time on this machine.

``dvc repro`` runs one stage after another; DVC's documented way to run independent branches at once is one
``dvc repro <target>`` per branch, which it permits by holding its repository lock only before and after a
stage's command.  This runner does that for the whole DAG: it orders the runs of the stage table (the DAG of
params.yaml, as dvc.yaml holds it), and starts each as ``dvc --wait-for-lock repro --single-item <run>``
once every run it depends on has finished, N at a time, the run with the most work downstream of it first
(:attr:`dcm.pipeline.table.Stage.weight`).  DVC still decides whether each stage is stale and writes its
dvc.lock entry, so the project afterwards is what ``dvc repro`` leaves.

Each run that may share the machine gets ``--threads`` torch threads (default: this machine's cores // N)
through ``OMP_NUM_THREADS``; a run that nothing else in the plan can run beside (every other run comes before
or after it: ``make demo``'s teacher) runs with the environment's threads, as under ``dvc repro``. The choice
is the plan's, never the timing's, so a rerun of the same targets repeats it. The shapes world's networks are
small, so N one-thread runs side by side get through more work than one run on N threads
(``benchmarks/threads.py`` measures it; docs/pipeline.md quotes it). A float reduction split over another
number of threads rounds differently, so a run's weights and figures depend on its thread count at the
rounding level; every MLflow stage run records it (``dcm.torch_threads``).

Every run's output goes to ``logs/repro/<run>.log``; the console gets one line as each run starts and ends,
the running runs' last progress line every ``--heartbeat`` seconds, and a failed run's last lines. After a
failure no new run starts; the running ones finish (their work is kept) and the exit status is the failed
``dvc repro``'s.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dcm.config import ConfigError, Params
from dcm.pipeline import dag

LOGS = Path("logs/repro")


@dataclass
class Run:
    """One run of the DAG: DVC's name for it (``train_baseline@lcm``), the paths it reads and writes."""

    name: str
    weight: float
    reads: list[str]
    writes: list[str]
    after: set[str] = field(default_factory=set)  # the runs that write what it reads
    downstream: float = 0.0  # its own weight and that of every run after it
    alone: bool = False  # every other run of the plan comes before or after it: nothing can run beside it

    @property
    def log(self) -> Path:
        return LOGS / f"{self.name}.log"


def check_project(params: Params) -> None:
    """A DVC project whose dvc.yaml is the DAG of ``params`` (the stage commands read params.yaml), before
    anything runs."""
    if not Path(".dvc").is_dir():
        raise ConfigError(".dvc", str(Path.cwd()), "a DVC project: run `dvc init` here first")
    written = Path("dvc.yaml").read_text() if Path("dvc.yaml").is_file() else None
    if written != dag.dvc_yaml_text(params):
        raise ConfigError("dvc.yaml", "missing" if written is None else "stale",
                          "the DAG of params.yaml: regenerate it with `python -m dcm.pipeline.dag`")


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def plan(params: Params, targets: Sequence[str] = ()) -> list[Run]:
    """The runs needed for ``targets`` (DVC names; a per-method stage's bare name stands for all its runs;
    none: the whole DAG), with their dependencies, heaviest downstream first."""
    runs: dict[str, Run] = {}
    for stage, method in dag.runs(params):
        resolved = stage.resolve(params, method)
        name = f"{stage.name}@{method}" if method else stage.name
        runs[name] = Run(name, stage.weight, resolved["deps"], resolved["outs"] + resolved["metrics"])
    for run in runs.values():
        run.after = {other.name for other in runs.values() if other is not run and any(
            _within(r, w) or _within(w, r) for r in run.reads for w in other.writes)}

    wanted: set[str] = set()
    for target in targets:
        matched = [n for n in runs if n == target or n.split("@")[0] == target]
        if not matched:
            raise ConfigError("target", target, f"a stage or run of the DAG of params.yaml: {sorted(runs)}")
        wanted.update(matched)
    todo = list(wanted) if targets else list(runs)
    needed: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(runs[name].after)

    chosen = {n: r for n, r in runs.items() if n in needed}
    below: dict[str, set[str]] = {n: set() for n in chosen}  # every run after n (transitively)
    for name in _topological(chosen):
        for before in chosen[name].after:
            below[before] |= {name} | below[name]
    above: dict[str, set[str]] = {n: set() for n in chosen}  # every run before n
    for name, after in below.items():
        for n in after:
            above[n].add(name)
    for name, run in chosen.items():
        run.downstream = run.weight + sum(chosen[n].weight for n in below[name])
        run.alone = len(below[name]) + len(above[name]) + 1 == len(chosen)
    return sorted(chosen.values(), key=lambda r: -r.downstream)


def _topological(runs: dict[str, Run]) -> list[str]:
    """Names with every run after its dependencies, reversed (the sinks first)."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name not in seen:
            seen.add(name)
            for before in runs[name].after:
                visit(before)
            order.append(name)

    for name in runs:
        visit(name)
    return order[::-1]


def default_threads(jobs: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // jobs)


def _last_line(path: Path) -> str:
    """The last progress line of a log (tqdm redraws with carriage returns)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][:120] if lines else ""


def execute(runs: Sequence[Run], jobs: int, threads: int, dvc: str = "dvc", heartbeat: float = 300.0,
            poll: float = 0.5) -> int:
    """Run ``runs`` (:func:`plan`) ``jobs`` at a time; the exit status of the first failed run, else 0."""
    if jobs < 1:
        raise ConfigError("--jobs", jobs, "an integer >= 1")
    if threads < 1:
        raise ConfigError("--threads", threads, "an integer >= 1")
    if shutil.which(dvc) is None and not Path(dvc).is_file():
        raise ConfigError("dvc", dvc, "the dvc executable on PATH (pip install dvc)")
    LOGS.mkdir(parents=True, exist_ok=True)
    shared = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending = {r.name: r for r in runs}
    order = [r.name for r in runs]  # heaviest downstream first
    running: dict[str, tuple[Run, subprocess.Popen, float]] = {}
    done: set[str] = set()
    failed: list[tuple[str, int]] = []
    start, last_beat, total = time.monotonic(), time.monotonic(), len(order)
    print(f"dcm repro: {total} runs, {jobs} at a time, {threads} torch thread(s) each (a run nothing can run "
          f"beside: the environment's); logs in {LOGS}/", flush=True)

    def clock() -> str:
        return time.strftime("%H:%M:%S")

    try:
        while pending or running:
            while not failed and len(running) < jobs:
                ready = [n for n in order if n in pending and pending[n].after <= done]
                if not ready:
                    break
                run = pending.pop(ready[0])
                with run.log.open("w") as log:
                    proc = subprocess.Popen([dvc, "--wait-for-lock", "repro", "--single-item", run.name],
                                            stdout=log, stderr=subprocess.STDOUT,
                                            env=dict(os.environ) if run.alone else shared)
                running[run.name] = (run, proc, time.monotonic())
                how = "alone" if run.alone else f"{threads} thread{'s' * (threads > 1)}"
                print(f"{clock()} [{len(done)}/{total}] start {run.name} ({how})", flush=True)
            if failed and not running:
                break
            if not running:  # nothing can start: a dependency outside the plan never finishes
                raise ConfigError("targets", sorted(pending), "runs whose dependencies are in the DAG")
            time.sleep(poll)
            for name, (run, proc, began) in list(running.items()):
                status = proc.poll()
                if status is None:
                    continue
                del running[name]
                seconds = time.monotonic() - began
                if status == 0:
                    done.add(name)
                    print(f"{clock()} [{len(done)}/{total}] done  {name} in {seconds:.0f} s", flush=True)
                    continue
                print(f"{clock()} FAILED {name} (exit {status}) after {seconds:.0f} s; last lines of "
                      f"{run.log}:", flush=True)
                lines = run.log.read_text(errors="replace").replace("\r", "\n").splitlines()
                print("\n".join("    " + line for line in lines[-25:] if line.strip()), flush=True)
                failed.append((name, status))
                if len(failed) == 1 and running:
                    print(f"dcm repro: no new run starts; waiting for {', '.join(running)}", flush=True)
            if running and time.monotonic() - last_beat >= heartbeat:
                last_beat = time.monotonic()
                for name, (run, _, began) in running.items():
                    print(f"{clock()}   running {name} ({(time.monotonic() - began) / 60:.0f} min): "
                          f"{_last_line(run.log)}", flush=True)
    except KeyboardInterrupt:  # a Ctrl-C reached the runs too (one process group); a signal sent to this
        # process alone is passed on.  Each stage stops, its MLflow run KILLED (dcm.tracking)
        time.sleep(1.0)
        for _, proc, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for _, proc, _ in running.values():
            proc.wait()
        print("dcm repro: interrupted", file=sys.stderr, flush=True)
        return 130
    minutes = (time.monotonic() - start) / 60
    if failed:
        names = ", ".join(name for name, _ in failed)
        print(f"dcm repro: {names} failed; {len(done)} runs done, {total - len(done) - len(failed)} not run "
              f"({minutes:.1f} min)", flush=True)
        return failed[0][1]
    print(f"dcm repro: {len(done)} runs done in {minutes:.1f} min", flush=True)
    return 0
