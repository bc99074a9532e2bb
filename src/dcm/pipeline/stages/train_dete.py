"""``train_dete --method dcm``: the detail expert.

DetE is built from the trained SemE (``checkpoints/<method>/seme``): LoRA (``dete.lora_rank``,
``dete.lora_alpha``) + copied timestep layers, or a full copy with rank 0 (the +OD ablation).  It
trains on the low-noise phase n ∈ [0, κ] ending at σ_min with the online target, plus the GAN hinge
when ``dete.gan_weight > 0`` and feature matching when ``dete.fm_weight > 0`` (each on its own), on
frozen-teacher features.  Writes
``checkpoints/<method>/dete/`` (adapter/, timestep_layers.safetensors, expert.json, train.json).
"""

from __future__ import annotations

from dcm import distill, io, paths, schedule
from dcm.config import ConfigError, Params
from dcm.distill.discriminator import dete_objective, discriminator_summary
from dcm.distill.experts import FULL_DIR, make_dete, save_dete
from dcm.distill.loop import HISTORY_FILE


def run(params: Params, method: str) -> None:
    dete = params.method(method).dete
    if dete is None:
        raise ConfigError(f"methods.{method}.dete", None, "an expert config (train_steps, lr, lora_rank, …)")
    distill.check_inputs(params)
    seme_dir = paths.checkpoint(method, "seme") / FULL_DIR
    grid = params.teacher_grid()
    kappa = params.grid.kappa

    backbone = distill.load_backbone(params)
    source = distill.make_source(params, backbone)
    seme = type(backbone.transformer).from_pretrained(seme_dir).to(distill.device())
    dual = make_dete(seme, backbone, dete.lora_rank, dete.lora_alpha, kappa=kappa, sigma_kappa=grid.sigma(kappa))
    phase = schedule.expert_phases(params.grid.steps, kappa)["dete"]
    adversarial = dete_objective(backbone, dete, grid, kappa, params.training)
    objectives = [adversarial] if adversarial is not None else []
    spec = distill.DistillSpec(
        name=f"{method}/dete", student=dual, trainable=dual.trainable_parameters(), phases=[phase], target="online",
        lr=dete.lr, train_steps=dete.train_steps, objectives=objectives, save=lambda out: save_dete(dual, out),
        settings={"lora_rank": dete.lora_rank, "lora_alpha": dete.lora_alpha, "gan_weight": dete.gan_weight,
                  "fm_weight": dete.fm_weight, "disc_lr": dete.disc_lr})
    out_dir = paths.checkpoint(method, "dete")
    distill.run_distillation(params, "train_dete", method, spec, backbone, source, out_dir)

    # train.json (the loop's) also names the expert's size against one backbone
    summary = io.read_json(out_dir / "train.json")
    summary.update(dual.parameter_counts(), lora_rank=dete.lora_rank, lora_alpha=dete.lora_alpha, kappa=kappa)
    disc = discriminator_summary(io.read_jsonl(out_dir / HISTORY_FILE)) if objectives else None
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
