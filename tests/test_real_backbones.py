"""Real teachers (wan, hunyuan, hunyuan15, cogvideox) on tiny random pipelines built from the same diffusers
and transformers classes, saved with ``save_pretrained`` and loaded through the adapters' normal path."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from dcm import cli, config, paths, schedule
from dcm.backbones import adapter_class, load_teacher, record_teacher
from dcm.backbones.base import TeacherFeatures
from dcm.backbones.cogvideox import (
    VPTimesteps,
    flow_to_vp,
    flow_velocity_to_vp,
    vp_coefficients,
    vp_velocity_to_flow,
)
from dcm.backbones.hunyuan import embedded_guidance
from dcm.config import ConfigError
from dcm.distill.experts import make_dete
from helpers import BUILDERS, PROMPTS, TEACHER_FAMILY, VIDEO, family_params, family_raw, real_data

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("wan", "hunyuan", "hunyuan15", "cogvideox")
TEACHERS = (*FAMILIES, "wan22_ti2v")  # Wan 2.2 TI2V-5B's form: family wan, per-token timesteps, 48-ch VAE


# ------------------------------------------------------------------------------ tiny pipelines (BUILDERS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One saved tiny pipeline folder per family (built lazily, once per module)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            torch.manual_seed(0)
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            BUILDERS[family](folder)
            built[family] = folder
        return built[family]

    return get


@pytest.fixture(scope="module")
def loaded(folders):
    """Adapters loaded through ``from_folder`` (text encoders lazily), frozen, per family."""
    cache = {}

    def get(teacher: str):
        if teacher not in cache:
            params = family_params(teacher, folders(teacher))
            bb = params.backbone
            backbone = adapter_class(bb.family).from_folder(bb.path, bb.real, bb.guidance_scale)
            cache[teacher] = (backbone, params)
        return cache[teacher]

    return get


def inputs(backbone, params, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *backbone.video_latent_shape(params), generator=g)
    sigma = torch.tensor([0.9, 0.3])[:batch]
    return x, sigma, backbone.encode_prompts(PROMPTS[:batch])


# ------------------------------------------------------------------------------ the protocol


@pytest.mark.parametrize("family", TEACHERS)
def test_forward_gives_a_velocity_of_the_latent_shape_and_every_second_block_as_features(family, loaded):
    backbone, params = loaded(family)
    x, sigma, cond = inputs(backbone, params)
    with torch.no_grad():
        v, feats = backbone.predict(backbone.transformer, x, sigma, cond, features=True)
        v_plain = backbone.predict(backbone.transformer, x, sigma, cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    torch.testing.assert_close(v, v_plain)
    blocks = backbone.blocks(backbone.transformer)
    assert len(feats) == len(range(0, len(blocks), 2)) >= 2
    t, h, w = (d // p for d, p in zip(x.shape[2:], backbone.token_patch(backbone.transformer)))
    for f in feats:
        assert f.shape == (2, t * h * w, backbone.feature_dim(backbone.transformer))  # video tokens only
    assert [p.shape for p in backbone.project_features(backbone.transformer, feats)] == [x.shape] * len(feats)


@pytest.mark.parametrize("family", TEACHERS)
def test_prompts_embed_differently_and_come_from_the_pipeline_encoder(family, loaded):
    backbone, _ = loaded(family)
    a, b = backbone.encode_prompts(PROMPTS).hidden
    assert not torch.allclose(a, b)
    assert all(getattr(backbone.pipe, n) is not None for n in backbone.text_components)  # loaded on demand


@pytest.mark.parametrize("family", TEACHERS)
def test_vae_round_trip_keeps_the_latent_shape(family, loaded):
    backbone, params = loaded(family)
    real = params.backbone.real
    video = torch.rand(1, 3, real.frames, real.height, real.width) * 2 - 1
    with torch.no_grad():
        latents = backbone.encode_video(video)
        decoded = backbone.decode_latents(latents)
    assert latents.shape == (1, *backbone.video_latent_shape(params))
    assert decoded.shape == video.shape and decoded.abs().max() <= 1


def test_guidance_modes_embedded_for_hunyuan_cfg_for_wan_and_cogvideox(loaded):
    assert [adapter_class(f).guidance_mode for f in FAMILIES] == ["cfg", "embedded", "cfg", "cfg"]
    backbone, params = loaded("hunyuan")
    assert float(embedded_guidance(torch.tensor([6.0]))) == 6016.0  # the pipeline's bf16 guidance input
    x, sigma, cond = inputs(backbone, params)
    with torch.no_grad():
        guided = backbone.guided_velocity(backbone.transformer, x, sigma, cond, None, scale=6.0)
        plain = backbone.predict(backbone.transformer, x, sigma, cond)  # students get the teacher's w
        other = backbone.guided_velocity(backbone.transformer, x, sigma, cond, None, scale=1.0)
    torch.testing.assert_close(guided, plain)
    assert not torch.allclose(guided, other)  # guidance is an input of the network


def test_wan_cfg_combines_conditional_and_negative_prompt_forwards(loaded):
    backbone, params = loaded("wan")
    x, sigma, cond = inputs(backbone, params)
    uncond = backbone.null_prompts(2)
    with torch.no_grad():
        guided = backbone.guided_velocity(backbone.transformer, x, sigma, cond, uncond, scale=5.0)
        v_c = backbone.predict(backbone.transformer, x, sigma, cond)
        v_u = backbone.predict(backbone.transformer, x, sigma, uncond)
    torch.testing.assert_close(guided, v_u + 5.0 * (v_c - v_u), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ Wan 2.2 TI2V, stock pipeline


def test_wan22_ti2v_gets_a_timestep_per_video_token_and_the_48_channel_vae_latents(loaded):
    backbone, params = loaded("wan22_ti2v")
    assert backbone.expand_timesteps and not loaded("wan")[0].expand_timesteps
    vae = backbone.vae.config
    assert (vae.z_dim, vae.scale_factor_spatial, vae.is_residual, vae.patch_size) == (48, 16, True, 2)
    # 9 frames of 64×64: ÷4 in time (+1), ÷16 in space; 3 latent frames of 2×2 tokens
    assert backbone.video_latent_shape(params) == (48, 3, 4, 4)
    x, sigma, _ = inputs(backbone, params)
    t = backbone.timestep(sigma, x)
    assert t.shape == (2, 3 * 2 * 2) and torch.equal(t, (1000.0 * sigma)[:, None].expand(-1, 12))
    # the latent space is the VAE mean normalised by the config's per-channel latents_mean / latents_std
    video = torch.rand(1, 3, 9, 64, 64) * 2 - 1
    with torch.no_grad():
        z = backbone.vae.encode(video).latent_dist.mode()
        latents = backbone.encode_video(video)
    mean, std = (torch.tensor(v).view(1, 48, 1, 1, 1) for v in (vae.latents_mean, vae.latents_std))
    torch.testing.assert_close(latents, (z - mean) / std)
    torch.testing.assert_close(backbone.denormalize_latents(latents), z)


def test_wan22_ti2v_frame_size_must_be_a_multiple_of_32(folders):
    raw = family_raw("wan22_ti2v", folders("wan22_ti2v"), height=48)
    with pytest.raises(ConfigError,
                       match=r"backbone\.real\.height = 48 .*multiple of 32 \(VAE 16x, patch 2\)"):
        config.parse(raw)


@pytest.mark.parametrize("teacher", TEACHERS)
def test_frame_size_check_uses_the_adapters_own_token_size(teacher, loaded, folders):
    """The params check's unit (``config.token_pixels``: VAE compression × patch, from the folder) is the
    pixels per token side of the loaded adapter (frame height over its latent height over the patch);
    half a token more is refused with that unit named."""
    backbone, params = loaded(teacher)
    patch = backbone.transformer.config.patch_size
    patch = patch[1] if isinstance(patch, (list, tuple)) else patch
    latent_h = backbone.video_latent_shape(params)[2]
    unit = config.token_pixels(params.backbone.family, params.backbone.path)
    assert unit == params.backbone.real.height * patch // latent_h
    height = unit * 3 + unit // 2
    raw = family_raw(teacher, folders(teacher), height=height)
    with pytest.raises(ConfigError, match=rf"backbone\.real\.height = {height} .*multiple of {unit} "):
        config.parse(raw)


@pytest.mark.parametrize("family", ["wan", "wan22_ti2v"])
def test_the_output_head_maps_the_last_block_to_the_velocity(family, loaded):
    """The head feature matching projects taps with (a per-token temb for TI2V) is the model's own: on the
    last block's output it gives the forward's velocity."""
    backbone, params = loaded(family)
    x, sigma, cond = inputs(backbone, params)
    model = backbone.transformer
    last = []
    handle = backbone.blocks(model)[-1].register_forward_hook(lambda _m, _i, out: last.append(out))
    try:
        with torch.no_grad():
            v, feats = backbone.predict(model, x, sigma, cond, features=True)
    finally:
        handle.remove()
    assert feats.head_condition.ndim == (3 if family == "wan22_ti2v" else 2)
    with torch.no_grad():
        (head,) = backbone.project_features(model, TeacherFeatures(last, feats.head_condition,
                                                                   feats.latent_thw))
    torch.testing.assert_close(head, v)


@pytest.mark.parametrize("family", ["wan", "wan22_ti2v"])
def test_guided_teacher_sampler_equals_the_stock_wan_pipeline(family, loaded):
    """``WanPipeline(..., output_type="latent")`` (CFG with the empty negative prompt, Euler over its
    scheduler's sigmas; per-token timesteps for TI2V) against dcm's sampler with the adapter's guided
    velocity at the same sigmas, from the same noise."""
    from dcm.sampling import sample, teacher_velocity

    backbone, params = loaded(family)
    real = params.backbone.real
    noise = torch.randn(1, *backbone.video_latent_shape(params), generator=torch.Generator().manual_seed(3))
    stock = backbone.pipe(prompt=PROMPTS[0], negative_prompt=real.negative_prompt, height=real.height,
                          width=real.width, num_frames=real.frames, num_inference_steps=4,
                          guidance_scale=params.backbone.guidance_scale, latents=noise.clone(),
                          output_type="latent", max_sequence_length=real.max_sequence_length).frames
    sigmas = backbone.pipe.scheduler.sigmas.tolist()
    assert len(sigmas) == 5 and sigmas[-1] == 0.0
    steps = [schedule.SamplingStep(float(s), "teacher") for s in sigmas[:-1]]
    ours = sample({"teacher": teacher_velocity(backbone, None)}, steps, noise,
                  backbone.encode_prompts(PROMPTS[:1]))
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)
    assert stock.abs().max() > 0.1  # the stock run moved the latents
def test_hunyuan15_guided_sampler_equals_the_stock_pipeline_with_its_guider_and_glyph_prompt(loaded):
    """Two Euler steps of the stock HunyuanVideo15Pipeline (output_type="latent": its own encode_prompt for
    the prompt and the default negative prompt, its zero condition latents and image tokens, its
    ClassifierFreeGuidance) equal dcm's sampler on the adapter's guided velocity; the quoted text reaches
    the ByT5 glyph encoder (a non-zero mask)."""
    from diffusers import HunyuanVideo15Pipeline

    from dcm.sampling import sample, teacher_velocity

    backbone, params = loaded("hunyuan15")
    prompts = ['a red square moves left with a sign "stop"']
    cond = backbone.encode_prompts(prompts)
    assert cond.extra["attention_mask_2"].sum() > 0 and cond.extra["hidden_2"].abs().sum() > 0
    assert backbone.encode_prompts(PROMPTS[:1]).extra["attention_mask_2"].sum() == 0  # nothing quoted
    stock = HunyuanVideo15Pipeline.from_pretrained(backbone.path, local_files_only=True)
    stock.tokenizer_max_length = backbone.max_sequence_length  # backbone.real.max_sequence_length (12)
    assert stock.guider.guidance_scale == backbone.guidance_scale == 6.0
    noise = torch.randn(1, *backbone.video_latent_shape(params), generator=torch.Generator().manual_seed(0))
    theirs = stock(prompt=prompts, height=VIDEO["height"], width=VIDEO["width"], num_frames=VIDEO["frames"],
                   num_inference_steps=2, latents=noise.clone(), output_type="latent").frames
    steps = [schedule.SamplingStep(float(s), "teacher") for s in stock.scheduler.sigmas[:-1]]
    ours = sample({"teacher": teacher_velocity(backbone, None)}, steps, noise, cond)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        unguided = backbone.guided_velocity(backbone.transformer, noise, torch.ones(1), cond,
                                            backbone.null_prompts(1), scale=1.0)
        plain = backbone.predict(backbone.transformer, noise, torch.ones(1), cond)
    torch.testing.assert_close(unguided, plain)


# ------------------------------------------------------------------------------ CogVideoX: VP ↔ flow


def test_cogvideox_v_prediction_maps_to_the_flow_velocity_and_back():
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(5, 4, 3, 4, 4, generator=g, dtype=torch.float64),
               torch.randn(5, 4, 3, 4, 4, generator=g, dtype=torch.float64))
    sigma = torch.tensor([1.0, 0.97, 0.5, 0.1, 0.017], dtype=torch.float64)
    s_ = sigma.view(-1, 1, 1, 1, 1)
    x_flow = (1 - s_) * x0 + s_ * eps
    a, s, _ = (c.view(-1, 1, 1, 1, 1) for c in vp_coefficients(sigma))
    z_true, v_true = a * x0 + s * eps, a * eps - s * x0  # the VP sample and CogVideoX's v target
    z = flow_to_vp(x_flow, sigma)
    torch.testing.assert_close(z, z_true)
    u = vp_velocity_to_flow(z, v_true, sigma)
    torch.testing.assert_close(u, eps - x0)  # v ≈ ε − x0 of METHODS.md
    torch.testing.assert_close(x_flow - s_ * u, x0)  # x0 back from the flow velocity
    torch.testing.assert_close(flow_velocity_to_vp(x_flow, u, sigma), v_true)


def test_cogvideox_timesteps_round_trip_and_sigma_one_is_the_last_timestep(loaded):
    backbone, _ = loaded("cogvideox")
    vp: VPTimesteps = backbone.vp
    t = torch.tensor([0.0, 17.0, 500.0, 981.0, 999.0])
    torch.testing.assert_close(vp.timestep(vp.sigma(t)), t)
    assert float(vp.sigma(torch.tensor([999.0]))) == pytest.approx(1.0)  # zero terminal SNR
    assert backbone.model_timestep(1.0) == pytest.approx(999.0)
    # routing threshold of the experts is in the network's own timestep units
    assert backbone.model_timestep(0.5) != pytest.approx(500.0)


# ------------------------------------------------------------------------------ DetE on each family


def has_weights(layer) -> bool:
    return isinstance(layer, torch.nn.Parameter) or any(True for _ in layer.parameters())


@pytest.mark.parametrize("family", TEACHERS)
def test_the_token_count_read_before_loading_is_the_adapters_token_grid(family, loaded):
    """``fsdp.token_count`` (context parallelism's divisor check, from config files only) counts the tokens
    the loaded adapter makes: each VAE's own compression (HunyuanVideo 1.5's and Wan 2.2's ÷16)."""
    from dcm.parallel.fsdp import token_count

    backbone, params = loaded(family)
    _, t, h, w = backbone.video_latent_shape(params)
    pt, ph, pw = backbone.token_patch(backbone.transformer)
    assert token_count(params) == (t // pt) * (h // ph) * (w // pw)


def test_the_vae_compression_comes_from_either_config_key_else_the_familys_released_vae(tmp_path):
    from dcm.config import vae_spatial_compression

    assert vae_spatial_compression("hunyuan15", tmp_path) == 16 and vae_spatial_compression("wan", None) == 8
    (tmp_path / "vae").mkdir()
    for config_key in ("spatial_compression_ratio", "scale_factor_spatial"):
        (tmp_path / "vae" / "config.json").write_text(json.dumps({config_key: 16}))
        assert vae_spatial_compression("hunyuan", tmp_path) == 16


@pytest.mark.parametrize("family", TEACHERS)
def test_dete_trains_only_lora_and_the_copied_timestep_layers(family, loaded):
    backbone, params = loaded(family)
    grid = schedule.teacher_grid(params.grid.steps, params.grid.shift, params.grid.num_train_timesteps)
    kappa = params.grid.kappa
    dual = make_dete(copy.deepcopy(backbone.transformer), backbone, 4, 8.0, kappa=kappa,
                     sigma_kappa=grid.sigma(kappa))
    trainable = {n for n, p in dual.named_parameters() if p.requires_grad}
    assert trainable \
        and all("lora_" in n or n.startswith(("dete_modules.", "dete_parameters.")) for n in trainable)
    copied = {n.split(".")[1] for n in trainable if n.startswith(("dete_modules.", "dete_parameters."))}
    assert copied == {n for n in backbone.timestep_layer_names
                      if has_weights(getattr(backbone.transformer, n))}
    before = {n: p.detach().clone() for n, p in dual.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in dual.parameters() if p.requires_grad], lr=1e-2)
    x, _, cond = inputs(backbone, params)
    sigma = torch.tensor([grid.sigma(kappa), grid.sigma(0)])  # both at or below σ_κ: DetE
    for _ in range(2):
        optimizer.zero_grad()
        backbone.predict(dual, x, sigma, cond).pow(2).mean().backward()
        optimizer.step()
    changed = {n for n, p in dual.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)
    frozen = set(before) - trainable
    assert frozen and all(torch.equal(dual.get_parameter(n), before[n]) for n in frozen)


# ------------------------------------------------------------------------------ errors


def test_missing_components_are_listed_by_name(folders, tmp_path):
    import shutil

    broken = tmp_path / "wan"
    shutil.copytree(folders("wan"), broken)
    shutil.rmtree(broken / "vae")
    for f in (broken / "transformer").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ConfigError, match=r"backbone\.path = .* missing: transformer/ weights .*, vae/"):
        adapter_class("wan").check_folder(broken)


def test_wrong_family_and_missing_paths_fail_with_the_key(folders, tmp_path):
    with pytest.raises(ConfigError, match=r"not a WanPipeline \(check backbone\.family\)"):
        adapter_class("hunyuan").check_folder(folders("wan"))
    raw = family_raw("wan", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"backbone\.path = .*nowhere.* an existing local directory"):
        config.parse(raw)
    raw = family_raw("wan", folders("wan"))
    raw["backbone"]["real"]["frames"] = 8
    with pytest.raises(ConfigError, match=r"backbone\.real\.frames = 8 .* 4k\+1"):
        config.parse(raw)
    del raw["backbone"]["real"]
    with pytest.raises(ConfigError,
                       match=r"backbone\.real = None .* required when backbone\.family is 'wan'"):
        config.parse(raw)


def test_hunyuan15_refuses_a_guider_it_does_not_reproduce(folders, tmp_path):
    """The adapter's CFG is ClassifierFreeGuidance on every step: a guider limited to a step range is refused
    when the folder loads, naming the key and the setting."""
    import shutil

    folder = tmp_path / "hy15"
    shutil.copytree(folders("hunyuan15"), folder)
    cfg = folder / "guider" / "guider_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "stop": 0.5}))
    settings = family_params("hunyuan15", folder).backbone
    message = r"backbone\.path = .* \(start, stop, enabled\) = \(0\.0, 0\.5, True\)"
    with pytest.raises(ConfigError, match=message):
        adapter_class("hunyuan15").from_folder(folder, settings.real, settings.guidance_scale, networks=False)


def test_recorded_teacher_refuses_a_changed_folder(folders, tmp_path):
    import shutil

    folder = tmp_path / "cog"
    shutil.copytree(folders("cogvideox"), folder)
    params = family_params("cogvideox", folder)
    record_teacher(params, tmp_path / "teacher")
    record = json.loads((tmp_path / "teacher" / "backbone.json").read_text())
    assert record["family"] == "cogvideox" and record["path"] == str(folder.resolve())
    backbone = load_teacher(params, tmp_path / "teacher", prompt_store=None)
    assert all(getattr(backbone.pipe, n) is None for n in backbone.text_components)  # not loaded
    cfg = folder / "transformer" / "config.json"
    cfg.write_text(cfg.read_text().replace('"num_layers": 4', '"num_layers": 2'))
    with pytest.raises(ConfigError, match=r"changed since\): re-run `dcm run teacher`"):
        load_teacher(params, tmp_path / "teacher")


# ------------------------------------------------------------------------------ the DAG


def run(*argv: str) -> None:
    assert cli.main(["run", *argv]) == 0


def start_project(family: str, folder: Path, root: Path, monkeypatch) -> None:
    root.mkdir()
    raw = config.deep_merge(family_raw(family, folder), real_data(root))
    raw = config.deep_merge(raw, {"methods": {m: {"train_steps": 1} for m in ("lcm", "pcm")}})  # one step
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(root)
    run("prepare")
    run("teacher")
    run("preprocess")


@pytest.mark.parametrize("family,mode", [("hunyuan", "embedded"), ("wan", "cfg")])
def test_trajectories_stage_stores_the_family_guidance(family, mode, folders, tmp_path, monkeypatch):
    start_project(family, folders(family), tmp_path / "project", monkeypatch)
    assert (paths.PROMPT_STORE / "index.json").is_file()
    run("trajectories")
    index = json.loads((paths.TRAJECTORIES / "index.json").read_text())
    assert index["guidance"] == {"mode": mode, "scale": 6.0}
    params = config.load("params.yaml")
    backbone = load_teacher(params, paths.TEACHER)
    assert index["latent_shape"] == list(backbone.video_latent_shape(params))


# the newest teachers also train the consistency baselines (LCM, PCM: train_baseline) in their chains
CHAIN_BASELINES = {"hunyuan15": ("lcm", "pcm"), "wan22_ti2v": ("lcm", "pcm")}


@pytest.mark.slow
@pytest.mark.parametrize("family", TEACHERS)
def test_smoke_chain_trajectories_seme_dete_sample(family, folders, tmp_path, monkeypatch):
    start_project(family, folders(family), tmp_path / "project", monkeypatch)
    run("trajectories")
    run("train_seme", "--method", "dcm")
    run("train_dete", "--method", "dcm")
    run("sample", "--method", "dcm")
    for method in CHAIN_BASELINES.get(family, ()):
        run("train_baseline", "--method", method)
        history = (paths.checkpoint(method) / "history.jsonl").read_text().splitlines()
        assert history and all(math.isfinite(json.loads(line)["loss"]) for line in history)
    expert = json.loads((paths.checkpoint("dcm", "dete") / "expert.json").read_text())
    assert expert["timestep_layer_names"] == list(adapter_class(TEACHER_FAMILY.get(family, family))
                                                  .timestep_layer_names)
    record = json.loads((paths.samples("dcm") / "samples.json").read_text())
    assert record["num_steps"] == 4 and record["nfe"] == 4
    assert len(list(paths.samples("dcm").glob("*.mp4"))) == len(record["rows"])


# ------------------------------------------------------------------------------ presets, resources


@pytest.mark.parametrize("preset,kappa,shift,dcm_steps,fm,cfg", [("hunyuan", 37, 17.0, 4, 1.0, 6.0),
                                                                 ("hunyuan15", 37, 5.0, 4, 1.0, 6.0),
                                                                 ("wan", 34, 17.0, 6, 10.0, 6.0),
                                                                 ("wan22_ti2v", 34, 17.0, 6, 10.0, 5.0),
                                                                 ("cogvideox", 37, 4.0, 4, 1.0, 6.0)])
def test_presets_carry_the_methods_numbers(preset, kappa, shift, dcm_steps, fm, cfg, tmp_path):
    raw = config.load_raw(REPO / "params.yaml", preset)
    raw["backbone"]["path"] = str(tmp_path)  # the preset names a placeholder folder
    params = config.parse(raw)
    assert params.backbone.family == TEACHER_FAMILY.get(preset, preset)
    assert params.backbone.guidance_scale == cfg
    assert (params.grid.steps, params.grid.shift, params.grid.kappa) == (50, shift, kappa)
    dcm = params.methods["dcm"]
    assert dcm.sample_steps == dcm_steps and (dcm.dete.lora_rank, dcm.dete.lora_alpha) == (128, 256.0)
    assert (dcm.seme.lr, dcm.dete.lr, dcm.dete.disc_lr, dcm.dete.fm_weight) == (1e-6, 5e-6, 1e-5, fm)
    assert dcm.seme.tc_offset == 3 and params.backbone.real.frames % 4 == 1
    assert params.methods["teacher"].sample_steps == 50
    if preset == "wan22_ti2v":  # TI2V-5B's official text-to-video size; DCM's schedule and budgets as wan's
        wan = config.parse({**config.load_raw(REPO / "params.yaml", "wan"),
                            "backbone": {**raw["backbone"], "family": "wan"}})
        real = params.backbone.real
        assert (real.frames, real.height, real.width) == (121, 704, 1280)
        assert dcm.schedule == wan.methods["dcm"].schedule
        assert [(params.methods[m].train_steps, params.methods[m].lr) for m in ("lcm", "pcm")] \
            == [(wan.methods[m].train_steps, wan.methods[m].lr) for m in ("lcm", "pcm")]
        assert (dcm.seme.train_steps, dcm.dete.train_steps) == (1000, 1000)
        assert params.training.global_batch_size == 1 and params.training.parallel.context_parallel == 4
    if preset == "hunyuan15":  # HunyuanVideo-1.5 480p T2V as diffusers ships it (pipeline defaults, guider)
        real = params.backbone.real
        assert (real.height, real.width, real.frames, real.max_sequence_length) == (480, 848, 121, 1000)
        assert adapter_class(preset).guidance_mode == "cfg"


@pytest.mark.parametrize("preset", [*FAMILIES, "wan22_ti2v"])
def test_resource_rows_cover_every_stage(preset):
    from dcm.pipeline.dag import load_resources
    from dcm.pipeline.table import STAGES

    rows = {s: load_resources(s, REPO / "slurm" / f"resources-{preset}.yaml") for s in STAGES}
    assert rows["train_seme"].gpus * rows["train_seme"].nodes \
        == {"hunyuan": 24, "hunyuan15": 8, "wan": 1, "cogvideox": 8, "wan22_ti2v": 4}[preset]
    if preset == "wan22_ti2v":  # one context-parallel group of 4 per training job (global batch 1)
        assert {rows[s].gpus for s in ("train_seme", "train_dete", "train_baseline")} == {4}
        assert all(rows[s].gpu_type == "a100" for s in STAGES if rows[s].gpus)


def test_the_wan22_ti2v_plan_builds_the_5b_transformer_at_48_channels_and_per_token_timesteps(folders,
                                                                                             tmp_path):
    """`dcm plan --dag --variant ti2v-5B` (no weights here) and a TI2V folder's own configs give the plan the
    Wan 2.2 VAE's latents and the pipeline's per-token timestep."""
    from dcm.plan import memory, whole

    raw = config.load_raw(REPO / "params.yaml", "wan22_ti2v")
    raw["backbone"]["path"] = str(tmp_path)
    planner = whole.Planner(config.parse(raw), whole.Options(variant="ti2v-5B"))
    work = planner.work
    assert work.config == memory.CONFIGS[("wan", "ti2v-5B")] and work.per_token_timestep
    assert work.latent == (48, 31, 44, 80) and work.tokens == 31 * 22 * 40
    assert memory.model_inputs(work, torch.bfloat16)["timestep"].shape == (1, 27280)
    # a TI2V folder: its transformer/config.json, vae/config.json and model_index.json's expand_timesteps
    params = family_params("wan22_ti2v", folders("wan22_ti2v"))
    folder_work = whole.Planner(params).work
    assert folder_work.per_token_timestep and folder_work.vae_config["z_dim"] == 48
    assert folder_work.latent == (48, 3, 4, 4) and folder_work.config["in_channels"] == 48
