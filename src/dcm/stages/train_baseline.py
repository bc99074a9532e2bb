"""``train_baseline --method lcm|pcm``: single-model consistency distillation of the teacher.

LCM: one phase, every n ∈ [0, N−1] maps to σ_min, EMA target.  PCM: ``method.phases`` phases with
starts floor(linspace(0, N, K, endpoint=False)), online target.  Both full-parameter students
initialised from the teacher; weights to ``checkpoints/<method>/transformer`` (diffusers format).
"""

from __future__ import annotations

from dcm import distill, paths, schedule
from dcm.config import Params


def run(params: Params, method: str) -> None:
    m = params.method(method)
    distill.check_inputs(params)
    backbone = distill.load_backbone(params)
    source = distill.make_source(params, backbone)
    student = distill.full_parameter_student(backbone)
    spec = distill.DistillSpec(
        name=method, student=student, trainable=list(student.parameters()),
        phases=schedule.pcm_phases(params.grid.steps, m.phases), target=m.target, lr=m.lr,
        train_steps=m.train_steps, save=distill.save_transformer(student),
        settings={"kind": m.kind, "phases": m.phases})
    distill.run_distillation(params, "train_baseline", method, spec, backbone, source, paths.checkpoint(method))
