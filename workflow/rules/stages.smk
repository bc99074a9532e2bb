# One rule per stage of the stage table, each one `dcm run <stage> [--method M]` shell line;
# input/output from Stage.resolve, resources from slurm/resources.yaml (dcm.pipeline.dag.snakemake_resources).
# The rules are the DAG of params.yaml (dcm.pipeline.table.dag_rows): the default experiment plus the opt-in
# groups its `pipeline` section switches on, as dvc.yaml; per-method stages take the method as a wildcard
# constrained to the DAG's methods.
from dcm import config as dcm_config
from dcm.pipeline import dag as dcm_dag
from dcm.pipeline.table import STAGES

PARAMS = dcm_config.parse(config)


def _is_dir(path):
    return not path.endswith((".json", ".yaml", ".txt", ".csv"))


def _outputs(stage):
    pattern = {"method": "{method}"} if stage.per_method else {}
    paths = [p.format(**pattern) if pattern else p for p in stage.outs + stage.metrics]
    return [directory(p) if _is_dir(p) else p for p in paths]


def _inputs(stage):
    if stage.per_method:
        return lambda wildcards: STAGES[stage.name].resolve(PARAMS, wildcards.method)["deps"]
    return stage.resolve(PARAMS)["deps"]


def dag_targets():
    """Every output of the DAG (the Snakefile's `all`, as a bare `dvc repro`); `snakemake report` builds the
    default experiment only."""
    targets = []
    for stage, method in dcm_dag.runs(PARAMS):
        resolved = stage.resolve(PARAMS, method)
        targets += resolved["outs"] + resolved["metrics"]
    return targets


for _stage in STAGES.values():
    if not _stage.in_dag(PARAMS) or (_stage.per_method and not _stage.dag_methods(PARAMS)):
        continue
    _resources = dcm_dag.snakemake_resources(_stage.name)
    rule:
        name: _stage.name
        input: _inputs(_stage)
        output: _outputs(_stage)
        wildcard_constraints:
            method="|".join(_stage.dag_methods(PARAMS)) if _stage.per_method else ".+"
        resources: **_resources
        params:  # bound now: a loop's shell string would see the last stage
            stage=_stage.name,
            method=(lambda w: f" --method {w.method}") if _stage.per_method else "",
            # a multi-task row (resources `mpi`): inside its SLURM job, srun starts one `dcm run` per task
            # and each maps SLURM's variables to torch.distributed's (dcm.distributed.process_group); run
            # outside SLURM (snakemake --cores N) the line is one process, as every other rule's
            ranks=f"${{SLURM_JOB_ID:+{_resources['mpi']}}} " if "mpi" in _resources else "",
        shell: "{params.ranks}dcm run {params.stage}{params.method}"
