"""The DAG views of the stage table: dvc.yaml (generated here), the Snakemake rules (built from the
same table in workflow/rules/stages.smk) and the SLURM resources both launchers read.

``python -m dcm.pipeline.dag`` rewrites dvc.yaml from the table and params.yaml; ``--check`` fails when the
file on disk is stale (a test runs it); ``dcm params ... -o params.yaml`` rewrites it too.  Both views hold
the DAG of the params (``dcm.pipeline.table.dag_rows``): the default experiment, plus the opt-in groups
``pipeline.ablations`` and ``pipeline.paper`` switch on (both off in the default params.yaml, so a bare
``dvc repro`` builds the default experiment only).  Per-method stages become DVC ``foreach`` stages over
the DAG's methods; a stage that gathers methods (the report, the ablation report) depends on each method's
file by name, so ``dvc repro report`` builds the default experiment whatever is switched on.  Regenerate
after changing the method lists or the switches.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from dcm import config
from dcm.config import PIPELINE_GROUPS, ConfigError, Params
from dcm.paths import weights_path
from dcm.pipeline.table import STAGES, Stage, switched

RESOURCES_FILE = Path("slurm/resources.yaml")
RESOURCES_ENV = "DCM_SLURM_RESOURCES"  # another resources file (the local test cluster has no GPUs)
DVC_HEADER = ("# Generated from the stage table (src/dcm/pipeline/table.py) and params.yaml by "
              "`python -m dcm.pipeline.dag`\n"
              "# or `dcm params ... -o params.yaml`; the opt-in stages and rows are in it when params.yaml's "
              "`pipeline` switches them on;\n"
              "# tests/test_orchestration.py holds it equal to the table and to the Snakefile.\n")


# ------------------------------------------------------------------------------------ resources


@dataclass(frozen=True)
class Resources:
    partition: str
    account: str | None
    gpus: int
    gpu_type: str
    nodes: int
    cpus_per_task: int
    mem_gb: float
    time_min: int
    tasks: int = 0  # tasks (ranks) per node; 0: one per GPU, or one for a CPU-only stage

    @property
    def gres(self) -> str | None:
        return f"gpu:{self.gpu_type}:{self.gpus}" if self.gpus else None

    @property
    def tasks_per_node(self) -> int:
        """One task (torch.distributed rank) per GPU, one for CPU-only stages, unless ``tasks`` says."""
        return self.tasks or max(self.gpus, 1)


def resources_path() -> Path:
    return Path(os.environ.get(RESOURCES_ENV) or RESOURCES_FILE)


def load_resources(stage: str, path: str | os.PathLike | None = None) -> Resources:
    """The stage's resources: ``default`` overlaid by the stage's own entry, every key checked."""
    path = Path(path) if path else resources_path()
    if not path.is_file():
        raise ConfigError(RESOURCES_ENV, str(path), "an existing SLURM resources file (slurm/resources.yaml)")
    table = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(table) - set(STAGES) - {"default"})
    if unknown:
        raise ConfigError(f"{path}:{unknown[0]}", table[unknown[0]], f"'default' or a stage: {list(STAGES)}")
    merged = {**(table.get("default") or {}), **(table.get(stage) or {})}
    names = [f.name for f in fields(Resources)]
    for key in sorted(set(merged) - set(names)):
        raise ConfigError(f"{path}:{stage}.{key}", merged[key], f"one of {names}")
    for key in names:
        if key not in merged and key != "tasks":
            raise ConfigError(f"{path}:{stage}.{key}", None, "a value here or under 'default'")
    for key in ("gpus", "nodes", "cpus_per_task", "time_min", "tasks"):
        value = merged.get(key, 0)
        minimum = 0 if key in ("gpus", "tasks") else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"{path}:{stage}.{key}", value, f"an integer >= {minimum}")
    if not isinstance(merged["mem_gb"], (int, float)) or merged["mem_gb"] <= 0:
        raise ConfigError(f"{path}:{stage}.mem_gb", merged["mem_gb"], "a number > 0")
    return Resources(**merged)


def snakemake_resources(stage: str) -> dict:
    """The rule's ``resources:`` for Snakemake's slurm executor (same file as ``dcm launch``).

    A row with more than one task (torch.distributed rank) becomes a Snakemake MPI job: ``mpi`` (srun)
    and ``tasks_per_node`` (or ``tasks``, one per node) make sbatch ask for the task geometry, and the
    jobstep runs the rule's shell line in the batch step instead of wrapping it in ``srun -n1``; the
    line starts the ranks with ``{resources.mpi}`` (workflow/rules/stages.smk).  The executor reads a
    GPU job's ``tasks`` as tasks per GPU, so GPU rows state ``tasks_per_gpu`` where ``tasks`` is used.
    """
    r = load_resources(stage)
    out = {"slurm_partition": r.partition, "runtime": r.time_min, "mem_mb": int(r.mem_gb * 1024),
           "cpus_per_task": r.cpus_per_task, "nodes": r.nodes}
    if r.tasks_per_node * r.nodes > 1:
        # the jobstep strips the job's SLURM_* variables before running the line (and srun takes no CPU
        # count from sbatch's since SLURM 22.05): srun gets the whole geometry
        out["mpi"] = (f"srun --nodes={r.nodes} --ntasks-per-node={r.tasks_per_node} "
                      f"--cpus-per-task={r.cpus_per_task}")
        if r.tasks_per_node > 1:
            out["tasks_per_node"] = r.tasks_per_node
        else:  # one task on each of several nodes
            if r.gpus > 1:
                raise ConfigError(f"{resources_path()}:{stage}.tasks", r.tasks,
                                  f"one task per GPU ({r.gpus}) for a multi-node Snakemake job")
            out["tasks"] = r.nodes
            if r.gpus:
                out["tasks_per_gpu"] = 1
    if r.account:
        out["slurm_account"] = r.account
    if r.gres:
        out["gres"] = r.gres
    return out


# ------------------------------------------------------------------------------------ the runs


def runs(params: Params, every_row: bool = False) -> list[tuple[Stage, str | None]]:
    """Every (stage, method) run in table order: the DAG of these params (dvc.yaml, the Snakefile's rules
    and its ``all``: the default experiment plus the groups ``pipeline`` switches on), or with
    ``every_row`` every run the table knows (every group on)."""
    if every_row:
        params = switched(params, **dict.fromkeys(PIPELINE_GROUPS, True))
    return [(s, m) for s in STAGES.values() if s.in_dag(params)
            for m in (s.dag_methods(params) if s.per_method else [None])]


# ------------------------------------------------------------------------------------ dvc.yaml


def _template(path: str, var: str) -> str:
    return path.replace("{method}", "${" + var + "}").replace("{row}", "${item.row}")


def dvc_stage(stage: Stage, params: Params) -> dict | None:
    """One dvc.yaml entry (a ``foreach`` for per-method stages; None when it runs for no method).

    A per-method stage iterates over a mapping, method → its params.yaml row (``row``: a replicate row
    of `paper.seeds` reads its own row's keys) and, for sampling, the weights it samples from."""
    entry: dict = {}
    if stage.per_method:
        methods = stage.dag_methods(params)
        if not methods:
            return None
        weights = "{weights}" in stage.deps
        entry["foreach"] = {m: {"row": params.params_row(m),
                                **({"weights": weights_path(params, m)} if weights else {})}
                            for m in methods}
        var = "key"
        do: dict = {"cmd": f"dcm launch {stage.name} --method ${{{var}}}"}
    else:
        var = ""
        do = {"cmd": f"dcm launch {stage.name}"}

    if stage.per_method:
        deps = ["${item.weights}" if path == "{weights}" else _template(path, var) for path in stage.deps]
    else:  # a gathering stage lists every method's file by name, so `dvc repro report` stays in its scope
        deps = stage.resolve(params)["deps"]
    if deps:
        do["deps"] = list(dict.fromkeys(deps))
    if stage.params:
        do["params"] = [_template(p, var) for p in stage.params]
    if stage.outs:
        # a resumable stage keeps its outputs when DVC re-runs it (DVC deletes outs first otherwise),
        # so a killed `dvc repro` resumes from the finished shards / the last checkpoint
        do["outs"] = [{_template(p, var): {"persist": True}} if stage.resumable else _template(p, var)
                      for p in stage.outs]
    if stage.metrics:
        do["metrics"] = [{_template(p, var): {"cache": False}} for p in stage.metrics]
    if stage.per_method:
        entry["do"] = do
        return entry
    return do


def dvc_yaml(params: Params) -> dict:
    stages = {}
    for stage in STAGES.values():
        entry = dvc_stage(stage, params) if stage.in_dag(params) else None
        if entry is not None:
            stages[stage.name] = entry
    return {"stages": stages}


def dvc_yaml_text(params: Params) -> str:
    return DVC_HEADER + yaml.safe_dump(dvc_yaml(params), sort_keys=False, width=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcm.pipeline.dag", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--output", default="dvc.yaml")
    parser.add_argument("--check", action="store_true", help="fail if the output file is not up to date")
    args = parser.parse_args(argv)
    text = dvc_yaml_text(config.load(args.params))
    out = Path(args.output)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            print(f"{out} is stale: regenerate it with `python -m dcm.pipeline.dag`", file=sys.stderr)
            return 1
        return 0
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
