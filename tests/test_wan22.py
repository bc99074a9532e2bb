"""Wan 2.2 A14B as a teacher: two experts of its own (``transformer`` high noise, ``transformer_2`` low
noise, ``boundary_ratio``), on a tiny random WanPipeline with two transformers saved by ``save_pretrained``
and loaded through the adapter's normal path (``tests/helpers.py::build_wan22_a14b``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from dcm import cli, config, paths, schedule
from dcm.backbones import create_teacher, load_teacher
from dcm.backbones.routing import BoundaryExperts
from dcm.distill.experts import load_dual_expert, make_dete, save_dete
from dcm.methods import schedule_for
from dcm.methods.export import export_dual_expert
from dcm.sampling import sample, student_velocity, teacher_velocity
from helpers import PROMPTS, build_wan22_a14b, family_raw, real_data

REPO = Path(__file__).resolve().parents[1]
SCALES = (6.0, 3.0)  # (high, low): distinct so a wrong pairing shows


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny-wan22-a14b")
    build_wan22_a14b(root)
    return root


def raw_params(folder: Path, **extra) -> dict:
    raw = family_raw("wan", folder, guidance_scale_2=SCALES[1])
    raw["backbone"]["guidance_scale"] = SCALES[0]
    raw["grid"]["steps"] = 20  # room on both sides of the boundary for every dcm row's steps
    grid = schedule.teacher_grid(raw["grid"]["steps"], raw["grid"]["shift"])
    raw["grid"]["kappa"] = schedule.boundary_index(grid, 875.0)  # the boundary on the smoke grid
    return config.deep_merge(raw, extra)


@pytest.fixture(scope="module")
def teacher(folder):
    params = config.parse(raw_params(folder))
    return create_teacher(params), params


def noise_and_text(backbone, params, batch: int = 2):
    x = torch.randn(batch, *backbone.video_latent_shape(params), generator=torch.Generator().manual_seed(1))
    return x, backbone.encode_prompts(PROMPTS[:batch])


# ------------------------------------------------------------------------------ the teacher


def test_the_folder_loads_as_two_experts_switched_at_its_boundary(teacher, folder):
    backbone, _ = teacher
    assert backbone.two_experts and isinstance(backbone.transformer, BoundaryExperts)
    assert backbone.transformer.boundary_t == 875.0
    assert backbone.expert_transformer("seme") is backbone.transformer.high
    assert backbone.expert_transformer("dete") is backbone.transformer.low
    assert backbone.record()["boundary_ratio"] == 0.875 and backbone.record()["guidance_scale_2"] == SCALES[1]
    # a folder whose transformer_2/ is gone is refused by name
    broken = folder.parent / "broken-a14b"
    if not broken.exists():
        import shutil

        shutil.copytree(folder, broken)
        shutil.rmtree(broken / "transformer_2")
    with pytest.raises(config.ConfigError, match="transformer_2/"):
        type(backbone).check_folder(broken)


def test_a_teacher_step_takes_each_samples_expert_and_that_experts_guidance(teacher):
    backbone, params = teacher
    x, cond = noise_and_text(backbone, params, batch=3)
    x = torch.cat([x, x[:1]])
    cond = backbone.encode_prompts([PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[0]])
    uncond = backbone.null_prompts(4)
    sigma = torch.tensor([0.95, 0.5, 0.875, 0.8749])  # t = 875 is the high expert's (t ≥ boundary)
    with torch.no_grad():
        v = backbone.guided_velocity(backbone.transformer, x, sigma, cond, uncond)
        for i, (expert, scale) in enumerate([("high", 6.0), ("low", 3.0), ("high", 6.0), ("low", 3.0)]):
            model = getattr(backbone.transformer, expert)
            alone = backbone.guided_velocity(model, x[i:i + 1], sigma[i:i + 1], cond.index(slice(i, i + 1)),
                                             uncond.index(slice(i, i + 1)), scale=scale)
            torch.testing.assert_close(v[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_the_teacher_samples_like_the_stock_two_expert_wan_pipeline(teacher, folder):
    from diffusers import WanPipeline

    backbone, params = teacher
    pipe = WanPipeline.from_pretrained(folder, text_encoder=None, tokenizer=None, vae=None,
                                       torch_dtype=torch.float32)
    x, cond = noise_and_text(backbone, params)
    uncond = backbone.null_prompts(2)
    steps = 6
    pipe.scheduler.set_timesteps(steps)
    sigmas = [float(s) for s in pipe.scheduler.sigmas[:-1]]
    assert any(s >= 0.875 for s in sigmas) and any(s < 0.875 for s in sigmas)  # both experts take steps
    ours = sample({"teacher": teacher_velocity(backbone, uncond)},
                  [schedule.SamplingStep(s, "teacher") for s in sigmas], x, cond)
    stock = pipe(prompt_embeds=cond.hidden, negative_prompt_embeds=uncond.hidden, latents=x.clone(),
                 num_inference_steps=steps, guidance_scale=SCALES[0], guidance_scale_2=SCALES[1],
                 height=params.backbone.real.height, width=params.backbone.real.width,
                 num_frames=params.backbone.real.frames, output_type="latent").frames
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ DCM's experts


def trained_like(dual, scale: float = 0.05) -> None:
    """Move SemE and DetE's own parameters (LoRA, whose B starts at zero, and the copied timestep layers) away
    from their inits, as training would; DetE's frozen base stays the teacher's low-noise expert."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in [*dual.seme_transformer.parameters(), *dual.trainable_parameters()]:
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_seme_starts_from_the_high_expert_and_dete_from_the_low_expert_with_lora(teacher, tmp_path):
    backbone, params = teacher
    grid, kappa = params.teacher_grid(), params.grid.kappa
    from dcm.distill import full_parameter_student

    seme = full_parameter_student(backbone, "seme")
    high = backbone.transformer.high
    assert all(torch.equal(a, b) for a, b in zip(seme.state_dict().values(), high.state_dict().values()))
    dual = make_dete(seme, backbone, 4, 8.0, kappa=kappa, sigma_kappa=grid.sigma(kappa))
    assert dual.form == "lora_on_expert"
    trainable = {n for n, p in dual.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith(("dete_modules.", "dete_parameters."))
                             for n in trainable)
    x, cond = noise_and_text(backbone, params)
    low_sigma = torch.tensor([grid.sigma(kappa), grid.sigma(0)])
    high_sigma = torch.tensor([grid.sigma(kappa + 1), 1.0])
    with torch.no_grad():  # B = 0: DetE is the low-noise expert, SemE the high-noise one
        torch.testing.assert_close(backbone.predict(dual, x, low_sigma, cond),
                                   backbone.predict(backbone.transformer.low, x, low_sigma, cond))
        torch.testing.assert_close(backbone.predict(dual, x, high_sigma, cond),
                                   backbone.predict(high, x, high_sigma, cond))
    trained_like(dual)
    (tmp_path / "seme").mkdir()
    dual.seme_transformer.save_pretrained(tmp_path / "seme" / "transformer")
    save_dete(dual, tmp_path / "dete")
    assert json.loads((tmp_path / "dete" / "expert.json").read_text())["form"] == "lora_on_expert"
    loaded = load_dual_expert(tmp_path / "seme", tmp_path / "dete", backbone)
    mixed = torch.tensor([1.0, grid.sigma(0)])
    with torch.no_grad():
        torch.testing.assert_close(backbone.predict(loaded, x, mixed, cond),
                                   backbone.predict(dual, x, mixed, cond))
    assert all(torch.equal(p, q) for p, q in zip(backbone.transformer.low.parameters(),
                                                 create_teacher(params).transformer.low.parameters()))


def test_the_export_is_a_stock_two_transformer_wan_pipeline_that_samples_like_dcm(teacher, tmp_path):
    from diffusers import WanPipeline

    backbone, params = teacher
    params = config.parse(raw_params(Path(backbone.path), methods={"dcm": {"schedule": [
        [1000.0, "seme"], [960.6801271438599, "seme"], [861.4231944084167, "dete"],
        [125.98425149917603, "dete"]]}}))
    grid, kappa = params.teacher_grid(), params.grid.kappa
    seme = copy.deepcopy(backbone.transformer.high)
    dual = make_dete(seme, backbone, 4, 8.0, kappa=kappa, sigma_kappa=grid.sigma(kappa))
    trained_like(dual)
    dual.eval().requires_grad_(False)
    steps = schedule_for(params, "dcm")
    out = export_dual_expert(dual, steps, tmp_path / "export", backbone=backbone)
    plan = json.loads((out / "student_schedule.json").read_text())
    assert plan["stock_scheduler_shift"] == 12.0  # the tiny folder's scheduler, as the released one
    x, cond = noise_and_text(backbone, params)
    velocity = student_velocity(backbone, dual)
    ours = sample({"seme": velocity, "dete": velocity}, steps, x, cond)
    pipe = WanPipeline.from_pretrained(out, torch_dtype=torch.float32)  # stock: nothing of dcm
    assert type(pipe.transformer_2).__name__ == "WanTransformer3DModel"
    stock = pipe(prompt_embeds=cond.hidden, latents=x.clone(), num_inference_steps=len(steps),
                 guidance_scale=1.0, height=params.backbone.real.height, width=params.backbone.real.width,
                 num_frames=params.backbone.real.frames, output_type="latent").frames
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ the stages


def run(*argv: str) -> None:
    assert cli.main(["run", *argv]) == 0


@pytest.mark.slow
def test_every_expert_and_baseline_trains_a_step_on_the_two_expert_teacher(folder, tmp_path, monkeypatch):
    """prepare → teacher → preprocess, then SemE, DetE, LCM, PCM and DMD2 (fake score per expert) train
    through their stages; a baseline's student keeps both experts."""
    root = tmp_path / "project"
    root.mkdir()
    raw = config.deep_merge(raw_params(folder), real_data(root, videos=2))
    raw = config.deep_merge(raw, {"training": {"source": "online"}})
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(root)
    for stage in ("prepare", "teacher", "preprocess"):
        run(stage)
    assert json.loads((paths.TEACHER / "backbone.json").read_text())["boundary_ratio"] == 0.875
    run("train_seme", "--method", "dcm")
    run("train_dete", "--method", "dcm")
    expert = json.loads((paths.checkpoint("dcm", "dete") / "expert.json").read_text())
    assert expert["form"] == "lora_on_expert"
    for method in ("lcm", "pcm", "dmd2"):
        run("train_baseline", "--method", method)
        student = BoundaryExperts.from_pretrained(paths.checkpoint(method) / "transformer")
        assert student.boundary_t == 875.0
    params = config.load("params.yaml")
    backbone = load_teacher(params, paths.TEACHER)
    lcm = BoundaryExperts.from_pretrained(paths.checkpoint("lcm") / "transformer")
    teacher_low = backbone.transformer.low.parameters()
    assert not all(torch.equal(a, b) for a, b in zip(lcm.low.parameters(), teacher_low))


# ------------------------------------------------------------------------------ the preset


def test_the_preset_sets_kappa_at_the_boundary_and_the_stock_four_step_schedule(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    raw = config.load_raw(REPO / "params.yaml", "wan22_a14b")
    raw["backbone"]["path"] = str(tmp_path)
    params = config.parse(raw)
    assert (params.grid.steps, params.grid.shift) == (40, 12.0)  # official: 40 steps, shift 12
    assert params.backbone.guidance_scale == 4.0 and params.backbone.real.guidance_scale_2 == 3.0
    assert params.grid.kappa == schedule.boundary_index(params.teacher_grid(), 875.0)
    stock = FlowMatchEulerDiscreteScheduler(shift=12.0)
    stock.set_timesteps(4)
    steps = schedule_for(params, "dcm")
    torch.testing.assert_close(torch.tensor([s.sigma for s in steps], dtype=torch.float32),
                               stock.sigmas[:-1].float(), rtol=0, atol=1e-7)
    assert [s.expert for s in steps] == ["seme", "seme", "dete", "dete"]
    sigma_kappa = params.teacher_grid().sigma(params.grid.kappa)
    assert all((s.expert == "seme") == (s.sigma > sigma_kappa) for s in steps)


def test_the_memory_plan_holds_both_experts_where_the_stage_does():
    """One expert runs per forward (activations unchanged); the frozen teacher, a baseline's student and
    DMD2's fake score hold both, DetE a second frozen transformer (its LoRA's base), SemE trains one."""
    import dataclasses

    from dcm.plan import memory
    from helpers import plan_workloads

    work, _ = plan_workloads()["wan"]
    st = memory.structure(work, torch.bfloat16)
    setting = memory.Setting(gpus=1)
    one = memory.plan(work, setting, st)
    two = memory.plan(dataclasses.replace(work, experts=2), setting, st)
    teacher = "frozen teacher (fp32)"
    assert two["SemE"][teacher] == 2 * one["SemE"][teacher]
    assert two["SemE"]["parameters (fp32)"] == one["SemE"]["parameters (fp32)"]  # one expert trains
    adam, fake = "optimizer (AdamW, 2 × fp32)", "fake score (weights+grads+AdamW)"
    assert two["Baseline"][adam] == 2 * one["Baseline"][adam] and two["DMD2"][fake] == 2 * one["DMD2"][fake]
    assert two["DetE"]["frozen student weights"] == 2 * one["DetE"]["frozen student weights"]
    for row in ("SemE", "DetE", "DMD2"):
        assert two[row]["activations, checkpointing"] == one[row]["activations, checkpointing"]


def test_the_presets_plan_is_two_14b_experts_and_its_rows_cover_every_stage(tmp_path):
    from dcm.pipeline.dag import load_resources
    from dcm.pipeline.table import STAGES
    from dcm.plan import memory
    from dcm.plan.whole import transformer_config

    raw = config.load_raw(REPO / "params.yaml", "wan22_a14b")
    raw["backbone"]["path"] = str(tmp_path)  # no transformer/config.json there: the released config
    cfg, name, experts = transformer_config(config.parse(raw))
    assert (name, experts, cfg) == ("A14B", 2, memory.CONFIGS[("wan", "14B")])
    rows = {s: load_resources(s, REPO / "slurm" / "resources-wan22_a14b.yaml") for s in STAGES}
    assert rows["train_seme"].gpus * rows["train_seme"].nodes == 16
