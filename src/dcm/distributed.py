"""The ranks of a (multi-node) job, kept thin: who I am, the process group, small collectives.

The launcher (submitit on SLURM, ``torchrun`` or ``accelerate launch``) sets torch.distributed's
``env://`` variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); ``process_group``
opens the group for one stage (NCCL with GPUs, gloo on CPU).  How the models are spread over the
ranks (FSDP2, HSDP, DDP: ``training.parallel``) is ``dcm.parallel``'s; rank 0 alone logs and writes
the stage's outputs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    import submitit


PORT_BASE, PORT_SPAN = 20000, 20000  # MASTER_PORT = PORT_BASE + job_id % PORT_SPAN


@dataclass(frozen=True)
class World:
    rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's rank and the number of ranks (rank 0 of 1 until ``process_group`` opened a group)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World(0, 1)


def is_main() -> bool:
    return world().is_main


def distributed_env(job_env: submitit.JobEnvironment) -> dict[str, str]:
    """torch.distributed's env:// variables for this task of a (multi-node, multi-GPU) job.

    Rank 0's host is the master; the port is derived from the job id so that two jobs sharing a
    node do not collide and every task of one job agrees without talking.
    """
    job_id = str(job_env.job_id).split("_")[0]
    digits = "".join(ch for ch in job_id if ch.isdigit()) or "0"
    tasks_per_node = max(job_env.num_tasks // max(job_env.num_nodes, 1), 1)
    return {
        "MASTER_ADDR": job_env.hostnames[0],
        "MASTER_PORT": str(PORT_BASE + int(digits) % PORT_SPAN),
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "LOCAL_WORLD_SIZE": str(tasks_per_node),
        "NODE_RANK": str(job_env.node),
    }


@contextmanager
def process_group(timeout: timedelta | None = None) -> Iterator[World]:
    """Open the process group when the environment names more than one rank (and close it after).
    ``timeout``: how long a rank waits in one collective before it fails (None: torch's default, 10 min
    for NCCL); the stages pass params' ``distributed.timeout_min``."""
    # a multi-task srun step not started by submitit (a Snakemake rule's srun); not a batch script, whose
    # SLURM_NTASKS is the job's while it runs as one process
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1 \
            and "SLURM_PROCID" in os.environ:
        from submitit.slurm.slurm import SlurmJobEnvironment  # submitit's reading of SLURM's variables

        # Snakemake's jobstep drops the job's SLURM_* variables before the rule's srun; srun sets the step's
        os.environ.setdefault("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_STEP_NUM_NODES", "1"))
        os.environ.update(distributed_env(SlurmJobEnvironment()))
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or dist.is_initialized():
        yield world()
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={size} but {missing} are not set: launch through `dcm launch` "
                           "(submitit), torchrun or accelerate")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    try:
        yield world()
    except BaseException:
        # a failing rank leaves at once with its error: a barrier here would wait, until the timeout, on
        # ranks blocked in a collective it never reaches, and hold its traceback back that long
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()


def barrier() -> None:
    if world().size > 1:
        dist.barrier()


def parameter_digest(params: Iterable[torch.Tensor]) -> str:
    """sha256 of the parameters' bytes: equal on every rank iff the ranks hold the same weights.  Reads
    one tensor at a time, so a generator of gathered tensors holds one full tensor at a time."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def gather_objects(value) -> list:
    """``value`` of every rank, in rank order (just ``[value]`` outside a distributed job)."""
    if world().size <= 1:
        return [value]
    out: list = [None] * world().size
    dist.all_gather_object(out, value)
    return out


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators from ``params.seed``: a stage run twice, in any
    process (dvc, Snakemake, a SLURM job), computes the same thing."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
