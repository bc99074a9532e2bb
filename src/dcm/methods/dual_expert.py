"""``kind: dcm``: the Dual-Expert Consistency Model (arXiv 2506.03123).

- ``train_seme``: SemE, a full-parameter student initialised from the teacher (a two-expert teacher's
  high-noise expert), on the high-noise phase
  n ∈ [κ+1, N−1] ending at σ_κ, online target, plus the temporal coherence loss (``seme.tc_weight``,
  frame offset ``seme.tc_offset``).  Weights to ``checkpoints/<m>/seme/transformer`` (diffusers format).
- ``train_dete``: DetE built from the trained SemE (a two-expert teacher: from its low-noise expert),
  LoRA (``dete.lora_rank``, ``dete.lora_alpha``) + copied
  timestep layers (rank 0: a full copy, the +OD ablation), on the low-noise phase n ∈ [0, κ] ending at
  σ_min, online target, plus the GAN hinge (``dete.gan_weight``) and feature matching (``dete.fm_weight``)
  on frozen-teacher features, with the adversarial variants of ``dete`` (``dcm.distill.discriminator``).
  Writes ``checkpoints/<m>/dete/`` (adapter/, timestep_layers.safetensors, expert.json, train.json).
- Sampling: Euler on the κ-split schedule, SemE's steps then DetE's.
"""

from __future__ import annotations

from pathlib import Path

from dcm import distill, io, paths
from dcm.backbones import load_teacher
from dcm.backbones.base import Backbone
from dcm.config import ConfigError, Params
from dcm.distill.discriminator import check_variants, dete_objective, discriminator_summary
from dcm.distill.experts import ADAPTER_DIR, FULL_DIR, load_dual_expert, make_dete, save_dete
from dcm.distill.loop import HISTORY_FILE
from dcm.methods import Training, schedule_for
from dcm.methods.export import export_dual_expert
from dcm.sampling import Velocity, student_velocity
from dcm.schedule import boundary_index, expert_phases, expert_schedule

VARIANT_DEFAULTS = {"disc_warmup": 0, "disc_steps": 1, "hinge_margin": None, "real": "target"}


def schedule(params: Params, method: str):
    return expert_schedule(params.teacher_grid(), params.grid.kappa, params.method(method).sample_steps)


def dcm_experts(params: Params, method: str, backbone: Backbone, merged: bool | None = None
                ) -> dict[str, Velocity]:
    """SemE and DetE of a dcm-kind method (checkpoint_from honoured) as velocity functions.

    merged (default: ``methods.<m>.merge_experts``): each name is its expert as a plain transformer
    (``materialize``: DetE's LoRA merged into a copy), so a step costs one forward of an ordinary
    model.  Otherwise both names map to the same ``DualExpert``, which routes every sample by its own
    σ through σ_κ: one set of weights in memory.
    """
    source = params.method(method).checkpoint_from or method
    dual = load_dual_expert(paths.checkpoint(source, "seme"), paths.checkpoint(source, "dete"), backbone)
    if params.method(method).merge_experts if merged is None else merged:
        return {e: student_velocity(backbone, dual.materialize(e).eval().requires_grad_(False))
                for e in ("seme", "dete")}
    velocity = student_velocity(backbone, dual)
    return {"seme": velocity, "dete": velocity}


def velocities(params: Params, method: str, backbone: Backbone, merged: bool | None = None):
    return dcm_experts(params, method, backbone, merged), {}


def train(params: Params, method: str, stage: str) -> Training:
    return {"train_seme": _seme, "train_dete": _dete}[stage](params, method)


def boundary_notice(params: Params, backbone: Backbone, stage: str, method: str) -> None:
    """A two-expert teacher with κ off its boundary is allowed (each teacher step picks its expert by t);
    say so, once per stage."""
    if not backbone.two_experts:
        return
    at = boundary_index(params.teacher_grid(), backbone.transformer.boundary_t)
    if params.grid.kappa != at:
        print(f"{stage}[{method}]: grid.kappa = {params.grid.kappa} is not the teacher's boundary on this "
              f"grid (κ = {at}): the teacher's steps pick their expert by t, so a phase runs both experts")


def _seme(params: Params, method: str) -> Training:
    seme = params.method(method).seme
    backbone = distill.load_backbone(params)
    boundary_notice(params, backbone, "train_seme", method)
    source = distill.make_source(params, backbone)
    student = distill.full_parameter_student(backbone, "seme")
    objectives = [distill.TemporalCoherence(seme.tc_weight, seme.tc_offset)] if seme.tc_weight > 0 else []
    spec = distill.DistillSpec(
        name=f"{method}/seme", student=student, trainable=list(student.parameters()),
        phases=[expert_phases(params.grid.steps, params.grid.kappa)["seme"]], target="online",
        lr=seme.lr, train_steps=seme.train_steps, objectives=objectives,
        save=distill.save_transformer(student),
        settings={"tc_weight": seme.tc_weight, "tc_offset": seme.tc_offset},
        prompt_dropout=params.prompt_dropout(method, "seme"))
    return Training(spec, backbone, source, paths.checkpoint(method, "seme"))


def variant_settings(dete) -> dict:
    """The adversarial variants that differ from the paper's defaults: part of the resume identity (a default
    run's identity, and so its resume state, stays what it was before the variants existed)."""
    return {k: getattr(dete, k) for k, default in VARIANT_DEFAULTS.items() if getattr(dete, k) != default}


def _dete(params: Params, method: str) -> Training:
    dete = params.method(method).dete
    check_variants(dete, params.training, f"methods.{method}.dete")  # before anything loads
    grid, kappa = params.teacher_grid(), params.grid.kappa
    backbone = distill.load_backbone(params)
    boundary_notice(params, backbone, "train_dete", method)
    source = distill.make_source(params, backbone)
    seme_class = type(backbone.expert_transformer("seme"))
    seme = seme_class.from_pretrained(paths.checkpoint(method, "seme") / FULL_DIR)
    dual = make_dete(seme.to(distill.device()), backbone, dete.lora_rank, dete.lora_alpha, kappa=kappa,
                     sigma_kappa=grid.sigma(kappa))
    adversarial = dete_objective(backbone, dete, grid, kappa, params.training, student=dual,
                                 trainable=dual.trainable_parameters())
    objectives = [adversarial] if adversarial is not None else []
    if adversarial is not None:
        source = adversarial.watch_source(source)  # real="trajectory": remembers each batch's trajectories
    spec = distill.DistillSpec(
        name=f"{method}/dete", student=dual, trainable=dual.trainable_parameters(),
        phases=[expert_phases(params.grid.steps, kappa)["dete"]], target="online", lr=dete.lr,
        train_steps=dete.train_steps, objectives=objectives, save=lambda out: save_dete(dual, out),
        settings={"lora_rank": dete.lora_rank, "lora_alpha": dete.lora_alpha, "gan_weight": dete.gan_weight,
                  "fm_weight": dete.fm_weight, "disc_lr": dete.disc_lr, **variant_settings(dete)},
        prompt_dropout=params.prompt_dropout(method, "dete"))
    out_dir = paths.checkpoint(method, "dete")
    return Training(spec, backbone, source, out_dir,
                    finish=lambda: _summarize_dete(method, dete, dual, kappa, bool(objectives), out_dir))


def _summarize_dete(method: str, dete, dual, kappa: int, adversarial: bool, out_dir) -> None:
    """train.json (the loop's) also names the expert's size against one backbone, the adversarial variants
    in force and the discriminator's summary (a warning when it stayed at chance)."""
    summary = io.read_json(out_dir / "train.json")
    counts = dual.parameter_counts()
    summary.update(counts, lora_rank=dete.lora_rank, lora_alpha=dete.lora_alpha, kappa=kappa)
    rows = io.read_jsonl(out_dir / HISTORY_FILE)
    disc = discriminator_summary(rows) if adversarial else None
    if variant_settings(dete):  # the variants in force, and (when gated) the first step G's hinge was on
        summary["adversarial_variants"] = variant_settings(dete)
        if any("gan/g_hinge_on" in r for r in rows):
            gated = [r["step"] for r in rows if r.get("gan/g_hinge_on") == 1.0]
            summary["adversarial_variants"]["hinge_on_from_step"] = gated[0] if gated else None
    if disc is not None:
        summary["discriminator"] = disc
        if disc["at_chance"]:
            print(f"train_dete[{method}]: warning: the discriminator stayed at chance over steps "
                  f"{disc['steps'][0]}-{disc['steps'][1]} (mean hinge D loss {disc['d_loss']:.3f}, "
                  f"D(real) - D(fake) = {disc['real_minus_fake']:+.4f}): the GAN term gave DetE no real/fake "
                  f"signal; compare with a gan_weight 0 run (methods.{method}.dete)")
    io.write_json_atomic(out_dir / "train.json", summary)
    print(f"train_dete[{method}]: {counts['dete_trainable_params']} trainable parameters = "
          f"{100 * counts['dete_trainable_fraction_of_backbone']:.2f}% of the backbone")


def export(params: Params, method: str, out: str | Path | None = None) -> Path:
    """``dcm export --method M --out DIR``: the trained dual expert of M with the schedule it samples with
    (default out: export/<method>), a folder the stock diffusers pipeline and peft load."""
    source = params.method(method).checkpoint_from or method
    seme_dir, dete_dir = paths.checkpoint(source, "seme"), paths.checkpoint(source, "dete")
    for folder, stage in ((seme_dir / FULL_DIR, "train_seme"), (dete_dir, "train_dete")):
        if not folder.exists():
            raise ConfigError(f"methods.{method}", str(folder),
                              f"trained weights: run `dcm run {stage} --method {source}`")
    if not ((dete_dir / ADAPTER_DIR).is_dir() or (dete_dir / FULL_DIR).is_dir()):
        raise ConfigError(f"methods.{method}", str(dete_dir), "a DetE folder with adapter/ or transformer/")
    backbone = load_teacher(params, paths.TEACHER)
    dual = load_dual_expert(seme_dir, dete_dir, backbone)
    teacher = getattr(backbone, "path", None) or Path(paths.TEACHER).resolve()
    return export_dual_expert(dual, schedule_for(params, method),
                              paths.EXPORT / method if out is None else out,
                              method, backbone=backbone, teacher=teacher)
