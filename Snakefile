# The DAG as Snakemake rules: the same stage table as dvc.yaml (src/dcm/pipeline/table.py).
#   snakemake --cores 2                                  # locally (or --profile workflow/profiles/local)
#   snakemake --profile workflow/profiles/slurm          # each rule a SLURM job (slurm/resources.yaml)
from snakemake.utils import validate

configfile: "params.yaml"
validate(config, "workflow/schemas/params.schema.json")

include: "workflow/rules/stages.smk"

rule all:
    input: dag_targets()
    default_target: True
