"""``train_baseline --method lcm|pcm|mcm|dmd2``: single-model distillation of the teacher.

LCM: one phase, every n ∈ [0, N−1] maps to σ_min, EMA target.  PCM: ``method.phases`` phases with
starts floor(linspace(0, N, K, endpoint=False)), online target.  MCM (``dcm.distill.mcm``): LCM's
phases and target on the shapes world's low-quality videos (noised data + one teacher step), mixed
with the student's own x0, the consistency loss on a motion representation, and an image
discriminator on high-quality stills.  DMD2 (``dcm.distill.dmd2``): a generator at the row's sampling
steps, fed by backward simulation of its own samples, trained by distribution matching against the
guided teacher with an online fake score (no consistency loss).  All full-parameter students
initialised from the teacher; weights to ``checkpoints/<method>/transformer`` (diffusers format).
"""

from __future__ import annotations

from dataclasses import asdict

from dcm import distill, paths, schedule
from dcm.config import Params


def run(params: Params, method: str) -> None:
    m = params.method(method)
    # MCM distils on videos and DMD2 on its own samples (prompts only): neither reads the trajectories
    distill.check_inputs(params, "online" if m.kind in ("mcm", "dmd2") else None)
    backbone = distill.load_backbone(params)
    student = distill.full_parameter_student(backbone)
    save_weights, space, objectives = distill.save_transformer(student), None, []
    phases, target = schedule.pcm_phases(params.grid.steps, m.phases), m.target
    if m.kind == "mcm":
        from dcm.distill import mcm

        videos = distill.make_source(params, backbone, source="online", quality=m.mcm.video_quality)
        source, space, objectives = mcm.build(params, method, backbone, student, videos, distill.device())
    elif m.kind == "dmd2":
        from dcm.distill import dmd2
        from dcm.methods import schedule_for

        # the generator's timesteps are the row's sampling steps; no target network (no consistency loss)
        source, space, objectives, phases = dmd2.build(params, method, backbone, student,
                                                       schedule_for(params, method), distill.device())
        target = "online"
    else:
        source = distill.make_source(params, backbone)

    def save(out_dir):
        save_weights(out_dir)
        if m.kind == "mcm":
            space.save(out_dir)  # MCM's learnt motion head

    spec = distill.DistillSpec(
        name=method, student=student, trainable=list(student.parameters()),
        phases=phases, target=target, lr=m.lr, train_steps=m.train_steps, objectives=objectives, save=save,
        consistency_space=space,
        settings={"kind": m.kind, "phases": m.phases, **({"mcm": asdict(m.mcm)} if m.mcm else {}),
                  **({"dmd2": asdict(m.dmd2)} if m.dmd2 else {})})
    distill.run_distillation(params, "train_baseline", method, spec, backbone, source, paths.checkpoint(method))
