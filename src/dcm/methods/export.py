"""Export a trained DCM as a folder that stock diffusers + peft load, with no ``dcm`` model code.

The export is the dual expert's parts, for every family:

    transformer/                        SemE, diffusers format (<Class>.from_pretrained; the class is
                                        named in student_schedule.json and transformer/config.json)
    dete_lora/                          DetE's PEFT LoRA adapter (peft.PeftModel.from_pretrained)
    dete_timestep_layers.safetensors    DetE's copies of the timestep layers, transformer key names
    scheduler/                          FlowMatchEulerDiscreteScheduler, shift 1: set_timesteps(sigmas=…)
                                        reproduces the student's sigmas exactly
    student_schedule.json               family, transformer class, [(σ, expert, model timestep)] of the
                                        few-step schedule, σ_κ, the family's extra inputs
    README.md                           the loading and sampling recipe of this family

Loading DetE with stock tools: a second ``from_pretrained`` of ``transformer/``,
``load_state_dict(timestep layers, strict=False)``, then ``PeftModel.from_pretrained(…, dete_lora/)``.
A full-copy DetE (rank 0, the +OD ablation) exports ``dete_transformer/`` instead of the two DetE parts.

What differs per family is the forward call (the recipe is written for the family, and
tests/test_export.py follows it for tiny Wan, HunyuanVideo and CogVideoX pipelines):

- wan / toy (WanTransformer3DModel): ``hidden_states, timestep = 1000·σ, encoder_hidden_states``;
  the output is the flow velocity the Euler step takes.  A Wan 2.2 TI2V teacher (its pipeline's
  ``expand_timesteps``, recorded) takes the timestep per video token, (B, T'·H'·W'), as ``WanPipeline``
  builds it in text-to-video mode.
- hunyuan (HunyuanVideoTransformer3DModel): also ``encoder_attention_mask``, ``pooled_projections``
  and the embedded ``guidance`` input: the teacher's w · 1000 rounded through bf16 (6 → 6016), the
  value the adapter gives every student forward (recorded as ``guidance``).
- hunyuan15 (HunyuanVideo15Transformer3DModel): the T2V input ``cat([x, zeros (C), zeros (1)])`` (zero
  condition latents and mask, as ``HunyuanVideo15Pipeline.prepare_cond_latents_and_mask``), zero
  ``image_embeds`` (729 tokens), the Qwen2.5-VL embeddings and mask and the ByT5 glyph embeddings and mask
  of the pipeline's ``encode_prompt``; CFG is distilled, one forward per step with the prompt.
- cogvideox (CogVideoXTransformer3DModel): a VP v-prediction model.  Each step records the model's
  timestep (the fractional VP t of σ) and the VP coefficients (α, s, r) of σ; the recipe feeds
  ``z = x / r`` transposed to (B, T, C, H, W), and turns the output v into the flow velocity
  ``u = (s·z + α·v) − (α·z − s·v)`` before the scheduler's Euler step (``backbones/cogvideox.py``).
  No stock scheduler does this mapping with these fractional timesteps, so it is an explicit step
  of the recipe (plain tensor arithmetic, no dcm code); RoPE tables, where the model uses them,
  come from the stock pipeline's ``_prepare_rotary_positional_embeddings``.

Text encoders and the VAE are not copied: they are the teacher pipeline folder's (recorded as
``teacher``), loaded with the stock pipeline class and ``transformer=seme``.  The toy teacher's
prompt encoder and pixel codec are dcm classes: its recipe says so.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from dcm import io, schedule
from dcm.config import METHOD_KINDS, ConfigError, Params
from dcm.distill.experts import DualExpert, timestep_layer_state

SCHEDULE_FILE = "student_schedule.json"
FORMAT_VERSION = 2

# the forward convention of each diffusers transformer class (the toy teacher is a WanTransformer3DModel)
CLASS_CONVENTION = {"WanTransformer3DModel": "wan", "HunyuanVideoTransformer3DModel": "hunyuan",
                    "HunyuanVideo15Transformer3DModel": "hunyuan15",
                    "CogVideoXTransformer3DModel": "cogvideox"}
FAMILY_CONVENTION = {"toy": "wan", "wan": "wan", "hunyuan": "hunyuan", "hunyuan15": "hunyuan15",
                     "cogvideox": "cogvideox"}
PIPELINES = {"wan": "WanPipeline", "hunyuan": "HunyuanVideoPipeline", "hunyuan15": "HunyuanVideo15Pipeline",
             "cogvideox": "CogVideoXPipeline"}
TWO_TEXT_ENCODERS = ("hunyuan", "hunyuan15")
DTYPE_NAMES = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}


def transformer_class_name(dual: DualExpert) -> str:
    """The diffusers class of SemE (and DetE): what ``from_pretrained`` is called on."""
    name = type(dual.seme_transformer).__name__
    import diffusers

    if not hasattr(diffusers, name):
        raise ValueError(f"{name} is not a diffusers class: the export would not load with stock diffusers")
    return name


def _float32(value: float | torch.Tensor) -> float:
    """The float32 value the engine computes with, as a JSON float (exact: float32 ⊂ float64)."""
    return float(torch.as_tensor(value, dtype=torch.float32))


def export_steps(steps: list[schedule.SamplingStep], convention: str, backbone=None) -> list[dict]:
    """The schedule as written: σ, expert, the transformer's timestep input at σ (as the adapter computes
    it: float32 σ), and for CogVideoX the VP coefficients (α, s, r) of σ (``backbones.cogvideox``)."""
    rows = []
    for step in steps:
        sigma = torch.tensor([step.sigma], dtype=torch.float32)  # the sampler's σ tensor
        row = {"sigma": step.sigma, "expert": step.expert}
        if convention == "cogvideox":
            from dcm.backbones.cogvideox import vp_coefficients

            alpha, s, r = vp_coefficients(sigma)
            row.update(timestep=_float32(backbone.vp.timestep(sigma)[0]), alpha=_float32(alpha[0]),
                       s=_float32(s[0]), r=_float32(r[0]))
        else:
            row["timestep"] = _float32(sigma[0] * 1000.0)  # t = 1000·σ in float32 (= scheduler.timesteps)
        rows.append(row)
    return rows


def export_dual_expert(dual: DualExpert, steps: list[schedule.SamplingStep], out: str | Path,
                       method: str = "dcm", backbone=None, teacher: str | Path | None = None) -> Path:
    """Write ``dual`` and its sampling ``steps`` into ``out`` (atomically replaced).

    ``backbone`` (the teacher's adapter) gives the family and what its forward needs beyond the
    transformer (HunyuanVideo's guidance input, CogVideoX's VP table, text settings); without it the
    family is unknown and only the Wan convention can be written.  ``teacher``: the teacher folder the
    recipe points to for text encoders and VAE (default: the backbone's pipeline folder).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from safetensors.torch import save_file

    class_name = transformer_class_name(dual)
    family = getattr(backbone, "family", None)
    convention = FAMILY_CONVENTION.get(family) if family else CLASS_CONVENTION.get(class_name)
    if convention is None:
        raise ValueError(f"no export recipe for {class_name} (family {family!r})")
    if convention != CLASS_CONVENTION.get(class_name):
        raise ValueError(f"family {family!r} with a {class_name}: "
                         f"expected {CLASS_CONVENTION.get(class_name)!r}")
    if backbone is None and convention != "wan":
        raise ValueError(f"exporting a {class_name} needs its backbone "
                         f"(the {convention} forward's extra inputs)")
    if teacher is None and getattr(backbone, "path", None) is not None:
        teacher = backbone.path

    plan = {"format": FORMAT_VERSION, "method": method, "family": family, "transformer_class": class_name,
            "convention": convention, "teacher": str(teacher) if teacher is not None else None,
            "kappa": dual.kappa, "sigma_kappa": dual.sigma_kappa, "t_kappa": dual.t_kappa,
            "dete_form": "lora" if dual.is_lora else "full", "final_sigma": 0.0,
            "steps": export_steps(steps, convention, backbone)}
    if convention == "hunyuan":
        from dcm.backbones.hunyuan import embedded_guidance

        plan["guidance_scale"] = float(backbone.guidance_scale)
        plan["guidance"] = float(embedded_guidance(torch.tensor([backbone.guidance_scale]))[0])
    if family in PIPELINES:
        settings = backbone.settings
        plan["pipeline"] = {"class": PIPELINES[family],
                            "max_sequence_length": int(backbone.max_sequence_length),
                            "text_dtype": settings.text_dtype, "vae_dtype": settings.vae_dtype,
                            "vae_tiling": bool(settings.vae_tiling),
                            # as the run decoded: the setting, or the adapter's own slicing (hunyuan15)
                            "vae_slicing": bool(settings.vae_slicing
                                                or getattr(getattr(backbone, "vae", None), "use_slicing",
                                                           False))}
        if family == "wan":  # Wan 2.2 TI2V: one timestep per video token
            plan["pipeline"]["expand_timesteps"] = bool(backbone.expand_timesteps)

    out = Path(out)
    if dual.form == "lora_on_expert":
        return export_two_expert_pipeline(dual, steps, out, plan, backbone)
    with io.atomic_dir(out) as tmp:
        dual.materialize("seme").save_pretrained(tmp / "transformer")
        if dual.is_lora:
            dual.model.save_pretrained(tmp / "dete_lora")
            save_file(timestep_layer_state(dual), tmp / "dete_timestep_layers.safetensors")
        else:
            dual.dete_full.save_pretrained(tmp / "dete_transformer")
        # shift 1, no dynamic shifting: set_timesteps(sigmas=…) keeps the given sigmas as they are
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False
                                        ).save_pretrained(tmp / "scheduler")
        (tmp / SCHEDULE_FILE).write_text(json.dumps(plan, indent=2) + "\n")
        (tmp / "README.md").write_text(recipe(plan))
    return out


# ------------------------------------------------------------------------------------ Wan 2.2 A14B


def stock_scheduler_shift(steps: list[schedule.SamplingStep], shifts: list[float]) -> float | None:
    """The first shift whose stock ``FlowMatchEulerDiscreteScheduler`` makes exactly the student's sigmas
    (float32) from ``set_timesteps(len(steps))`` alone, the only call ``WanPipeline.__call__`` makes; None
    if none does."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    wanted = torch.tensor([s.sigma for s in steps], dtype=torch.float32)
    for shift in shifts:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(shift))
        scheduler.set_timesteps(len(steps))
        got = scheduler.sigmas[:-1].to(torch.float32)
        if got.shape == wanted.shape and torch.allclose(got, wanted, rtol=0, atol=1e-6):
            return float(shift)
    return None


def export_two_expert_pipeline(dual: DualExpert, steps: list[schedule.SamplingStep], out: Path, plan: dict,
                               backbone) -> Path:
    """A two-expert DCM (Wan 2.2 A14B) as a stock two-transformer ``WanPipeline`` folder:
    ``transformer/`` = SemE, ``transformer_2/`` = DetE with its LoRA merged and its timestep layers in place,
    ``model_index.json`` the teacher's with ``boundary_ratio`` = (t_κ + the routing tolerance) / 1000, so the
    pipeline's ``t ≥ boundary`` sends exactly the steps SemE takes to ``transformer``, as ``DualExpert.route``
    does; ``vae/``, ``text_encoder/`` and ``tokenizer/`` are links to the teacher folder's.  When a stock
    ``FlowMatchEulerDiscreteScheduler`` makes the student's sigmas from the step count alone
    (``stock_scheduler_shift``), ``scheduler/`` is that one and ``WanPipeline.from_pretrained(folder)(…,
    num_inference_steps=K, guidance_scale=1)`` samples the student as is; otherwise ``scheduler/`` has shift 1
    and the recipe sets the sigmas in its own loop."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dcm.distill.experts import ROUTING_TOLERANCE_T

    if backbone is None or getattr(backbone, "path", None) is None:
        raise ValueError("a two-expert export needs the teacher backbone and its folder (vae, text encoder)")
    teacher = Path(backbone.path)
    index = json.loads((teacher / "model_index.json").read_text())
    boundary_ratio = (dual.t_kappa + ROUTING_TOLERANCE_T) / 1000.0
    index["boundary_ratio"] = boundary_ratio
    scheduler_config = json.loads((teacher / "scheduler" / "scheduler_config.json").read_text())
    teacher_shift = scheduler_config.get("shift", 1.0)
    shift = stock_scheduler_shift(steps, [teacher_shift, 1.0])
    plan.update(convention="wan22", dete_form="merged", boundary_ratio=boundary_ratio,
                stock_scheduler_shift=shift)
    with io.atomic_dir(out) as tmp:
        dual.materialize("seme").save_pretrained(tmp / "transformer")
        dual.materialize("dete").save_pretrained(tmp / "transformer_2")
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0 if shift is None else shift,
                                        use_dynamic_shifting=False).save_pretrained(tmp / "scheduler")
        for name in ("vae", "text_encoder", "tokenizer"):
            (tmp / name).symlink_to((teacher / name).resolve(), target_is_directory=True)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / SCHEDULE_FILE).write_text(json.dumps(plan, indent=2) + "\n")
        (tmp / "README.md").write_text(two_expert_recipe(plan))
    return out


def two_expert_recipe(plan: dict) -> str:
    """README.md of a two-expert export: the stock pipeline call, or its loop with the student's sigmas."""
    text = plan["pipeline"]
    k = len(plan["steps"])
    experts = ", ".join(f"{s['expert']} at σ = {s['sigma']:.4g}" for s in plan["steps"])
    lines = [f"# DCM export ({plan['method']}): Wan 2.2 two-expert WanPipeline", "",
             f"{k} Euler steps, no re-noising: {experts}, then σ = 0. `transformer` is SemE (the high-noise "
             f"expert, fine-tuned), `transformer_2` is DetE (the low-noise expert with its LoRA merged); the "
             f"pipeline switches at boundary_ratio = {plan['boundary_ratio']:.6g}. Stock diffusers only. "
             "`vae/`, `text_encoder/` and `tokenizer/` link to the teacher folder.", "",
             "The teacher's classifier-free guidance is distilled into both experts: guidance_scale = 1 "
             "(one forward per step, no negative prompt).", ""]
    load = ["import json", "", "import torch", "from diffusers import WanPipeline", "",
            'plan = json.load(open("student_schedule.json"))',
            f'pipe = WanPipeline.from_pretrained(".", torch_dtype={{"default": torch.float32, '
            f'"vae": {DTYPE_NAMES[text["vae_dtype"]]}, "text_encoder": {DTYPE_NAMES[text["text_dtype"]]}}})']
    if plan["stock_scheduler_shift"] is not None:
        lines += [f"The scheduler (shift {plan['stock_scheduler_shift']:g}) makes these sigmas from "
                  f"`num_inference_steps={k}`: the pipeline runs the student as is.", "",
                  _code(load + [f"video = pipe(prompts, num_inference_steps={k}, guidance_scale=1.0, "
                                f"max_sequence_length={text['max_sequence_length']}).frames"])]
        return "\n".join(lines)
    lines += ["No stock scheduler makes these sigmas from a step count: the loop below is the pipeline's own "
              "with the student's sigmas set.", "",
              _code(load + [f"text, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, "
                            f"max_sequence_length={text['max_sequence_length']})",
                            "x = torch.randn(len(prompts), C, T, H, W)",
                            'pipe.scheduler.set_timesteps(sigmas=[s["sigma"] for s in plan["steps"]])',
                            "boundary = plan['boundary_ratio'] * 1000",
                            "with torch.no_grad():",
                            "    for t in pipe.scheduler.timesteps:",
                            "        model = pipe.transformer if t >= boundary else pipe.transformer_2",
                            "        v = model(hidden_states=x, timestep=t.expand(len(x)), "
                            "encoder_hidden_states=text.float(),",
                            "                  return_dict=False)[0]",
                            "        x = pipe.scheduler.step(v, t, x).prev_sample"])]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ the recipe


def recipe(plan: dict) -> str:
    """README.md of the export for this plan's family: every ```python block runs as written, in order,
    from the export folder, once ``prompts`` (a list of str) and the latent grid ``C, T, H, W`` are set
    (tests/test_export.py executes them)."""
    cls, family = plan["transformer_class"], plan["family"]
    teacher = plan["teacher"] or "<teacher folder>"
    experts = ", ".join(f"{s['expert']} at σ = {s['sigma']:.4g}" for s in plan["steps"])
    if family == "toy":
        tools = ("Stock diffusers + peft for the experts; the toy teacher's text encoder and codec need dcm "
                 "(step 2).")
    else:
        tools = "Stock diffusers + peft + torch only, no dcm code."
    lines = [f"# DCM export ({plan['method']}): {family or 'family not recorded'}, {cls}", "",
             f"{len(plan['steps'])} Euler steps, no re-noising: {experts}, then σ = 0. SemE above "
             f"σ_κ = {plan['sigma_kappa']:.6g}, DetE at and below.", "", tools,
             "Run the blocks below in order from this folder, with `prompts` (a list of strings) and the "
             "latent grid `C, T, H, W` of the teacher for your video size set.", "",
             "## 1. Load the experts", "", _load_block(plan)]
    text = _text_block(plan, teacher)
    if text:
        lines += ["## 2. Text conditioning", "", text]
    else:
        lines += ["## 2. Text conditioning", "",
                  "This export was written without its teacher backbone: set `text` to the teacher's prompt "
                  "embedding (B, L, text_dim) of `prompts`, as the teacher encodes it.", ""]
    lines += ["## 3. Noise", "",
              _code(["x = torch.randn(len(prompts), C, T, H, W)  # latents are (B, C, T, H, W)"]),
              "## 4. Sample", "", _sample_block(plan)]
    decode = _decode_block(plan)
    if decode:
        lines += ["## 5. Decode", "", decode]
    return "\n".join(lines)


def _code(lines: list[str]) -> str:
    return "\n".join(["```python", *lines, "```", ""])


def _load_block(plan: dict) -> str:
    cls, family = plan["transformer_class"], plan["family"]
    imports = f"from diffusers import FlowMatchEulerDiscreteScheduler, {cls}"
    if family in PIPELINES:
        imports += f", {PIPELINES[family]}"
    lines = ["import json", "", "import torch", imports, "from peft import PeftModel",
             "from safetensors.torch import load_file", "",
             'plan = json.load(open("student_schedule.json"))',
             f'seme = {cls}.from_pretrained("transformer").eval()']
    if plan["dete_form"] == "lora":
        lines += [f'dete = {cls}.from_pretrained("transformer")',
                  "# DetE = SemE's weights + its own copies of the timestep layers + the LoRA adapter",
                  'dete.load_state_dict(load_file("dete_timestep_layers.safetensors"), strict=False)',
                  'dete = PeftModel.from_pretrained(dete, "dete_lora").eval()']
    else:
        lines += [f'dete = {cls}.from_pretrained("dete_transformer").eval()  # full-copy DetE']
    return _code(lines)


def _text_block(plan: dict, teacher: str) -> str:
    family = plan["family"]
    if family is None:
        return ""
    if family == "toy":
        return ("The shapes toy teacher's prompt encoder and pixel codec are dcm classes, not stock "
                "diffusers: this step needs dcm.\n\n"
                + _code(["from dcm.backbones.toy import ToyBackbone", "",
                         f'toy = ToyBackbone.from_pretrained("{teacher}")',
                         "text = toy.encode_prompts(prompts).hidden"]))
    text = plan["pipeline"]
    encoders = ("text_encoder", "text_encoder_2") if family in TWO_TEXT_ENCODERS else ("text_encoder",)
    dtypes = ", ".join([f'"vae": {DTYPE_NAMES[text["vae_dtype"]]}',
                        *(f'"{e}": {DTYPE_NAMES[text["text_dtype"]]}' for e in encoders)])
    lines = ["# the teacher pipeline's text encoders and VAE, holding SemE as its transformer",
             f'pipe = {PIPELINES[family]}.from_pretrained("{teacher}", transformer=seme,',
             f'    torch_dtype={{"default": torch.float32, {dtypes}}})']
    max_len = text["max_sequence_length"]
    if family == "hunyuan":
        lines += [f"text, pooled, mask = pipe.encode_prompt(prompts, max_sequence_length={max_len})",
                  "text, pooled = text.float(), pooled.float()"]
        note = (f"Guidance is embedded: every forward gets `guidance = {plan['guidance']:g}` (the teacher's "
                f"w = {plan['guidance_scale']:g} as its pipeline passes it: w · 1000, rounded through bf16).")
    elif family == "hunyuan15":
        lines += [f"pipe.tokenizer_max_length = {max_len}  # the run's Qwen2.5-VL text length "
                  "(a pipeline attribute)",
                  "text, mask, text_2, mask_2 = pipe.encode_prompt(prompts, batch_size=len(prompts))",
                  "text, text_2 = text.float(), text_2.float()  # Qwen2.5-VL and ByT5 (glyph) embeddings"]
        note = ("The teacher's classifier-free guidance is distilled into both experts: one forward per step "
                "with the prompt, no negative prompt. Both text encoders run as the pipeline runs them.")
    else:
        lines += [f"text, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, "
                  f"max_sequence_length={max_len})",
                  "text = text.float()"]
        note = ("The teacher's classifier-free guidance is distilled into both experts: one forward per step "
                "with the prompt, no negative prompt.")
    return note + "\n\n" + _code(lines)


def _sample_block(plan: dict) -> str:
    convention = plan["convention"]
    lines = ['scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained("scheduler")',
             '# shift 1: exactly these sigmas, then 0; scheduler.step is x + (σ_next − σ)·v',
             'scheduler.set_timesteps(sigmas=[s["sigma"] for s in plan["steps"]])']
    if convention == "cogvideox":
        lines += ["# RoPE tables of the latent grid, as the pipeline makes them "
                  "(None for models without RoPE)",
                  "f = pipe.vae_scale_factor_spatial",
                  "rope = (pipe._prepare_rotary_positional_embeddings(H * f, W * f, T, x.device)",
                  "        if seme.config.use_rotary_positional_embeddings else None)"]
    per_token = (plan.get("pipeline") or {}).get("expand_timesteps", False)
    if per_token:
        lines += ["# Wan 2.2 TI2V (expand_timesteps): one timestep per video token, every token at t, as",
                  "# WanPipeline builds it in text-to-video mode",
                  "p_t, p_h, p_w = seme.config.patch_size",
                  "tokens = (T // p_t) * (H // p_h) * (W // p_w)"]
    lines += ["with torch.no_grad():",
              '    for step, t in zip(plan["steps"], scheduler.timesteps):',
              '        model = seme if step["expert"] == "seme" else dete']
    if convention == "wan":
        timestep = "t.expand(len(x), tokens)" if per_token else "t.expand(len(x))"
        lines += ["        # timestep t = 1000·σ (= step[\"timestep\"]); the output is the flow velocity",
                  f"        v = model(hidden_states=x, timestep={timestep}, encoder_hidden_states=text,",
                  "                  return_dict=False)[0]"]
    elif convention == "hunyuan":
        lines += ["        # timestep t = 1000·σ (= step[\"timestep\"]); the output is the flow velocity",
                  "        v = model(hidden_states=x, timestep=t.expand(len(x)), encoder_hidden_states=text,",
                  "                  encoder_attention_mask=mask, pooled_projections=pooled,",
                  '                  guidance=torch.full((len(x),), plan["guidance"]), return_dict=False)[0]']
    elif convention == "hunyuan15":
        lines += ["        # T2V: latents + zero condition latents + a zero mask channel, zero image tokens; "
                  "t = 1000·σ",
                  "        latent_input = torch.cat([x, torch.zeros_like(x), torch.zeros_like(x[:, :1])], "
                  "dim=1)",
                  "        image = torch.zeros(len(x), pipe.vision_num_semantic_tokens, "
                  "seme.config.image_embed_dim)",
                  "        v = model(hidden_states=latent_input, timestep=t.expand(len(x)), "
                  "encoder_hidden_states=text,",
                  "                  encoder_attention_mask=mask, encoder_hidden_states_2=text_2,",
                  "                  encoder_attention_mask_2=mask_2, image_embeds=image, "
                  "return_dict=False)[0]"]
    else:
        lines += ["        # VP v-prediction: the model sees z = x / r at the VP timestep of σ (not the",
                  "        # scheduler's t = 1000·σ), frames before channels; "
                  "its v becomes the flow velocity",
                  '        z = x / step["r"]',
                  "        out = model(hidden_states=z.transpose(1, 2), encoder_hidden_states=text,",
                  '                    timestep=torch.full((len(x),), step["timestep"]), '
                  'image_rotary_emb=rope,',
                  "                    return_dict=False)[0].transpose(1, 2)",
                  '        x0 = step["alpha"] * z - step["s"] * out',
                  '        eps = step["s"] * z + step["alpha"] * out',
                  "        v = eps - x0"]
    lines += ["        x = scheduler.step(v, t, x).prev_sample"]
    text = _code(lines)
    if convention == "cogvideox":
        text += ("\nCogVideoX is a VP diffusion model with v-prediction (ᾱ_t from its DDIM scheduler); the "
                 "Euler step runs in the flow parametrisation x_σ = (1 − σ)·x0 + σ·ε. Each step of "
                 "`student_schedule.json` holds r = √((1−σ)² + σ²), α = (1−σ)/r, s = σ/r (the VP sample is "
                 "z = x/r) and the model's fractional timestep: σ interpolated on the teacher scheduler's "
                 "σ_t = s_t/(α_t + s_t), clamped to [0, 999]. No stock scheduler does this mapping at these "
                 "fractional timesteps, so it is written out above (tensor arithmetic only).\n")
    return text


def _decode_block(plan: dict) -> str:
    family = plan["family"]
    if family is None:
        return ""
    if family == "toy":
        return _code(["video = toy.decode_latents(x)  # (B, 3, frames, height, width) in [-1, 1]"])
    if family == "wan":
        lines = ["mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)",
                 "std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)",
                 "latents = x * std + mean"]
    else:
        lines = ["latents = x / pipe.vae.config.scaling_factor  # (B, C, T, H, W): the VAE's layout"]
    if plan["pipeline"]["vae_tiling"]:
        lines += ["pipe.vae.enable_tiling()  # as the run decoded (backbone.real.vae_tiling)"]
    if plan["pipeline"]["vae_slicing"]:
        lines += ["pipe.vae.enable_slicing()  # as the run decoded (backbone.real.vae_slicing)"]
    lines += ["with torch.no_grad():",
              "    video = pipe.vae.decode(latents.to(pipe.vae.dtype)).sample.float().clamp(-1, 1)",
              "# video: (B, 3, frames, height, width) in [-1, 1]"]
    return _code(lines)


# ------------------------------------------------------------------------------------ the command


def export(params: Params, method: str, out: str | Path | None = None) -> Path:
    """``dcm export``: the method's trained weights as a folder the stock diffusers pipeline loads, where
    its kind's module can write one (``export``)."""
    from dcm.methods import implementation

    impl = implementation(params, method)
    if not hasattr(impl, "export"):
        able = [k.name for k in METHOD_KINDS.values()
                if hasattr(importlib.import_module(f"dcm.methods.{k.module}"), "export")]
        raise ConfigError("--method", method, f"a method of kind {' or '.join(map(repr, able))} (this one "
                          f"is {params.method(method).kind!r})")
    return impl.export(params, method, out)
