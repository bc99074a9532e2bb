"""``teachers``: the paper's claims under more teachers (``paper.teachers`` > 1, ``make paper``).

Every verdict of one project is conditional on its one teacher: the hierarchical bootstrap draws the
evaluation rows and the students' training seeds, never the teacher's (docs/evaluation.md, "What the
intervals do not cover").  For k = 1 … ``paper.teachers`` − 1 this stage trains another teacher with seed
``seed`` + k in ``teachers/s<k>/`` and runs there, with this file's settings and seed otherwise (the same
prompts, evaluation rows and students' seeds): trajectories, the claims' rows (report_paper's ``CLAIMS``
and ``COMPARISONS``, and the Euler rows their controls use) distilled from that teacher, sampled and
scored.  ``report_paper`` then pools every claim over the teachers (``verdicts.teacher_pooled_difference``:
each student against its own teacher's rows).  Each folder is resumable (``dcm.pipeline.subproject``).
With ``paper.teachers: 1`` it writes only ``teachers/progress.json``.
"""

from __future__ import annotations

import shutil

from dcm import io, paths
from dcm.config import Params
from dcm.pipeline import subproject

TRAINING = ("train_baseline", "train_seme", "train_dete")


def claim_rows(params: Params) -> list[str]:
    """The rows the claims, their comparisons and their controls read (the teacher-50 among them: every row
    is scored against it), in params.yaml's order."""
    from dcm.pipeline.stages.report_paper import CLAIMS, COMPARISONS, TEACHER, euler_rows

    named = {TEACHER, *(m for c in (*CLAIMS, *COMPARISONS) for m in (c.a, c.b))} & set(params.methods)
    euler = euler_rows(params)  # the controls: Euler at each claim row's step count
    named |= {euler[k] for k in (params.methods[m].sample_steps for m in named) if k in euler}
    return [m for m in params.methods if m in named and not params.methods[m].replicate_of]


def teacher_params(params: Params, k: int) -> tuple[Params, Params]:
    """(the folder's params, its teacher stage's): the claims' rows, one training seed each, this file's
    seed; the teacher trains with ``seed`` + k."""
    from dcm import config

    config.check_teachers(params)
    sub = config.parse(subproject.reduced(params, claim_rows(params)))
    return sub, sub.with_seed(params.seed + k)


def runs(sub: Params) -> list[tuple[str, str | None]]:
    """prepare, teacher, trajectories, each row's trainings, then every row sampled and scored (the
    teacher first: the others are scored against it)."""
    from dcm.pipeline.table import STAGES

    trainings = [(s, m) for m in sub.methods for s in TRAINING if STAGES[s].runs_for(sub, m)]
    return [("prepare", None), ("teacher", None), ("trajectories", None), *trainings,
            *(("sample", m) for m in sub.methods), *(("evaluate", m) for m in sub.methods)]


def run(params: Params) -> None:
    paths.TEACHERS.mkdir(exist_ok=True)
    for stale in paths.TEACHERS.glob("s*"):  # teachers a larger paper.teachers left behind
        if stale.is_dir() and stale.name[1:].isdigit() and int(stale.name[1:]) >= params.paper.teachers:
            print(f"teachers: {stale}/ is beyond paper.teachers ({params.paper.teachers}): removed")
            shutil.rmtree(stale)
    io.write_json_atomic(paths.TEACHERS / subproject.PROGRESS, {"teachers": params.paper.teachers})
    for k in range(1, params.paper.teachers):
        sub, teacher = teacher_params(params, k)
        key = subproject.fingerprint(sub, f"teacher seed {teacher.seed}")
        subproject.run(paths.teacher_folder(k), key, runs(sub),
                       lambda stage, sub=sub, teacher=teacher: teacher if stage == "teacher" else sub,
                       f"teachers s{k}", f"teacher seed {teacher.seed}", {"teacher_seed": teacher.seed})
    print(f"teachers: {params.paper.teachers} in all"
          + (f", {paths.TEACHERS}/s1..s{params.paper.teachers - 1}/metrics/" if params.paper.teachers > 1
             else " (the main one; paper.teachers: 1)"))
