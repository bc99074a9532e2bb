"""``train_seme --method dcm``: the semantic expert.

Full-parameter student initialised from the teacher, trained on the high-noise phase
n ∈ [κ+1, N−1] ending at σ_κ with the online target, plus the temporal coherence loss
(``seme.tc_weight``, frame offset ``seme.tc_offset``).  Weights to
``checkpoints/<method>/seme/transformer`` (diffusers format).
"""

from __future__ import annotations

from dcm import distill, paths, schedule
from dcm.config import ConfigError, Params


def run(params: Params, method: str) -> None:
    seme = params.method(method).seme
    if seme is None:
        raise ConfigError(f"methods.{method}.seme", None, "an expert config (train_steps, lr, tc_weight, …)")
    distill.check_inputs(params)
    backbone = distill.load_backbone(params)
    source = distill.make_source(params, backbone)
    student = distill.full_parameter_student(backbone)
    objectives = [distill.TemporalCoherence(seme.tc_weight, seme.tc_offset)] if seme.tc_weight > 0 else []
    spec = distill.DistillSpec(
        name=f"{method}/seme", student=student, trainable=list(student.parameters()),
        phases=[schedule.expert_phases(params.grid.steps, params.grid.kappa)["seme"]], target="online",
        lr=seme.lr, train_steps=seme.train_steps, objectives=objectives, save=distill.save_transformer(student),
        settings={"tc_weight": seme.tc_weight, "tc_offset": seme.tc_offset})
    distill.run_distillation(params, "train_seme", method, spec, backbone, source, paths.checkpoint(method, "seme"))
