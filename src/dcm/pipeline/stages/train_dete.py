"""``train_dete --method dcm``: the detail expert.

DetE is built from the trained SemE (``checkpoints/<method>/seme``): LoRA (``dete.lora_rank``,
``dete.lora_alpha``) + copied timestep layers, or a full copy with rank 0 (the +OD ablation).  It
trains on the low-noise phase n ∈ [0, κ] ending at σ_min with the online target, plus the GAN hinge
when ``dete.gan_weight > 0`` and feature matching when ``dete.fm_weight > 0`` (each on its own), on
frozen-teacher features, with the adversarial variants of ``dete`` (``disc_warmup``, ``disc_steps``,
``hinge_margin``, ``real``; ``dcm.distill.discriminator``).  Writes
``checkpoints/<method>/dete/`` (adapter/, timestep_layers.safetensors, expert.json, train.json).
"""

from __future__ import annotations

from dcm import distill, io, paths, schedule
from dcm.config import ConfigError, Params
from dcm.distill.discriminator import check_variants, dete_objective, discriminator_summary
from dcm.distill.experts import FULL_DIR, make_dete, save_dete
from dcm.distill.loop import HISTORY_FILE

VARIANT_DEFAULTS = {"disc_warmup": 0, "disc_steps": 1, "hinge_margin": None, "real": "target"}


def variant_settings(dete) -> dict:
    """The adversarial variants that differ from the paper's defaults: part of the resume identity (a default
    run's identity, and so its resume state, stays what it was before the variants existed)."""
    return {k: getattr(dete, k) for k, default in VARIANT_DEFAULTS.items() if getattr(dete, k) != default}


def run(params: Params, method: str) -> None:
    dete = params.method(method).dete
    if dete is None:
        raise ConfigError(f"methods.{method}.dete", None, "an expert config (train_steps, lr, lora_rank, …)")
    check_variants(dete, params.training, f"methods.{method}.dete")  # before anything loads
    distill.check_inputs(params)
    seme_dir = paths.checkpoint(method, "seme") / FULL_DIR
    grid = params.teacher_grid()
    kappa = params.grid.kappa

    backbone = distill.load_backbone(params)
    source = distill.make_source(params, backbone)
    seme = type(backbone.transformer).from_pretrained(seme_dir).to(distill.device())
    dual = make_dete(seme, backbone, dete.lora_rank, dete.lora_alpha, kappa=kappa, sigma_kappa=grid.sigma(kappa))
    phase = schedule.expert_phases(params.grid.steps, kappa)["dete"]
    adversarial = dete_objective(backbone, dete, grid, kappa, params.training, student=dual,
                                 trainable=dual.trainable_parameters())
    objectives = [adversarial] if adversarial is not None else []
    if adversarial is not None:
        source = adversarial.watch_source(source)  # real="trajectory": remembers each batch's trajectories
    spec = distill.DistillSpec(
        name=f"{method}/dete", student=dual, trainable=dual.trainable_parameters(), phases=[phase], target="online",
        lr=dete.lr, train_steps=dete.train_steps, objectives=objectives, save=lambda out: save_dete(dual, out),
        settings={"lora_rank": dete.lora_rank, "lora_alpha": dete.lora_alpha, "gan_weight": dete.gan_weight,
                  "fm_weight": dete.fm_weight, "disc_lr": dete.disc_lr, **variant_settings(dete)})
    out_dir = paths.checkpoint(method, "dete")
    distill.run_distillation(params, "train_dete", method, spec, backbone, source, out_dir)

    # train.json (the loop's) also names the expert's size against one backbone
    summary = io.read_json(out_dir / "train.json")
    summary.update(dual.parameter_counts(), lora_rank=dete.lora_rank, lora_alpha=dete.lora_alpha, kappa=kappa)
    rows = io.read_jsonl(out_dir / HISTORY_FILE)
    disc = discriminator_summary(rows) if objectives else None
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
    counts = dual.parameter_counts()
    print(f"train_dete[{method}]: {counts['dete_trainable_params']} trainable parameters = "
          f"{100 * counts['dete_trainable_fraction_of_backbone']:.2f}% of the backbone")
