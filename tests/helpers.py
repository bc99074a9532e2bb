"""What several test files share and that is not a fixture: repo paths, the smoke params, a scratch
git + DVC repo, a failing objective, tiny real-family pipelines, a report's method files, the shapes
world's videos, the memory plan's tiny workloads.  Fixtures live in conftest.py; a test file imports
from here, never from another test file or from conftest (tests/test_layers.py checks it)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from dcm.distill.loop import Objective

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ params and runs


def smoke_params(**training):
    """The smoke preset, with ``training`` keys overridden."""
    from dcm import config

    raw = config.load_raw(REPO / "params.yaml", preset="smoke")
    raw["training"].update(training)
    return config.parse(raw)


# Metrics keys that measure wall time (differ between any two runs); everything else is deterministic.
TIMING_KEYS = {"latency_s"}


def deterministic_metrics(folder: Path) -> dict[str, dict]:
    """metrics/<method>.json of a run, less the wall-time keys, for comparing two runs of one DAG."""
    return {f.stem: {k: v for k, v in json.loads(f.read_text()).items() if k not in TIMING_KEYS}
            for f in sorted(Path(folder).glob("*.json"))}


def run_dvc(repo: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    env = env if env is not None else os.environ
    env = {**env, "PATH": f"{bin_dir}:{env['PATH']}", "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run([str(bin_dir / "dvc"), *args], cwd=repo, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def smoke_dvc_repo(repo: Path) -> Path:
    """``repo`` (an empty folder) made a git + DVC repo of this project's DAG with the smoke params."""
    for name in ("Snakefile", "dvc.yaml", "workflow"):
        src = REPO / name
        shutil.copytree(src, repo / name) if src.is_dir() else shutil.copy(src, repo / name)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    run_dvc(repo, "init", "-q")
    subprocess.run([str(Path(sys.executable).parent / "dcm"), "params", "--params", str(REPO / "params.yaml"),
                    "--preset", "smoke", "-o", "params.yaml"], cwd=repo, check=True)
    return repo


# ------------------------------------------------------------------------------ training


class FailAt(Objective):
    """A training objective that injects a failure at one step: a NaN loss term (``kind="nan"``), or, while
    ``armed``, an interruption (a killed job); the requeued run passes the step."""

    name = "fail"

    def __init__(self, step: int, kind: str = "interrupt", armed: bool = False):
        self.step, self.kind, self.armed = step, kind, armed

    def generator_loss(self, batch):
        if batch.step != self.step:
            return {}
        if self.kind == "nan":
            return {"fail": torch.tensor(float("nan"))}
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt("simulated preemption")
        return {}


def perturbed_dete(backbone, params, rank: int = 4, alpha: float = 8.0):
    """A LoRA DetE on a copy of the teacher transformer with lora_B moved off zero (so the adapter's
    gradients flow through A too and DetE differs from SemE); returns (dual, teacher grid)."""
    from dcm import schedule
    from dcm.distill.experts import make_dete

    grid = schedule.teacher_grid(params.grid.steps, params.grid.shift, params.grid.num_train_timesteps)
    dual = make_dete(copy.deepcopy(backbone.transformer), backbone, rank, alpha, kappa=params.grid.kappa,
                     sigma_kappa=grid.sigma(params.grid.kappa))
    with torch.no_grad():
        for name, p in dual.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(1))
    return dual, grid


def video_source(params, backbone, quality="low", rows=4):
    """An online source of shapes-world videos (MCM's real data) at ``quality``, ``rows`` captions."""
    from dcm.distill.data import OnlineSource
    from dcm.schedule import teacher_grid
    from dcm.worlds import shapes

    captions = shapes.all_captions()
    train_rows = [{"prompt": captions[7 * i], "seed": i} for i in range(rows)]
    grid = teacher_grid(params.grid.steps, params.grid.shift, params.grid.num_train_timesteps)
    return OnlineSource(train_rows, backbone, grid, params.world.size, params.world.frames, quality)


# ------------------------------------------------------------------------------ tiny real pipelines

VIDEO = {"height": 32, "width": 32, "frames": 9}  # 3 latent frames of 4×4: 2×2 tokens per frame
PROMPTS = ["a red striped square moves left slowly", "a blue circle moves up quickly"]


def tiny_tokenizer(max_length: int = 512):
    """A word-level tokenizer over the shapes captions (plus pad/unk/eos), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from dcm.backbones.toy import caption_vocabulary

    words = [w for w in caption_vocabulary() if w not in ("<pad>", "<unk>")]
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="</s>", model_max_length=max_length)


TINY_WAN_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                    temperal_downsample=[False, True, True])


def save_tiny_wan(folder: Path, vae: dict, transformers: tuple[str, ...], shift: float, **pipeline) -> None:
    """A tiny WanPipeline saved by ``save_pretrained``: the tiny tokenizer and UMT5 encoder, an
    ``AutoencoderKLWan(**vae)``, one ``WanTransformer3DModel`` per name of ``transformers`` (wan.py's
    TRANSFORMER_CONFIGS; the second is ``transformer_2``), built in that order from the current seed."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    from dcm.backbones.wan import TRANSFORMER_CONFIGS as WAN_CONFIGS

    tokenizer = tiny_tokenizer()
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64,
                                          num_layers=1, num_heads=4, relative_attention_num_buckets=8))
    autoencoder = AutoencoderKLWan(**vae)
    models = [WanTransformer3DModel(**WAN_CONFIGS[name]) for name in transformers]
    experts = dict(zip(("transformer", "transformer_2"), models))
    WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=autoencoder,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), **experts, **pipeline
                ).save_pretrained(folder)


def build_wan(folder: Path) -> None:
    save_tiny_wan(folder, TINY_WAN_VAE, ("tiny",), shift=3.0)


def build_wan22_a14b(folder: Path, boundary_ratio: float = 0.875) -> None:
    """Wan 2.2 A14B's layout at tiny size: a WanPipeline with two transformers of the same configuration
    (high noise ``transformer``, low noise ``transformer_2``, different random weights) and
    ``boundary_ratio`` in its model_index.json."""
    save_tiny_wan(folder, TINY_WAN_VAE, ("tiny", "tiny"), shift=12.0, boundary_ratio=boundary_ratio)


def build_wan22_ti2v(folder: Path) -> None:
    """A tiny Wan 2.2 TI2V pipeline: ``expand_timesteps`` on, the Wan 2.2 VAE's form (z_dim 48, residual,
    patch size 2, 16× spatial compression) with its own per-channel latents_mean / latents_std."""
    vae = dict(base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1, is_residual=True,
               in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
               temperal_downsample=[False, True, True],
               latents_mean=torch.linspace(-0.3, 0.3, 48).tolist(),
               latents_std=torch.linspace(0.5, 2.0, 48).tolist())
    save_tiny_wan(folder, vae, ("ti2v-tiny",), shift=5.0, expand_timesteps=True)


def build_hunyuan(folder: Path) -> None:
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    from dcm.backbones.hunyuan import TRANSFORMER_CONFIGS as HY_CONFIGS

    tokenizer = tiny_tokenizer()
    llama = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=512, pad_token_id=0))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=77, eos_token_id=2, pad_token_id=0))
    vae = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4,
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 4,
                                    block_out_channels=(8, 8, 8, 8),
                                    layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=8,
                                    temporal_compression_ratio=4, mid_block_add_attention=True)
    pipe = HunyuanVideoPipeline(text_encoder=llama, tokenizer=tokenizer, text_encoder_2=clip,
                                tokenizer_2=tiny_tokenizer(77), vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                transformer=HunyuanVideoTransformer3DModel(**HY_CONFIGS["tiny"]))
    pipe.save_pretrained(folder)


# a chat template of the tiny tokenizer: HunyuanVideo15Pipeline._get_mllm_prompt_embeds formats every prompt
# as a (system, user) conversation, as Qwen2.5-VL's template does, and crops the first 108 template tokens
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def build_hunyuan15(folder: Path) -> None:
    """A tiny HunyuanVideo15Pipeline: a 3-layer Qwen2.5-VL text model (M-RoPE) with the word-level tokenizer
    and a chat template, a 1-layer T5 encoder with the real (byte-level) ByT5Tokenizer, the 1.5 VAE at 8×
    in space, the tiny transformer (in_channels 2·4 + 1), the 480p T2V scheduler shift and CFG guider."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from transformers import (
        ByT5Tokenizer,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLTextModel,
        T5Config,
        T5EncoderModel,
    )

    from dcm.backbones.hunyuan15 import TRANSFORMER_CONFIGS as HY15_CONFIGS

    tokenizer = tiny_tokenizer(2048)
    tokenizer.chat_template = CHAT_TEMPLATE
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048, rope_parameters=rope,
        pad_token_id=0, bos_token_id=None, eos_token_id=2))
    byt5_tokenizer = ByT5Tokenizer()
    byt5 = T5EncoderModel(T5Config(vocab_size=len(byt5_tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                   num_heads=4, relative_attention_num_buckets=8))
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                      spatial_compression_ratio=8, temporal_compression_ratio=4)
    pipe = HunyuanVideo15Pipeline(text_encoder=qwen, tokenizer=tokenizer, text_encoder_2=byt5,
                                  tokenizer_2=byt5_tokenizer, vae=vae,
                                  transformer=HunyuanVideo15Transformer3DModel(**HY15_CONFIGS["tiny"]),
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                                  guider=ClassifierFreeGuidance(guidance_scale=6.0))
    pipe.save_pretrained(folder)


def build_cogvideox(folder: Path) -> None:
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    from dcm.backbones.cogvideox import TRANSFORMER_CONFIGS as COG_CONFIGS

    tokenizer = tiny_tokenizer()
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                      num_heads=4, relative_attention_num_buckets=8))
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3,
                                 down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4)
    scheduler = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       timestep_spacing="trailing", snr_shift_scale=3.0, clip_sample=False,
                                       set_alpha_to_one=True)
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, scheduler=scheduler,
                             transformer=CogVideoXTransformer3DModel(**COG_CONFIGS["tiny"]))
    pipe.save_pretrained(folder)


# tiny teachers by name (a family's, or a family's other form: Wan 2.2 TI2V and A14B are family wan)
BUILDERS = {"wan": build_wan, "hunyuan": build_hunyuan, "hunyuan15": build_hunyuan15,
            "cogvideox": build_cogvideox, "wan22_ti2v": build_wan22_ti2v, "wan22_a14b": build_wan22_a14b}
TEACHER_FAMILY = {"wan22_ti2v": "wan", "wan22_a14b": "wan"}
# the TI2V VAE compresses 16× in space: 64-pixel frames give the same 2×2 tokens per latent frame
TEACHER_VIDEO = {"wan22_ti2v": {**VIDEO, "height": 64, "width": 64}}


def family_raw(teacher: str, folder: Path, **real) -> dict:
    """The smoke preset with a real teacher (a ``BUILDERS`` name): params.yaml content for a scratch project
    (MCM an ablation row, as in the real presets: its image discriminator trains on the shapes world's
    stills)."""
    from dcm import config

    raw = config.load_raw(REPO / "params.yaml", "smoke")
    settings = {**TEACHER_VIDEO.get(teacher, VIDEO), "max_sequence_length": 12, "text_dtype": "fp32",
                "vae_dtype": "fp32", **real}
    return config.deep_merge(raw, {"experiment": f"tiny-{teacher}",
                                   "backbone": {"family": TEACHER_FAMILY.get(teacher, teacher),
                                                "path": str(folder), "guidance_scale": 6.0,
                                                "real": settings},
                                   "methods": {"mcm": {"ablation": True}}})


def family_params(teacher: str, folder: Path, **real):
    from dcm import config

    return config.parse(family_raw(teacher, folder, **real))


# ------------------------------------------------------------------------------ real data

# words of the tiny tokenizer's vocabulary (the shapes captions'), in a user's own prompt files
TRAIN_PROMPTS = ["a red striped square moves left slowly", "a blue circle moves up quickly",
                 "a green triangle moves right slowly", "a yellow checked square moves down quickly"]
EVAL_PROMPTS = ["a blue striped circle moves left quickly", "a red triangle moves up slowly"]


def write_video(path: Path, frames: int, height: int = 48, width: int = 64, fps: int = 8,
                seed: int = 0) -> None:
    """A short mp4 (libx264 through imageio-ffmpeg) of a bright block moving over noise; sizes are
    multiples of 16 so ffmpeg keeps them."""
    import imageio.v2 as imageio

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(str(path), fps=fps, codec="libx264", macro_block_size=16,
                            ffmpeg_log_level="error") as writer:
        for k in range(frames):
            frame = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
            frame[8:24, 4 + 3 * k:20 + 3 * k] = (220, 180, 40)
            writer.append_data(frame)


def real_data(root: Path, videos: int = 0, frames: int = 12, per_prompt: int = 2) -> dict:
    """A user's data under ``root/inputs``: a training prompt file, an evaluation prompt file and, with
    ``videos``, a captioned video set (``videos`` short mp4s of ``frames`` frames and captions.jsonl); the
    params overlay that names them."""
    inputs = root / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    (inputs / "prompts.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    (inputs / "eval.txt").write_text("\n".join(EVAL_PROMPTS) + "\n")
    overlay = {"data": {"prompts": str(inputs / "prompts.txt")},
               "evaluation": {"prompts": str(inputs / "eval.txt"), "videos_per_prompt": per_prompt}}
    if videos:
        rows = []
        for i in range(videos):
            write_video(inputs / "videos" / f"clip{i}.mp4", frames, seed=i)
            rows.append({"video": f"clip{i}.mp4", "caption": TRAIN_PROMPTS[i % len(TRAIN_PROMPTS)]})
        (inputs / "videos" / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        overlay["data"]["videos"] = str(inputs / "videos")
    return overlay


def shrunk_wan(folder: Path, root: Path) -> dict:
    """The wan preset (its recipe: online source, prompt dropout 0.1, FSDP layout, checkpointing) at the tiny
    pipeline's size, with budgets of a few steps."""
    from dcm import config

    raw = config.deep_merge(config.load_raw(REPO / "params.yaml", "smoke"), config.preset_overlay("wan"))
    raw = config.deep_merge(raw, real_data(root, videos=4))
    return config.deep_merge(raw, {
        "backbone": {"path": str(folder), "real": {**VIDEO, "max_sequence_length": 12, "text_dtype": "fp32",
                                                   "vae_dtype": "fp32", "vae_slicing": False}},
        "grid": {"steps": 10, "kappa": 5},
        "trajectories": {"num_trajectories": 4, "batch_size": 2, "shard_size": 2},
        "training": {"checkpoint_every": 2, "log_every": 1},
        "evaluation": {"backend": "shapes-bench", "videos_per_prompt": 1},  # VBench needs its own venv
        "methods": {"teacher": {"sample_steps": 10},
                    "lcm": {"train_steps": 2},
                    "dcm": {"seme": {"train_steps": 2}, "dete": {"train_steps": 2, "lora_rank": 4,
                                                                 "lora_alpha": 8}}},
    })


# ------------------------------------------------------------------------------ reports


def write_method(root: Path, name: str, total: float, latency: float, steps: int) -> None:
    """A method's outputs as the report reads them: metrics/<name>.json, its sampled videos, its loss
    history."""
    from safetensors.numpy import save_file

    (root / "metrics").mkdir(exist_ok=True)
    record = {"method": name, "steps": steps, "nfe": steps, "latency_s": latency,
              "dimensions": {"colour": total, "motion_smoothness": 0.9},
              "quality": total + 0.01, "semantic": total - 0.02, "total": total,
              "total_ci95": [total - 0.03, total + 0.03],
              "diff_vs_teacher": {"total": {"mean": total - 0.8, "ci95": [total - 0.85, total - 0.75]}},
              "psnr_vs_teacher": float("inf") if name == "teacher" else 20.0}
    (root / "metrics" / f"{name}.json").write_text(json.dumps(record))
    samples = root / "samples" / name
    samples.mkdir(parents=True)
    rng = np.random.default_rng(len(name))
    save_file({"videos": rng.uniform(-1, 1, (4, 3, 8, 16, 16)).astype(np.float16)},
              str(samples / "videos.safetensors"))
    hist = root / "checkpoints" / name
    hist.mkdir(parents=True)
    (hist / "history.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0 / (i + 1)}) + "\n"
                                                for i in range(5)))


# ------------------------------------------------------------------------------ the memory plan


def plan_workloads(ti2v: bool = True) -> dict:
    """name → (``dcm.plan.memory.Workload``, context parallel): the toy teacher (params.yaml's backbone.toy at
    the shapes world's size) and DESIGN.md's tiny real configurations (and Wan 2.2 TI2V's form of the tiny
    Wan: 48 latent channels, one timestep per video token; ``ti2v=False`` leaves it out), DetE with feature
    matching only."""
    from dcm.plan import memory as mp
    from dcm.plan.memory import Workload

    toy = dict(patch_size=(8, 2, 2), num_attention_heads=12, attention_head_dim=32, in_channels=12,
               out_channels=12, text_dim=64, freq_dim=64, ffn_dim=768, num_layers=4, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    wan = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16,
               out_channels=16, text_dim=384, freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    hunyuan = dict(in_channels=16, out_channels=16, num_attention_heads=4, attention_head_dim=32,
                   num_layers=2, num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1,
                   guidance_embeds=True,
                   text_embed_dim=384, pooled_projection_dim=384, rope_axes_dim=(8, 12, 12))
    hunyuan15 = dict(in_channels=33, out_channels=16, num_attention_heads=4, attention_head_dim=16,
                     num_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=32,
                     text_embed_2_dim=32, image_embed_dim=16, rope_axes_dim=(4, 6, 6), task_type="t2v")
    cog = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=4,
               text_embed_dim=32, num_layers=2, sample_width=16, sample_height=16, sample_frames=9,
               patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16)
    common = dict(lora_rank=4, gan=False, fm=True)
    # Wan 2.2 TI2V's form at the tiny wan's width
    ti2v_config = dict(mp.CONFIGS[("wan", "ti2v-tiny")], num_attention_heads=4, attention_head_dim=32,
                       text_dim=384, freq_dim=64, ffn_dim=256)
    workloads = {
        "toy": (Workload("wan", toy, (12, 8, 8, 8), batch=4, text_tokens=8, name="toy", **common), 1),
        "wan": (Workload("wan", wan, (16, 8, 16, 16), batch=2, text_tokens=7, name="wan tiny", **common), 1),
        "wan-cp2": (Workload("wan", wan, (16, 8, 16, 16), batch=2, text_tokens=7, name="wan tiny",
                             **common), 2),
        "wan-ti2v": (Workload("wan", ti2v_config, (48, 8, 16, 16), batch=2, text_tokens=7,
                              name="wan ti2v tiny", **mp.PIPELINE_EXTRAS[("wan", "ti2v-tiny")], **common), 1),
        "hunyuan": (Workload("hunyuan", hunyuan, (16, 8, 16, 16), batch=2, text_tokens=6, name="hunyuan tiny",
                             **common), 1),
        "hunyuan15": (Workload("hunyuan15", hunyuan15, (16, 4, 8, 8), batch=2, text_tokens=6,
                               name="hunyuan15 tiny", **common), 1),
        "cogvideox": (Workload("cogvideox", cog, (4, 8, 16, 16), batch=2, text_tokens=16,
                               name="cogvideox tiny", **common), 1),
    }
    if not ti2v:
        del workloads["wan-ti2v"]
    return workloads


# ------------------------------------------------------------------------------ SLURM


def cluster_answers() -> bool:
    """A SLURM controller that answers sinfo with an idle, mixed or allocated node (DCM_SLURM_TESTS=1 forces
    the SLURM tests)."""
    if os.environ.get("DCM_SLURM_TESTS"):
        return True
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mix", "alloc"))
