"""``train_baseline --method lcm|pcm|mcm``: single-model consistency distillation of the teacher.

LCM: one phase, every n ∈ [0, N−1] maps to σ_min, EMA target.  PCM: ``method.phases`` phases with
starts floor(linspace(0, N, K, endpoint=False)), online target.  MCM (``dcm.distill.mcm``): LCM's
phases and target on the shapes world's low-quality videos (noised data + one teacher step), mixed
with the student's own x0, the consistency loss on a motion representation, and an image
discriminator on high-quality stills.  All full-parameter students initialised from the teacher;
weights to ``checkpoints/<method>/transformer`` (diffusers format).
"""

from __future__ import annotations

from dataclasses import asdict

from dcm import distill, paths, schedule
from dcm.config import Params


def run(params: Params, method: str) -> None:
    m = params.method(method)
    distill.check_inputs(params, "online" if m.kind == "mcm" else None)  # MCM distils on videos, not trajectories
    backbone = distill.load_backbone(params)
    student = distill.full_parameter_student(backbone)
    save_weights, space, objectives = distill.save_transformer(student), None, []
    if m.kind == "mcm":
        from dcm.distill import mcm

        videos = distill.make_source(params, backbone, source="online", quality=m.mcm.video_quality)
        source, space, objectives = mcm.build(params, method, backbone, student, videos, distill.device())
    else:
        source = distill.make_source(params, backbone)

    def save(out_dir):
        save_weights(out_dir)
        if space is not None:
            space.save(out_dir)

    spec = distill.DistillSpec(
        name=method, student=student, trainable=list(student.parameters()),
        phases=schedule.pcm_phases(params.grid.steps, m.phases), target=m.target, lr=m.lr,
        train_steps=m.train_steps, objectives=objectives, save=save, consistency_space=space,
        settings={"kind": m.kind, "phases": m.phases, **({"mcm": asdict(m.mcm)} if m.mcm else {})})
    distill.run_distillation(params, "train_baseline", method, spec, backbone, source, paths.checkpoint(method))
