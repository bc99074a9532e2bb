"""The stage table: one row per DAG stage.  dvc.yaml and the Snakefile are two views of it (a test
holds them equal), ``dcm run <stage>`` dispatches through it, and ``dcm launch`` reads its resources.

Paths may contain ``{method}``; such stages run once per method: every method (``per_method``), or the
methods whose kind declares this stage among those that train it (``trains``; ``dcm.config.METHOD_KINDS``).

The DAG of a params file (:func:`dag_rows`, :meth:`Stage.in_dag`) is the default experiment plus the opt-in
groups its ``pipeline`` section switches on: ``ablations`` (the ablation rows, report_ablations) and
``paper`` (the paper report's rows, mcm_setting, teachers, report_paper).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

from dcm import paths
from dcm.config import METHOD_KINDS, ConfigError, Params
from dcm.paths import weights_paths


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    deps: tuple[str, ...] = ()
    outs: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    params: tuple[str, ...] = ()  # the params.yaml keys the stage reads (DVC re-runs it when they change)
    per_method: bool = False  # one run per method of the comparison
    trains: bool = False  # a training stage: it runs for the methods whose kind it trains (MethodKind.trains)
    data_parallel: bool = False  # runs on every rank of a multi-task job; other stages on rank 0 only
    resumable: bool = False  # picks up its own partial outputs (shards, checkpoints): DVC persists them
    # opt-in: in the DAG only when its group is switched on (params pipeline.<group>; `make ablations`,
    # `make paper`)
    opt_in: Literal["ablations", "paper"] | None = None
    # rough minutes of one run on the shapes world with 2 cores; `dcm repro -j` starts the run with the most
    # of it downstream first (the teachers before the many short student runs)
    weight: float = 0.2

    def methods(self, params: Params, include_ablations: bool = False) -> list[str]:
        """The methods this stage runs for: the default DAG's, or every row with ``include_ablations``
        (the opt-in rows of both groups: ``ablation`` and ``nfe_curve``)."""
        names = params.methods if include_ablations else params.default_methods
        return [m for m in names if self.runs_for(params, m)]

    def dag_methods(self, params: Params) -> list[str]:
        """The methods this stage runs for in the DAG of these params (:func:`dag_rows`)."""
        return [m for m in dag_rows(params) if self.runs_for(params, m)]

    def in_dag(self, params: Params) -> bool:
        """Whether the DAG of these params holds this stage: a stage of the default experiment always, an
        opt-in one when its group is switched on (``pipeline.ablations`` / ``pipeline.paper``)."""
        return self.opt_in is None or getattr(params.pipeline, self.opt_in)

    def runs_for(self, params: Params, method: str) -> bool:
        """A training stage runs for the methods its kind trains there, except those that reuse another
        method's weights (checkpoint_from); the other per-method stages for every method."""
        m = params.methods[method]
        return not self.trains or (self.name in METHOD_KINDS[m.kind].trains and m.checkpoint_from is None)

    def resolve(self, params: Params, method: str | None = None,
                include_ablations: bool = False) -> dict[str, list[str]]:
        """Concrete deps/outs/metrics/params for one run: ``{method}`` and ``{weights}`` filled in; a path
        with ``{each}`` is repeated for every evaluated method of the default DAG (the report's inputs),
        one with ``{ablation}`` for every evaluated ablation row (the ablation report's), one with
        ``{curve}`` for every evaluated NFE-curve row, one with ``{paper}`` for the paper's own rows
        (the paper report's).  ``{row}`` is the params.yaml row that defines the method (a replicate's
        own)."""
        fill = {"method": method or "", "row": params.params_row(method) if method else ""}
        groups = {"{each}": STAGES["evaluate"].methods(params), "{ablation}": ablation_rows(params),
                  "{curve}": curve_rows(params), "{paper}": paper_rows(params)}

        def expand(path: str) -> list[str]:
            for placeholder, rows in groups.items():
                if placeholder in path:
                    return [path.replace(placeholder, m).format(**fill) for m in rows]
            if path == "{weights}":
                return weights_paths(params, method)
            if path in DATA_INPUTS:
                return data_inputs(params, path)
            return [path.format(**fill)]

        return {key: list(dict.fromkeys(p for path in getattr(self, key) for p in expand(path)))
                for key in ("deps", "outs", "metrics", "params")}

    def run(self, params: Params, method: str | None = None) -> None:
        if self.per_method:
            if method is None:
                raise ConfigError("--method", None,
                                  f"stage {self.name} needs one of {self.methods(params, True)}")
            if not self.runs_for(params, method):
                raise ConfigError("--method", method,
                                  f"one of {self.methods(params, True)}: stage {self.name} "
                                  f"does not train {method} (kind {params.method(method).kind!r})")
        elif method is not None:
            raise ConfigError("--method", method, f"stage {self.name} takes no method")
        self.check_inputs(params, method)
        from dcm import distributed  # torch: imported when a stage runs, not for the stage list

        module = importlib.import_module(f"dcm.pipeline.stages.{'train' if self.trains else self.name}")
        # ranks wait in collectives while rank 0 saves: params' distributed.timeout_min, not NCCL's 10 min
        with distributed.process_group(timeout=timedelta(minutes=params.distributed.timeout_min)) as world:
            if world.size > 1 and not self.data_parallel and not world.is_main:
                print(f"{self.name}: rank {world.rank} idle (the stage runs on rank 0 only)")
                return
            if self.trains:
                params = params.with_seed(params.training_seed(method))  # <row>_s<k>: seed + k
            # what draws from global RNGs (head init, GAN noise) repeats too
            distributed.seed_everything(params.seed)
            module.run(*(params, method, self.name) if self.trains else (params, method) if self.per_method
                       else (params,))


    def check_inputs(self, params: Params, method: str | None = None) -> None:
        """Fail before any work when an input of this run is missing, naming the runs that write it.  The
        data files params name are the user's, not a stage's: the pre-flight check and their readers report
        those with their keys."""
        declared = {p for key in DATA_INPUTS for p in data_inputs(params, key)}
        missing = [p for p in self.resolve(params, method)["deps"]
                   if p not in declared and not Path(p).exists() and self.reads(params, method, p)]
        if missing:
            todo = ", ".join(dict.fromkeys(producer(params, p) for p in missing))
            where = f"{self.name} --method {method}" if method else self.name
            raise ConfigError(where, missing, f"existing inputs: run {todo} first")


    def reads(self, params: Params, method: str | None, path: str) -> bool:
        """Whether this run reads ``path``: the trajectory store is read only by a cached batch source
        (``training.source: cached``; MCM trains on the world's videos, DMD2 on its own samples); the
        preprocessed stores only by a real family (the toy's prompt encoder is part of its teacher)."""
        if path == str(paths.PREPROCESSED):
            return params.backbone.family != "toy"
        if path != "trajectories" or not (self.trains or self.name == "analyze"):
            return True
        return (METHOD_KINDS[params.method(method).kind].source if method else None) is None \
            and params.training.source == "cached"


def _own_rows(params: Params) -> list[str]:
    """Every evaluated row written in params.yaml (the rows `paper.seeds` adds left out)."""
    return [m for m in STAGES["evaluate"].methods(params, include_ablations=True)
            if not params.methods[m].replicate_of]


def ablation_rows(params: Params) -> list[str]:
    """The evaluated rows of the opt-in ablation group (``methods.<m>.ablation``): the ablation report's."""
    return [m for m in _own_rows(params) if params.methods[m].ablation]


def curve_rows(params: Params) -> list[str]:
    """The evaluated rows of the opt-in NFE-curve group (``methods.<m>.nfe_curve``): step counts of the
    default methods, beside them in the paper report's curves."""
    return [m for m in _own_rows(params) if params.methods[m].nfe_curve]


def paper_rows(params: Params) -> list[str]:
    """The paper report's rows beyond the default DAG and the curves: ``paper.rows`` and every training
    seed `paper.seeds` added (<row>_s<k>), evaluated rows only."""
    evaluated = STAGES["evaluate"].methods(params, include_ablations=True)
    own = set(STAGES["evaluate"].methods(params)) | set(curve_rows(params))
    wanted = set(params.paper.rows) | {m for m in evaluated if params.methods[m].replicate_of}
    return [m for m in evaluated if m in wanted and m not in own]


def dag_rows(params: Params) -> list[str]:
    """The method rows of the DAG of these params (dvc.yaml, the Snakefile), in params.yaml order: the
    default experiment's; with ``pipeline.ablations`` the ablation rows; with ``pipeline.paper`` the paper
    report's (the NFE-curve rows, paper.rows and their training seeds); and every row whose trained weights
    one of these samples (checkpoint_from)."""
    wanted = set(params.default_methods)
    if params.pipeline.ablations:
        wanted |= set(ablation_rows(params))
    if params.pipeline.paper:
        wanted |= set(curve_rows(params)) | set(paper_rows(params))
    todo = list(wanted)
    while todo:  # a sampling-only row needs the training of the row it reuses
        source = params.methods[todo.pop()].checkpoint_from
        if source is not None and source not in wanted:
            wanted.add(source)
            todo.append(source)
    return [m for m in params.methods if m in wanted]


def switched(params: Params, **groups: bool) -> Params:
    """These params with some ``pipeline`` switches set (``switched(params, paper=True)``)."""
    out = copy.copy(params)
    out.pipeline = dataclasses.replace(params.pipeline, **groups)
    return out


# Params keys that name the user's data files: a stage listing "{key}" among its deps depends on that file
# (a video set: on the folder that holds it, so DVC hashes every video); null: no dependency.
DATA_INPUTS = ("{data.prompts}", "{data.videos}", "{evaluation.prompts}")


def data_inputs(params: Params, placeholder: str) -> list[str]:
    """The files (or folders) behind one of ``DATA_INPUTS`` for these params.  ``data.prompts`` left null
    means the captions of ``data.videos``: the video set is then what the prompts come from."""
    from dcm.data.dataset import dataset_root

    data = params.data
    if placeholder == "{evaluation.prompts}":
        return [params.evaluation.prompts] if params.evaluation.prompts else []
    if placeholder == "{data.prompts}" and data.prompts:
        return [data.prompts]
    return [str(dataset_root(data.videos))] if data.videos else []


def producer(params: Params, path: str) -> str:
    """The ``dcm run`` command whose outputs hold ``path`` (every method, ablation rows included)."""
    for stage in STAGES.values():
        for method in stage.methods(params, include_ablations=True) if stage.per_method else [None]:
            outs = stage.resolve(params, method, include_ablations=True)
            written = [out for key in ("outs", "metrics") for out in outs[key]]
            if any(path == out or path.startswith(f"{out}/") for out in written):
                return f"`dcm run {stage.name}" + (f" --method {method}`" if method else "`")
    return f"the stage that writes {path}"


# The grid keys that fix the teacher's ODE solves (κ only splits the grid between the experts).
TEACHER_GRID = ("grid.steps", "grid.shift", "grid.num_train_timesteps")

STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("prepare", "pre-flight check of the whole DAG; the training and evaluation (prompt, seed) sets",
              deps=("{data.prompts}", "{evaluation.prompts}"), outs=("data/prompts.json",),
              params=("seed", "world", "trajectories.num_trajectories", "backbone.family", "data.prompts",
                      "data.videos", "evaluation.prompts", "evaluation.videos_per_prompt")),
        Stage("teacher", "pretrain the toy teacher by flow matching (real backbones: record the weights)",
              deps=("data/prompts.json",), outs=("models/teacher",),
              params=("seed", "backbone", "world", "teacher", "grid.shift", "grid.num_train_timesteps"),
              weight=23),
        Stage("preprocess", "real backbones: text embeddings and video latents, once, as checksummed shards "
                            "(toy: nothing)",
              deps=("data/prompts.json", "models/teacher", "{data.videos}"), outs=("data/preprocessed",),
              params=("seed", "backbone", "data"), data_parallel=True, resumable=True),
        Stage("trajectories", "teacher ODE solves with guidance, stored as checksummed shards",
              deps=("models/teacher", "data/prompts.json", "data/preprocessed"), outs=("trajectories",),
              data_parallel=True, resumable=True,
              params=("seed", *TEACHER_GRID, "trajectories", "backbone.guidance_scale"), weight=1),
        Stage("analyze",
              "per-timestep loss / grad-norm dynamics of analysis.seeds whole-range students; proposes kappa",
              deps=("models/teacher", "trajectories", "data/preprocessed"), outs=("analysis",),
              params=("seed", "grid", "training", "analysis")),
        Stage("train_baseline", "LCM / PCM consistency distillation; MCM on low-quality videos; DMD2",
              deps=("models/teacher", "trajectories", "data/prompts.json", "data/preprocessed"),
              outs=("checkpoints/{method}",),
              params=("seed", *TEACHER_GRID, "training", "world", "backbone.guidance_scale", "methods.{row}"),
              per_method=True, trains=True, data_parallel=True, resumable=True, weight=1.7),
        Stage("train_seme", "semantic expert: full fine-tune on the high-noise phase + temporal coherence",
              deps=("models/teacher", "trajectories", "data/preprocessed"),
              outs=("checkpoints/{method}/seme",),
              params=("seed", "grid", "training", "methods.{row}.seme"), per_method=True, trains=True,
              data_parallel=True, resumable=True, weight=0.8),
        Stage("train_dete", "detail expert: LoRA + copied timestep layers, GAN + feature matching",
              deps=("models/teacher", "trajectories", "data/preprocessed", "checkpoints/{method}/seme"),
              outs=("checkpoints/{method}/dete",),
              params=("seed", "grid", "training", "methods.{row}.dete"), per_method=True, trains=True,
              data_parallel=True, resumable=True, weight=0.8),
        Stage("sample", "few-step (or teacher) sampling of the shared evaluation (prompt, seed) set",
              deps=("data/prompts.json", "models/teacher", "data/preprocessed", "{weights}"),
              outs=("samples/{method}",),
              params=("seed", "grid", "world", "backbone.guidance_scale", "methods.{row}"),
              per_method=True, data_parallel=True),
        Stage("evaluate", "shapes-bench (or VBench) scores, paired against the teacher",
              deps=("samples/{method}", "samples/teacher"), metrics=("metrics/{method}.json",),
              params=("evaluation", "world"), per_method=True),
        Stage("report", "comparison tables, plots, side-by-side videos; one MLflow parent run",
              deps=("metrics/{each}.json", "samples/{each}", "analysis"), outs=("reports",),
              params=("methods", "tracking")),
        Stage("report_ablations",
              "the paper's ablation rows beside the teacher and DCM (opt-in: `make ablations`)",
              deps=("metrics/{each}.json", "metrics/{ablation}.json"), outs=("ablations",),
              params=("methods", "tracking"), opt_in="ablations"),
        Stage("mcm_setting",
              "MCM in its own setting: the `mcm` preset's teacher (low-quality videos), LCM and MCM "
              "distilled from it, sampled and scored in mcm_setting/ (opt-in: `make paper`)",
              outs=("mcm_setting",),
              params=("seed", "backbone", "world", "grid", "teacher", "trajectories", "training",
                      "evaluation",
                      "methods.teacher", "methods.lcm", "methods.mcm"), resumable=True, opt_in="paper",
              weight=27),
        Stage("teachers",
              "the claims under more teachers (paper.teachers > 1): a teacher trained with seed + k and the "
              "claims' rows distilled from it, sampled and scored in teachers/s<k>/ (opt-in: `make paper`)",
              outs=("teachers",),
              params=("seed", "backbone", "world", "grid", "teacher", "trajectories", "training",
                      "evaluation", "methods", "paper.teachers"), resumable=True, opt_in="paper", weight=45),
        Stage("report_paper",
              "the paper's claims with computed verdicts, quality against NFE, the ablation table, "
              "MCM in its own setting (opt-in: `make paper`)",
              deps=("metrics/{each}.json", "metrics/{paper}.json", "metrics/{curve}.json", "mcm_setting",
                    "teachers"),
              outs=("paper",),
              params=("seed", "evaluation.bootstrap", "methods", "paper", "tracking"), opt_in="paper"),
    ]
}


def get(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError("stage", name, f"one of {list(STAGES)}")
    return STAGES[name]
