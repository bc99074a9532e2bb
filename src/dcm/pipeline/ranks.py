"""The ranks of a stage on what the user already has: this machine's GPUs, or the SLURM allocation it runs in.

- ``launcher: local`` on a machine with several GPUs: a data-parallel stage (``Stage.data_parallel``) runs
  as one rank per GPU under PyTorch's elastic launcher (``torchrun --standalone --nproc_per_node N -m
  dcm.cli run <stage>``, through ``torch.distributed.run``'s own argument handling); ``DCM_LOCAL_RANKS``
  overrides the count (a CPU machine: gloo ranks).  One process for every other stage, without GPUs,
  and when this process is already one rank of several (torchrun's, an srun step's).
- ``launcher: slurm`` inside an allocation (an sbatch script, an salloc shell: SLURM_JOB_ID without
  SLURM_STEP_ID): the stage runs as a job step of that allocation (``srun``) with the tasks, GPUs and CPUs
  of its row in the resources file, capped by what the allocation holds, instead of a new job (DESIGN.md:
  no nested submission).  Each task maps the step's SLURM variables to torch.distributed's
  (``dcm.distributed.process_group``).

Either way a training stage's layout and global batch are checked at the rank count before any rank
starts (``dcm.parallel.fsdp.check_world``), and the exit status is the stage's: the first failed rank's,
128 + N when this process is stopped by signal N (passed on to every rank, which exits 130/143 with its
MLflow run KILLED).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from dcm.config import ConfigError, Params
from dcm.pipeline import dag

LOCAL_RANKS_ENV = "DCM_LOCAL_RANKS"  # launcher local: ranks of a data-parallel stage (default: one per GPU)
STOP_GRACE_SECONDS = 60.0  # a stopped step's tasks have this long to exit before srun is stopped too
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)  # the elastic agent's own


def run_command(stage: str, method: str | None, params_path: str, preset: str | None) -> list[str]:
    """``dcm run <stage>`` for one rank, with this interpreter (the arguments after ``python``)."""
    return ["-m", "dcm.cli", "run", stage, "--params", params_path,
            *(["--method", method] if method else []), *(["--preset", preset] if preset else [])]


def check_ranks(params: Params, stage, ranks: int) -> None:
    """A training stage's layout (``training.parallel``) and global batch at ``ranks`` ranks, before any
    rank starts: a ConfigError names what does not fit."""
    if stage.trains:
        from dcm.parallel import fsdp

        fsdp.check_world(params, ranks)


def in_ranks() -> bool:
    """This process is already one rank of several (torchrun's WORLD_SIZE, a multi-task srun step)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1


# ------------------------------------------------------------------------ this machine's GPUs


def local_ranks(stage) -> int:
    """Ranks ``launcher: local`` starts for ``stage``: one per GPU torch sees (or ``DCM_LOCAL_RANKS``) for
    a data-parallel stage, one for the others and inside a job that already has its ranks."""
    if not stage.data_parallel or in_ranks():
        return 1
    value = os.environ.get(LOCAL_RANKS_ENV, "")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(LOCAL_RANKS_ENV, value, "a positive integer: the ranks launcher local starts "
                              "for a data-parallel stage (default: one per GPU)")
        return int(value)
    import torch

    return max(torch.cuda.device_count(), 1)  # NVML's count: no CUDA context in this process


def run_elastic(stage: str, method: str | None, params_path: str, preset: str | None, ranks: int) -> int:
    """``dcm run <stage>`` as ``ranks`` processes of this machine under PyTorch's elastic launcher (exactly
    ``torchrun --standalone --nproc_per_node <ranks>``); returns the first failed rank's exit status."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    args = parse_args(["--standalone", "--nproc_per_node", str(ranks),
                       *run_command(stage, method, params_path, preset)])
    print(f"dcm launch: {stage} as {ranks} ranks on this machine (torch.distributed.run --standalone "
          f"--nproc_per_node {ranks})", file=sys.stderr, flush=True)
    # the agent turns SIGINT/SIGTERM/SIGHUP/SIGQUIT into SignalException, sends the signal on to every rank
    # and waits for them; its handlers stay installed after it returns, so this process's come back
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        torchrun(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return 128 - failure.exitcode if failure.exitcode < 0 else failure.exitcode  # killed: 128 + signal
    except SignalException as e:
        print(f"dcm launch: {signal.Signals(e.sigval).name}: every rank stopped", file=sys.stderr)
        return 128 + int(e.sigval)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return 0


# ------------------------------------------------------------------------ the SLURM allocation


@dataclass(frozen=True)
class Allocation:
    """The SLURM job this process runs in, as sbatch/salloc describe it (None: not stated)."""

    job_id: str
    nodes: int
    tasks: int | None  # SLURM_NTASKS: -n/--ntasks(-per-node) of sbatch/salloc
    gpus_per_node: int | None
    cpus_per_node: int | None


def _count(text: str | None) -> int | None:
    """The number in a SLURM count: "4", "a100:4", "gpu:a100:4" → 4; "16(x2),8" → 8 (the smallest node)."""
    if not text:
        return None
    counts = [int(m.group(1)) for part in text.split(",")
              if (m := re.fullmatch(r"(?:[^:]*:)*(\d+)(?:\(x\d+\))?", part.strip()))]
    return min(counts) if counts else None


def allocation(env: dict[str, str] | None = None) -> Allocation | None:
    """The allocation of an sbatch script or an salloc shell; None outside SLURM and inside a job step
    (srun sets SLURM_STEP_ID; a step started from a step would nest)."""
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID") or env.get("SLURM_STEP_ID") is not None:
        return None
    nodes = _count(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")) or 1
    gpus = _count(env.get("SLURM_GPUS_ON_NODE")) or _count(env.get("SLURM_GPUS_PER_NODE"))
    if gpus is None and _count(env.get("SLURM_GPUS")) is not None:  # --gpus: the job's total
        gpus = _count(env["SLURM_GPUS"]) // nodes
    if gpus is None and env.get("SLURM_JOB_GPUS"):  # the batch step's GPU indices
        gpus = len(env["SLURM_JOB_GPUS"].split(","))
    return Allocation(env["SLURM_JOB_ID"], nodes, _count(env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")),
                      gpus, _count(env.get("SLURM_JOB_CPUS_PER_NODE") or env.get("SLURM_CPUS_ON_NODE")))


def in_step(env: dict[str, str] | None = None) -> bool:
    """This process is a task of a job step (srun, Snakemake's jobstep)."""
    env = os.environ if env is None else env
    return bool(env.get("SLURM_JOB_ID")) and env.get("SLURM_STEP_ID") is not None


@dataclass(frozen=True)
class Step:
    """One job step: ``nodes`` × ``tasks_per_node`` ranks of ``cpus`` CPUs each, ``gpus`` per node."""

    nodes: int
    tasks_per_node: int
    cpus: int
    gpus: int
    capped: tuple[str, ...] = ()  # what the allocation held less of than the row asks

    @property
    def ranks(self) -> int:
        return self.nodes * self.tasks_per_node


def step_for(row: dag.Resources, alloc: Allocation, source: str) -> Step:
    """The stage's row (``source``: its file and stage) capped by the allocation: its nodes, GPUs per node
    (one rank per GPU unless the row says ``tasks``), tasks and CPUs; ConfigError where nothing is left."""
    capped = []
    nodes = min(row.nodes, alloc.nodes)
    if nodes < row.nodes:
        capped.append(f"nodes {row.nodes} → {nodes}")
    gpus = row.gpus if alloc.gpus_per_node is None else min(row.gpus, alloc.gpus_per_node)
    if row.gpus and gpus == 0:
        raise ConfigError(f"{source}.gpus", row.gpus,
                          f"GPUs the SLURM allocation {alloc.job_id} holds (it has none): allocate some "
                          "(--gpus-per-node) or run the stage outside the allocation")
    if gpus < row.gpus:
        capped.append(f"GPUs per node {row.gpus} → {gpus}")
    per_node = row.tasks or max(gpus, 1)
    if alloc.tasks is not None and alloc.tasks < nodes * per_node:
        nodes = min(nodes, alloc.tasks)
        per_node = min(per_node, alloc.tasks // nodes)
        capped.append(f"tasks {row.nodes * row.tasks_per_node} → {nodes * per_node} (SLURM_NTASKS "
                      f"{alloc.tasks})")
    cpus = row.cpus_per_task
    if alloc.cpus_per_node is not None and alloc.cpus_per_node < per_node * cpus:
        cpus = alloc.cpus_per_node // per_node
        if cpus < 1:
            raise ConfigError(f"{source}.cpus_per_task", row.cpus_per_task,
                              f"at least one CPU per task: the allocation {alloc.job_id} has "
                              f"{alloc.cpus_per_node} CPUs per node for {per_node} tasks")
        capped.append(f"CPUs per task {row.cpus_per_task} → {cpus}")
    return Step(nodes, per_node, cpus, gpus, tuple(capped))


def srun_command(step: Step, name: str, command: list[str]) -> list[str]:
    """srun for one step of the current allocation: every task runs ``command`` (GPUs per node, not per
    task: each rank picks its own with LOCAL_RANK, as under submitit)."""
    return ["srun", f"--job-name={name}", f"--nodes={step.nodes}", f"--ntasks={step.ranks}",
            f"--ntasks-per-node={step.tasks_per_node}", f"--cpus-per-task={step.cpus}",
            *([f"--gpus-per-node={step.gpus}"] if step.gpus else []),
            "--kill-on-bad-exit=1", *command]


def run_step(params: Params, stage, method: str | None, params_path: str, preset: str | None,
             alloc: Allocation) -> int:
    """``dcm run <stage>`` as a job step of ``alloc`` with the stage's row; srun's exit status (the highest
    task's), or 128 + N when this process is stopped by signal N (sent on to the step's tasks)."""
    path = dag.resources_path()
    step = step_for(dag.load_resources(stage.name, path), alloc, f"{path}:{stage.name}")
    if not stage.data_parallel and step.ranks > 1:  # the other ranks would idle
        step = Step(1, 1, step.cpus, min(step.gpus, 1), step.capped)
    check_ranks(params, stage, step.ranks)
    name = f"dcm-{stage.name}" + (f"-{method}" if method else "") + f"-{os.getpid()}"
    command = srun_command(step, name,
                           [sys.executable, *run_command(stage.name, method, params_path, preset)])
    note = f" (capped by the allocation: {', '.join(step.capped)})" if step.capped else ""
    print(f"dcm launch: {stage.name} as a step of SLURM job {alloc.job_id}, {step.ranks} task(s){note}: "
          f"{' '.join(command[:7])} ...", file=sys.stderr, flush=True)
    # its own session: a terminal's Ctrl-C reaches this process only, which stops the tasks gracefully
    # (srun itself answers SIGINT with a status line and SIGTERM with SIGKILL to the tasks)
    proc = subprocess.Popen(command, start_new_session=True)
    try:
        return proc.wait()
    except (KeyboardInterrupt, SystemExit) as stop:  # SIGINT, SIGTERM (tracking.Terminated: exit 143)
        signum = signal.SIGINT if isinstance(stop, KeyboardInterrupt) else signal.SIGTERM
        _stop_step(alloc.job_id, name, signum, proc)
        return 128 + signum


def _stop_step(job_id: str, name: str, signum: int, proc: subprocess.Popen) -> None:
    """Send ``signum`` to every task of the step named ``name`` (scancel), give them STOP_GRACE_SECONDS to
    exit, then stop srun (which kills what is left)."""
    signame = signal.Signals(signum).name
    try:
        out = subprocess.run(["squeue", "-h", "-s", "-j", job_id, "-o", "%i %j"], capture_output=True,
                             text=True, timeout=30).stdout
        steps = [line.split()[0] for line in out.splitlines() if line.split()[1:] == [name]]
        for step_id in steps:
            subprocess.run(["scancel", f"--signal={signame.removeprefix('SIG')}", step_id], timeout=30)
    except (OSError, subprocess.TimeoutExpired):  # no answer: srun is stopped below, its tasks killed
        steps = []
    print(f"dcm launch: {signame}: sent to step {', '.join(steps) or '(not found)'}", file=sys.stderr,
          flush=True)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:  # the grace period is over, or a second signal came: srun goes, and kills what is left
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
