"""The dress rehearsal of a real preset on SLURM: the wan preset with its sizes shrunk to a tiny Wan saved by
diffusers' own ``save_pretrained`` (``helpers.shrunk_wan``), ``launcher: slurm`` on the one-node local cluster
(slurm/local-cluster/start.sh), every stage a 2-task job (2 gloo ranks, the preset's FSDP2 layout for the
training stages), through ``dvc repro`` of the default experiment in a scratch git + DVC repo.

- every run ``dcm stages`` lists finishes as one 2-task SLURM job (submitit's log of each task; a stage that
  runs on rank 0 only leaves rank 1 idle);
- a ``sample`` job killed mid-way is requeued and resumes: while ``dvc repro`` runs, a copy of the project's
  sampling inputs samples the teacher through ``dcm launch``; once it has a finished batch its tasks are
  held (SIGSTOP, so the preemption lands mid-way however loaded the machine is), SIGUSR1 goes to the job
  (``scancel --signal=USR1``: submitit requeues it), the tasks continue; the requeued job prints "resuming,
  k/n batches already sampled" and its videos are the uninterrupted ``dvc repro`` run's, bit for bit.  The
  requeue waits out SLURM's credential lifetime (~2 min here), during which ``dvc repro``'s jobs use the node;
- memory: each task's peak RSS (``ru_maxrss`` at exit, recorded by a ``sitecustomize`` the jobs inherit
  through PYTHONPATH) beside the whole-DAG plan's peak per GPU (``dcm.plan.whole.Planner`` on the same rows
  with one GPU per rank).  At this size the two do not measure the same thing: the plan counts the bytes of
  the models and activations a GPU holds (the tiny transformer: 0.26 MB in fp32; the text encoders and the
  VAE at the released sizes, whatever ``backbone.path`` holds), the RSS is a Python process with torch and
  diffusers loaded (~230 MB idle, ~450-520 MB working).  The training stages come out within a few percent
  only because the released Wan VAE's fp32 weights (484 MB, not in the tiny folder) are about what such a
  process holds; preprocess (the released text encoders: 22 GB) and trajectories (0.5 MB) are far off.
  What holds is asserted (the plan sizes the transformer the run loads; the training loop's own peak RSS
  is the probe's); the issue's 20% bar is kept as a strict xfail with the table in its message.  The plan's
  own accuracy is checked where it can be, tensor bytes on CPU: tests/test_memory_plan.py (training, 15%)
  and tests/test_whole_plan.py (inference activations on meta against a real forward).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
import yaml

from dcm import config, paths
from dcm.pipeline import table
from helpers import EVAL_PROMPTS, REPO, VIDEO, cluster_answers, run_dvc, shrunk_wan

BIN = Path(sys.executable).parent
RSS_ENV = "DCM_REHEARSAL_RSS_DIR"
PROBE = f'''"""The rehearsal's probe: every process of a SLURM job records its peak RSS when it exits."""
import os

if os.environ.get("{RSS_ENV}") and os.environ.get("SLURM_JOB_ID"):
    import atexit
    import json
    import resource
    import sys

    def _record():
        record = {{"job": os.environ["SLURM_JOB_ID"], "task": int(os.environ.get("SLURM_PROCID", "0")),
                   "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")), "argv": sys.argv,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}
        name = f"{{record['job']}}-{{record['task']}}-{{os.getpid()}}.json"
        with open(os.path.join(os.environ["{RSS_ENV}"], name), "w") as f:
            json.dump(record, f)

    atexit.register(_record)
'''
TASKS = 2
KEPT_ROWS = ("teacher", "euler4", "dcm")
SAMPLED = "teacher"  # the method whose sample job is preempted: the most forwards a batch (guided, 10 steps)
# on the shrunk preset: 2 FSDP2 data-parallel ranks of one sample each (the preset's global batch 1 is one
# rank's: "more data-parallel ranks cannot give it"); 2 evaluation prompts × 24 = 48 rows, 6 sampling
# batches, 3 per rank; PCM's budget like the other methods'; shapes-bench, the stand-in for VBench (which
# needs its own venv), scores videos of the world's size and length: the tiny Wan's; a rank that waits on a
# failed one gives up after 2 minutes, not the preset's hour
OVERLAY = {
    "launcher": "slurm",
    "world": {"size": VIDEO["width"], "frames": VIDEO["frames"]},
    "training": {"global_batch_size": TASKS},
    "evaluation": {"videos_per_prompt": 24},
    "distributed": {"timeout_min": 2},
}
SUBMITTED = re.compile(r"dcm launch: (dcm-\S+) submitted as SLURM job (\d+) .*?(\d+) task\(s\) per node")
RESUMING = re.compile(r"sample\[\w+\]: resuming, (\d+)/(\d+) batches already sampled")
STAMP = re.compile(r"submitit \w+ \((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\)")
MEMORY_TOLERANCE = 0.20  # the bar: the plan's peak within 20% of the measured CPU peak


pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not cluster_answers(),
    reason="no SLURM cluster answers here: run slurm/local-cluster/start.sh (or set DCM_SLURM_TESTS=1)")]


# ------------------------------------------------------------------------------------ what the run leaves


@dataclass
class Job:
    """One stage run's SLURM job: its tasks' logs and peak RSS."""

    label: str  # stage[method], as the plan names it
    name: str  # the job name `dcm launch` gives it
    job_id: str
    tasks: int  # tasks per node, as `dcm launch` printed it
    logs: dict[int, str] = field(default_factory=dict)  # task → its stdout + stderr
    peak_rss_mb: dict[int, float] = field(default_factory=dict)  # task → ru_maxrss at exit (its last run)

    @property
    def wall_s(self) -> float:
        """Rank 0's first to last submitit log line: the stage's imports, loading and work."""
        from datetime import datetime

        stamps = [datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in STAMP.findall(self.logs.get(0, ""))]
        return (max(stamps) - min(stamps)).total_seconds() if len(stamps) > 1 else float("nan")


@dataclass
class Rehearsal:
    repo: Path  # the dvc repro project
    copy: Path  # the copy whose sample job was preempted
    params: config.Params
    runs: list[tuple[str, str, str | None]]  # (label, stage, method) of every run `dcm stages` lists
    jobs: dict[str, Job]  # label → its job (dvc repro's)
    preempted: Job
    frozen_parts: int  # sampling batches finished when the job's tasks were held
    submitted: int  # jobs `dvc repro` submitted
    repro_s: float
    total_s: float


def _read_logs(folder: Path, job_id: str) -> dict[int, str]:
    logs: dict[int, str] = {}
    for task in range(TASKS):
        text = ""
        for suffix in ("out", "err"):
            f = folder / "slurm" / "logs" / job_id / f"{job_id}_{task}_log.{suffix}"
            text += f.read_text(errors="replace") if f.is_file() else ""
        logs[task] = text
    return logs


def _peaks(rss_dir: Path, job_id: str) -> dict[int, float]:
    """Each task's peak RSS in the job's last run (a requeued job's earlier run is left out)."""
    records = [json.loads(f.read_text()) for f in rss_dir.glob(f"{job_id}-*.json")]
    last = max((r["restart"] for r in records), default=0)
    return {r["task"]: r["peak_rss_mb"] for r in records if r["restart"] == last}


def _job_tasks(job_id: str) -> list[int]:
    """The pids of the job's tasks on this node (its one node): submitit's Python processes, not srun."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        python = Path(os.fsdecode(argv[0])).name.startswith("python")
        if f"SLURM_JOB_ID={job_id}".encode() in environ and python and b"submitit.core._submit" in argv:
            pids.append(int(proc.name))
    return pids


def _pending(pid: int, signum: int) -> bool:
    """``signum`` is pending for ``pid`` (delivered, not yet handled: the process is stopped)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # gone
    masks = [int(line.split()[1], 16) for line in status.splitlines()
             if line.startswith(("SigPnd", "ShdPnd"))]
    return any(mask & (1 << (signum - 1)) for mask in masks)


def _tail(path: Path, chars: int = 6000) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join(line for line in text[-chars:].splitlines() if "Bypassing sacct error" not in line)


def _wait_for(what: str, ready, procs: list[tuple[subprocess.Popen, Path]], timeout: float):
    """Poll ``ready()`` until it is true; fail when a watched process ends first or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := ready()):
        for proc, log in procs:
            assert proc.poll() is None, f"ended (rc {proc.returncode}) before {what}:\n{_tail(log)}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.02)
    return value


def _cancel_jobs_under(root: Path) -> None:
    """scancel what is still queued or running from this test's folders (a failed run leaves nothing)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %Z"], capture_output=True, text=True, timeout=30).stdout
    for line in out.splitlines():
        job_id, _, workdir = line.partition(" ")
        if workdir.startswith(str(root)):
            subprocess.run(["scancel", job_id], timeout=30)


# ------------------------------------------------------------------------------------ the rehearsal


@pytest.fixture(scope="module")
def rehearsal(wan_folder, tmp_path_factory) -> Rehearsal:
    started = time.monotonic()
    root = tmp_path_factory.mktemp("rehearsal")
    repo, copy, rss, probe = root / "project", root / "preempt", root / "rss", root / "probe"
    for folder in (repo, copy, rss, probe):
        folder.mkdir()
    (probe / "sitecustomize.py").write_text(PROBE)
    raw = config.deep_merge(shrunk_wan(wan_folder, root), OVERLAY)
    # the default experiment's rows less the baselines, for half the jobs: the teacher, Euler-4 and DCM keep
    # every stage but train_baseline (the loop train_seme runs, on another method's objective)
    raw["methods"] = {m: row for m, row in raw["methods"].items() if m in KEPT_ROWS}
    raw["paper"]["rows"] = []  # the paper report is off; its rows name the dropped baselines
    (root / "shrunk.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    resources = yaml.safe_load((REPO / "slurm/resources.yaml").read_text())
    row = {"gpus": 0, "cpus_per_task": 1, "mem_gb": 2, "tasks": TASKS, "time_min": 20}
    for name in ("default", *table.STAGES):  # every stage its own 2-task row on the GPU-less node
        resources[name] = {**resources.get(name, {}), **row}
    (root / "resources.yaml").write_text(yaml.safe_dump(resources))

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # never inside an allocation
    env.update(PATH=f"{BIN}:{env['PATH']}", DCM_SLURM_RESOURCES=str(root / "resources.yaml"),
               DCM_TRACKING="off", OMP_NUM_THREADS="1", DVC_NO_ANALYTICS="1", TQDM_MININTERVAL="5",
               PYTHONPATH=os.pathsep.join(p for p in (str(probe), env.get("PYTHONPATH")) if p),
               **{RSS_ENV: str(rss)})
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    run_dvc(repo, "init", "-q")
    subprocess.run([str(BIN / "dcm"), "params", "--params", str(root / "shrunk.yaml"), "-o", "params.yaml"],
                   cwd=repo, env=env, check=True, capture_output=True)
    params = config.load(repo / "params.yaml")
    assert params.launcher == "slurm" and params.training.parallel.strategy == "fsdp"
    listed = subprocess.run([str(BIN / "dcm"), "stages"], cwd=repo, env=env, capture_output=True, text=True,
                            check=True).stdout
    runs = [(f"{stage}[{m}]" if m != "-" else stage, stage, None if m == "-" else m)
            for line in listed.splitlines() if not line.startswith("off:")
            for stage, _, methods in [line.partition(" ")] for m in methods.strip().split(", ") if m]

    repro_log, launch_log = root / "repro.log", root / "launch.log"
    repro = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=repo, env=env, stdout=open(repro_log, "w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    launch = None
    try:
        # the copy: what `sample --method teacher` reads, once `dvc repro` has made it
        _wait_for("the preprocessed store", (repo / paths.PREPROCESS_RECORD).is_file, [(repro, repro_log)],
                  900)
        shutil.copy(repo / "params.yaml", copy / "params.yaml")
        shutil.copytree(repo / "data", copy / "data")
        shutil.copytree(repo / "models", copy / "models")
        launch = subprocess.Popen([str(BIN / "dcm"), "launch", "sample", "--method", SAMPLED], cwd=copy,
                                  env=env, stdout=open(launch_log, "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        watched = [(repro, repro_log), (launch, launch_log)]
        preempt_id = _wait_for("the sample job's id",
                               lambda: (m := SUBMITTED.search(_tail(launch_log, 100000))) and m.group(2),
                               watched, 300)
        parts = copy / paths.SAMPLES / f".{SAMPLED}.parts"
        _wait_for("a finished sampling batch", lambda: list(parts.glob("part-*.json")), watched, 600)
        tasks = _job_tasks(preempt_id)
        for pid in tasks:  # held: the preemption lands before the next batch, however loaded the machine
            os.kill(pid, signal.SIGSTOP)
        try:
            frozen = len(list(parts.glob("part-*.json")))
            assert len(tasks) == TASKS, tasks
            subprocess.run(["scancel", "--signal=USR1", preempt_id], check=True, timeout=60)
            _wait_for("SIGUSR1 at the held tasks", lambda: all(_pending(p, signal.SIGUSR1) for p in tasks),
                      [], 60)
        finally:
            for pid in tasks:
                os.kill(pid, signal.SIGCONT)

        assert repro.wait(timeout=2400) == 0, _tail(repro_log)
        repro_s = time.monotonic() - started
        assert launch.wait(timeout=900) == 0, _tail(launch_log)
    finally:
        for proc in (repro, launch):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
        _cancel_jobs_under(root)

    jobs, submitted = {}, SUBMITTED.findall(repro_log.read_text(errors="replace"))
    for name, job_id, tasks_per_node in submitted:
        label = next((label for label, stage, m in runs if name == f"dcm-{stage}" + (f"-{m}" if m else "")),
                     name)
        jobs[label] = Job(label, name, job_id, int(tasks_per_node), _read_logs(repo, job_id),
                          _peaks(rss, job_id))
    preempted = Job(f"sample[{SAMPLED}]", f"dcm-sample-{SAMPLED}", preempt_id, TASKS,
                    _read_logs(copy, preempt_id), _peaks(rss, preempt_id))
    out = Rehearsal(repo, copy, params, runs, jobs, preempted, frozen, len(submitted), repro_s,
                    time.monotonic() - started)
    print(f"\nrehearsal: dvc repro {out.repro_s:.0f} s, all {out.total_s:.0f} s")
    for job in jobs.values():
        print(f"  {job.label:24s} job {job.job_id:>5s}  {job.tasks} tasks  {job.wall_s:6.1f} s  peak RSS MB "
              + " ".join(f"{t}:{mb:.0f}" for t, mb in sorted(job.peak_rss_mb.items())))
    return out


# ------------------------------------------------------------------------------------ the checks


def test_every_stage_of_the_default_experiment_finishes_as_a_two_task_slurm_job(rehearsal):
    r = rehearsal
    assert len(r.runs) == 14 and {stage for _, stage, _ in r.runs} == {  # train_baseline: no row kept
        "prepare", "teacher", "preprocess", "trajectories", "analyze", "train_seme", "train_dete", "sample",
        "evaluate", "report"}
    assert sorted(label for label, _, _ in r.runs) == sorted(r.jobs), "each run `dcm stages` lists: one job"
    assert r.submitted == len(r.runs), "no run submitted twice"
    for label, stage, _ in r.runs:
        job = r.jobs[label]
        assert job.tasks == TASKS and sorted(job.peak_rss_mb) == list(range(TASKS)), (label, job.peak_rss_mb)
        for task in range(TASKS):
            log = job.logs[task]
            assert f"global_rank={task}({TASKS})" in log, (label, task)
            assert "Job completed successfully" in log, (label, task)
        idle = f"{stage}: rank 1 idle (the stage runs on rank 0 only)" in job.logs[1]
        assert idle != table.get(stage).data_parallel, label  # a rank-0 stage leaves rank 1 idle, no other
    # the stages' own records of their ranks
    assert json.loads((r.repo / paths.PREPROCESS_RECORD).read_text())["ranks"] == TASKS
    for label, stage, method in r.runs:
        if stage in ("train_baseline", "train_seme", "train_dete"):
            expert = None if stage == "train_baseline" else stage.removeprefix("train_")
            m = r.params.method(method)
            steps = (m if expert is None else getattr(m, expert)).train_steps
            summary = json.loads((r.repo / paths.checkpoint(method, expert) / "train.json").read_text())
            assert (summary["world_size"], summary["steps"]) == (TASKS, steps), label
            assert summary["peak_rss_mb"] <= r.jobs[label].peak_rss_mb[0] + 0.1, label  # the loop's record
            layout = summary["parallel"]
            assert (layout["strategy"], layout["dp_shard"]) == ("fsdp", TASKS), label
        if stage == "sample":
            assert f"{len(EVAL_PROMPTS) * 24} videos on {TASKS} rank(s)" in r.jobs[label].logs[0], label
    assert (r.repo / "reports").is_dir() and sorted(p.stem for p in (r.repo / "metrics").glob("*.json")) == \
        sorted(m for _, stage, m in r.runs if stage == "evaluate")


def test_a_preempted_sample_job_is_requeued_and_resumes_to_the_uninterrupted_videos(rehearsal):
    from safetensors.torch import load_file

    r, job = rehearsal, rehearsal.preempted
    first, second = job.logs[0], job.logs[1]
    assert "Caught signal SIGUSR1" in first and "this job is preempted" in first, first[-3000:]
    assert f"Requeued job {job.job_id}" in first and "Not checkpointing nor requeuing" in second
    assert first.count(f"global_rank=0({TASKS})") == 2, "one start, then the requeued one"
    resumed = [(int(k), int(n)) for k, n in RESUMING.findall(first)]
    assert len(resumed) == 1, first[-3000:]
    (k, n), = resumed
    assert n == 6 and 0 < r.frozen_parts <= k < n, (r.frozen_parts, k, n)  # killed mid-way, resumed mid-way
    assert f"{len(EVAL_PROMPTS) * 24} videos on {TASKS} rank(s)" in first
    got, want = r.copy / paths.samples(SAMPLED), r.repo / paths.samples(SAMPLED)
    assert not (r.copy / paths.SAMPLES / f".{SAMPLED}.parts").exists()
    for name in ("latents.safetensors", "videos.safetensors"):
        a, b = load_file(str(got / name)), load_file(str(want / name))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name
    assert json.loads((got / "samples.json").read_text())["rows"] == \
        json.loads((want / "samples.json").read_text())["rows"]
    assert sorted(p.name for p in got.glob("*.mp4")) == sorted(p.name for p in want.glob("*.mp4"))
    assert len(list(got.glob("*.mp4"))) == n * 8


@pytest.fixture(scope="module")
def planned(rehearsal):
    """(label → (the plan's peak bytes per GPU, its parts) for every run the plan sizes, the planner), on the
    rehearsal's rows with one GPU per rank (a ``gpus: 0`` row is not planned)."""
    from dcm.pipeline import launch
    from dcm.plan import whole

    whole.quiet_diffusers()
    planner = whole.Planner(rehearsal.params)
    out = {}
    resources = rehearsal.repo.parent / "resources.yaml"
    for run in launch.stage_runs(rehearsal.params, resources):
        row = replace(run.row, gpus=run.row.ranks // run.row.nodes, gpu_type="h100")
        plan = planner.plan(replace(run, row=row))
        if plan.peak_bytes is not None:
            out[plan.label] = (plan.peak_bytes, plan.memory_parts)
    return out, planner


def test_the_plan_sizes_the_transformer_the_rehearsal_loads(planned, wan_folder):
    """What the plan takes from ``backbone.path``: the transformer's config, so its weights' bytes."""
    from safetensors.torch import load_file

    _, planner = planned
    numel = sum(t.numel() for f in (wan_folder / "transformer").glob("*.safetensors")
                for t in load_file(str(f)).values())
    assert planner.measure.parameters() == numel


@pytest.mark.xfail(strict=True, reason="at the tiny Wan's size the plan's peak (the tensors a GPU holds: a "
                   "0.26 MB transformer, the text encoders and VAE at their released sizes) and a CPU "
                   "process's peak RSS (~450-520 MB of Python, torch and diffusers) measure different things")
def test_the_plans_memory_is_within_20_percent_of_the_measured_cpu_peak(rehearsal, planned):
    rows, misses = [], []
    for label, (peak, parts) in planned[0].items():
        measured = max(rehearsal.jobs[label].peak_rss_mb.values())
        error = peak / 2**20 / measured - 1
        largest = sorted(parts.items(), key=lambda kv: -kv[1])[:2]
        rows.append(f"{label:24s} plan {peak / 2**20:9.1f} MB  measured {measured:6.0f} MB  {error:+8.1%}  "
                    + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in largest))
        if abs(error) > MEMORY_TOLERANCE:
            misses.append(label)
    assert not misses, "\n".join(rows)
