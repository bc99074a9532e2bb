"""`dcm export` per family: the folder loads with stock diffusers + peft and its README recipe, run as
written, gives the same few-step samples as dcm's sampler, with DetE taking its steps.

Tiny random Wan (2.1, and 2.2 TI2V with its per-token timestep), HunyuanVideo, HunyuanVideo 1.5 and CogVideoX
pipelines come from tests/helpers.py's builders (saved with ``save_pretrained``, loaded through the adapters);
CogVideoX is also checked with RoPE on
(CogVideoX-5B's form, which the recipe builds with the stock pipeline's own helper).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import load_file

from dcm import schedule
from dcm.backbones import adapter_class
from dcm.distill.experts import DualExpert, make_dete
from dcm.methods.export import SCHEDULE_FILE, export_dual_expert
from dcm.sampling import sample, student_velocity
from helpers import BUILDERS, PROMPTS, family_params


def build_teacher(family: str, folder: Path, rope: bool = False) -> None:
    """The tiny pipeline of ``family``; with ``rope`` (CogVideoX) its transformer uses rotary embeddings."""
    torch.manual_seed(0)
    BUILDERS[family](folder)
    if rope:
        from diffusers import CogVideoXTransformer3DModel

        from dcm.backbones.cogvideox import TRANSFORMER_CONFIGS

        config = json.loads((folder / "transformer" / "config.json").read_text())
        assert config["use_rotary_positional_embeddings"] is False
        model = CogVideoXTransformer3DModel(**TRANSFORMER_CONFIGS["tiny"],
                                            use_rotary_positional_embeddings=True)
        model.save_pretrained(folder / "transformer")


def perturb_dete(dual: DualExpert, scale: float = 0.05) -> None:
    """Move DetE away from SemE (LoRA B starts at zero) so the experts differ (as in test_experts.py)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in dual.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def recipe_blocks(readme: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme, flags=re.S)


def run_recipe(out: Path, blocks: list[str], namespace: dict, monkeypatch) -> dict:
    """Execute the README's python blocks in order from the export folder; keeps the noise block's x."""
    monkeypatch.chdir(out)
    for block in blocks:
        exec(compile(block, str(out / "README.md"), "exec"), namespace)  # noqa: S102 - the recipe under test
        if block.lstrip().startswith("x = torch.randn"):
            namespace["noise"] = namespace["x"].clone()
    return namespace


def dual_expert(backbone, params, rank: int = 2) -> tuple[DualExpert, list[schedule.SamplingStep]]:
    g = params.grid
    grid = schedule.teacher_grid(g.steps, g.shift, g.num_train_timesteps)
    dual = make_dete(copy.deepcopy(backbone.transformer), backbone, rank, 2.0 * rank, kappa=g.kappa,
                     sigma_kappa=grid.sigma(g.kappa))
    perturb_dete(dual)
    return dual.requires_grad_(False).eval(), schedule.expert_schedule(grid, g.kappa, 4)


@pytest.mark.parametrize("teacher,rope", [("wan", False), ("wan22_ti2v", False), ("hunyuan", False),
                                          ("hunyuan15", False), ("cogvideox", False), ("cogvideox", True)],
                         ids=["wan", "wan22_ti2v", "hunyuan", "hunyuan15", "cogvideox", "cogvideox-rope"])
def test_export_recipe_with_stock_diffusers_and_peft_samples_like_dcm(teacher, rope, tmp_path, monkeypatch):
    folder = tmp_path / "teacher"
    build_teacher(teacher, folder, rope)
    params = family_params(teacher, folder)
    bb = params.backbone
    family = bb.family
    backbone = adapter_class(family).from_folder(bb.path, bb.real, bb.guidance_scale)
    dual, steps = dual_expert(backbone, params)
    out = export_dual_expert(dual, steps, tmp_path / "export", "dcm", backbone=backbone)

    # what the export records
    plan = json.loads((out / SCHEDULE_FILE).read_text())
    cls = getattr(diffusers, plan["transformer_class"])
    assert cls is type(backbone.transformer) and plan["family"] == family \
        and plan["teacher"] == str(folder.resolve())
    assert json.loads((out / "transformer" / "config.json").read_text())["_class_name"] == cls.__name__
    assert [s["expert"] for s in plan["steps"]] == ["seme", "seme", "dete", "dete"]
    assert [s["sigma"] for s in plan["steps"]] == [s.sigma for s in steps]
    assert [s["timestep"] for s in plan["steps"]] == pytest.approx(
        [backbone.model_timestep(s.sigma) for s in steps], abs=1e-3)
    if family == "hunyuan":
        assert plan["guidance"] == 6016.0  # w = 6 through bf16, × 1000: what the adapter feeds every forward
    timestep_layers = load_file(out / "dete_timestep_layers.safetensors")
    assert timestep_layers \
        and set(timestep_layers) <= set(cls.from_pretrained(out / "transformer").state_dict())

    # the recipe is stock diffusers + peft + torch, with this family's class and forward inputs
    readme = (out / "README.md").read_text()
    blocks = recipe_blocks(readme)
    code = "\n".join(blocks)
    assert not re.search(r"^\s*(from|import) dcm\b", code, re.M) and f"{cls.__name__}.from_pretrained" in code
    assert ("WanTransformer3DModel" in code) == (family == "wan")
    assert ("encoder_attention_mask=mask" in code and "pooled_projections" in code) == (family == "hunyuan")
    assert ("transpose(1, 2)" in code and 'step["timestep"]' in code) == (family == "cogvideox")
    # Wan 2.2 TI2V: the recipe gives the timestep per video token
    assert ("t.expand(len(x), tokens)" in code) == (teacher == "wan22_ti2v")
    assert ("encoder_hidden_states_2=text_2" in code and "image_embeds=image" in code) \
        == (teacher == "hunyuan15")

    # run it as written
    shape = backbone.video_latent_shape(params)
    torch.manual_seed(3)
    ns = run_recipe(out, blocks, {"prompts": PROMPTS, **dict(zip("CTHW", shape))}, monkeypatch)
    assert isinstance(ns["seme"], cls) and type(ns["dete"]).__name__ == "PeftModel"
    assert isinstance(ns["pipe"], getattr(diffusers, type(backbone.pipe).__name__)) \
        and ns["pipe"].transformer is ns["seme"]
    if family == "cogvideox":
        assert (ns["rope"] is not None) == rope

    # dcm's own sampler on the same noise, prompts and dual expert (routed per sample by σ_κ)
    cond = backbone.encode_prompts(PROMPTS)
    velocity = student_velocity(backbone, dual)
    ours = sample({"seme": velocity, "dete": velocity}, steps, ns["noise"], cond)
    torch.testing.assert_close(ns["x"], ours, rtol=1e-4, atol=1e-4)
    seme_only = sample({"seme": student_velocity(backbone, dual.materialize("seme").eval())},
                       [schedule.SamplingStep(s.sigma, "seme") for s in steps], ns["noise"], cond)
    assert not torch.allclose(ours, seme_only, atol=1e-3)  # DetE really took the last two steps
    with torch.no_grad():
        torch.testing.assert_close(ns["video"], backbone.decode_latents(ours), rtol=1e-4, atol=1e-4)


def test_toy_export_recipe_names_its_dcm_step_and_samples_like_dcm(backbone, params, tmp_path, monkeypatch):
    """The shapes toy (WanTransformer3DModel): stock experts, dcm's prompt encoder and codec (said so)."""
    teacher = tmp_path / "teacher"
    backbone.save(teacher)
    dual, steps = dual_expert(backbone, params, rank=4)
    out = export_dual_expert(dual, steps, tmp_path / "export", "dcm", backbone=backbone, teacher=teacher)
    plan = json.loads((out / SCHEDULE_FILE).read_text())
    assert (plan["family"], plan["transformer_class"]) == ("toy", "WanTransformer3DModel")
    readme = (out / "README.md").read_text()
    assert "needs dcm" in readme
    prompts = ["a red circle moves left", "a blue striped square moves up slowly"]
    torch.manual_seed(3)
    shape = backbone.latent_shape(params.world.frames, params.world.size)
    ns = run_recipe(out, recipe_blocks(readme), {"prompts": prompts, **dict(zip("CTHW", shape))}, monkeypatch)
    velocity = student_velocity(backbone, dual)
    ours = sample({"seme": velocity, "dete": velocity}, steps, ns["noise"], backbone.encode_prompts(prompts))
    torch.testing.assert_close(ns["x"], ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ns["video"], backbone.decode_latents(ours), rtol=1e-4, atol=1e-4)


def test_full_copy_dete_exports_its_own_transformer(tmp_path, monkeypatch):
    """rank 0 (+OD): DetE is a second full transformer; the recipe loads it and samples like dcm (and
    decodes with the VAE tiling/slicing the run used)."""
    folder = tmp_path / "teacher"
    build_teacher("hunyuan", folder)
    params = family_params("hunyuan", folder, vae_tiling=True, vae_slicing=True)
    bb = params.backbone
    backbone = adapter_class("hunyuan").from_folder(bb.path, bb.real, bb.guidance_scale)
    dual, steps = dual_expert(backbone, params, rank=0)
    out = export_dual_expert(dual, steps, tmp_path / "export", "dcm_od", backbone=backbone)
    assert (out / "dete_transformer").is_dir() and not (out / "dete_lora").exists()
    assert json.loads((out / SCHEDULE_FILE).read_text())["dete_form"] == "full"
    readme = (out / "README.md").read_text()
    assert "pipe.vae.enable_tiling()" in readme and "pipe.vae.enable_slicing()" in readme
    torch.manual_seed(3)
    shape = backbone.video_latent_shape(params)
    ns = run_recipe(out, recipe_blocks(readme), {"prompts": PROMPTS, **dict(zip("CTHW", shape))}, monkeypatch)
    assert ns["pipe"].vae.use_tiling and ns["pipe"].vae.use_slicing
    velocity = student_velocity(backbone, dual)
    ours = sample({"seme": velocity, "dete": velocity}, steps, ns["noise"], backbone.encode_prompts(PROMPTS))
    torch.testing.assert_close(ns["x"], ours, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(ns["video"], backbone.decode_latents(ours), rtol=1e-4, atol=1e-4)


def test_export_without_a_backbone_refuses_families_that_need_one(tmp_path):
    folder = tmp_path / "teacher"
    build_teacher("cogvideox", folder)
    params = family_params("cogvideox", folder)
    bb = params.backbone
    backbone = adapter_class("cogvideox").from_folder(bb.path, bb.real, bb.guidance_scale)
    dual, steps = dual_expert(backbone, params)
    with pytest.raises(ValueError, match="needs its backbone"):
        export_dual_expert(dual, steps, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_dcm_export_cli_writes_the_trained_dual_expert_of_a_toy_project(smoke, monkeypatch):
    """`dcm export --method dcm` on checkpoints/dcm/{seme,dete}: family and class recorded, recipe runs."""
    from dcm import cli, paths
    from dcm.backbones import load_teacher
    from dcm.distill.experts import FULL_DIR, save_dete
    from helpers import smoke_params

    params = smoke_params()
    backbone = load_teacher(params, paths.TEACHER)
    dual, steps = dual_expert(backbone, params, rank=4)
    dual.materialize("seme").save_pretrained(paths.checkpoint("dcm", "seme") / FULL_DIR)
    save_dete(dual, paths.checkpoint("dcm", "dete"))
    assert cli.main(["export", "--method", "dcm", "--preset", "smoke"]) == 0

    out = smoke / paths.EXPORT / "dcm"
    plan = json.loads((out / SCHEDULE_FILE).read_text())
    assert (plan["family"], plan["transformer_class"]) == ("toy", "WanTransformer3DModel")
    assert plan["teacher"] == str((smoke / paths.TEACHER).resolve())
    assert [(s["sigma"], s["expert"]) for s in plan["steps"]] == [(s.sigma, s.expert) for s in steps]
    prompts = ["a red circle moves left"]
    shape = backbone.latent_shape(params.world.frames, params.world.size)
    torch.manual_seed(3)
    ns = run_recipe(out, recipe_blocks((out / "README.md").read_text()),
                    {"prompts": prompts, **dict(zip("CTHW", shape))}, monkeypatch)
    velocity = student_velocity(backbone, dual)
    ours = sample({"seme": velocity, "dete": velocity}, steps, ns["noise"], backbone.encode_prompts(prompts))
    torch.testing.assert_close(ns["x"], ours, rtol=1e-4, atol=1e-4)
