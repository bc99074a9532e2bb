"""Per-GPU memory plan for SemE, DetE and DMD2 at a preset's video size, before a job is queued.

    dcm plan --family hunyuan --gpus 24 --gpu-mem-gb 80 --context-parallel 8 --shard-teacher
    dcm plan --family wan --variant 14B --gpus 8 --gpu-mem-gb 80 [--json]

Nothing is allocated and no GPU is needed:

- the real transformer (diffusers class, the released config below) is built on the meta device and
  sharded with FSDP2 ``fully_shard`` (every block, then the root: what ``dcm.parallel.fsdp`` does) under
  PyTorch's fake process group acting as rank 0 of the shard group; parameter, gradient, optimizer and
  EMA bytes are the local shard sizes it reports (rank 0 holds the largest shard);
- activations come from one forward of the real model on meta tensors at the preset's latent size,
  through ``dcm.parallel.context`` with the fake group as the context-parallel group (so the rank's
  tokens are what the real run has), counting every tensor autograd saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``), attention counted as a fused kernel does (q, k, v,
  out, log-sum-exp: flash / cuDNN / memory-efficient SDPA), per block.  With A_b the bytes saved
  inside block b, I_b the bytes of block b's inputs (the residual stream, and the text stream of the
  joint families) and A_out those saved outside the blocks (embeddings, output head, loss):
      no checkpointing:          A = A_out + Σ_b A_b                    (the peak: backward's start)
      activation checkpointing:  A = A_out + Σ_b I_b + max_b A_b        (one block recomputed in backward)
  For a dense block this is ≈ L·B·(S/C)·h·β bytes (L blocks, batch B, S video tokens over C ranks, width
  h); the run prints β, the bytes per token per hidden unit per block.
- the FSDP working set at that peak: the gathered block being computed and the prefetched next one, and
  the root's gathered weights (those outside the blocks, kept through forward and backward), in the
  compute dtype: T = c·(2·max_b |θ_b| + |θ_root|) bytes, c = 2 (bf16 compute) or 4 (fp32); 0 unsharded.
  The blocks' unsharded gradients are not added: every sharded gradient is counted as present, and at
  backward's start none is (the loop sets them to None at each step's start).
  Passes chained in one backward (DetE: the student, the teacher's with grad, the GAN/FM terms on its
  taps) add up without checkpointing; with it, backward recomputes the last pass's blocks first while the
  earlier passes' block inputs are held, and a pass's saves are freed before the one before it recomputes.

What each stage holds (the loop's, ``dcm.distill.loop`` / ``dcm.pipeline.stages``): fp32 master weights,
fp32 gradients and AdamW's two fp32 moments for what trains (SemE: the whole transformer; DetE: the LoRA
adapter and the copied timestep layers, over a frozen fp32 SemE), an EMA copy only with ``--ema`` (DCM's
experts use the online target), the frozen teacher in fp32 (every rank a copy, or sharded with
``--shard-teacher``: ``training.parallel.shard_teacher``), the VAE in the preset's dtype, and for DetE the
discriminator heads (fp32 weights, gradients, AdamW) and the GAN/FM terms
(``dcm.distill.discriminator.GanFeatureMatching``):
- the teacher's pass with grad on the student's output (a frozen network: it saves only what the gradient
  to its input needs), and its pass without grad on the real endpoint;
- the taps of both passes (every 2nd block's output) gathered whole on every rank under context
  parallelism (``dcm.parallel.context.gather_taps``): one set is taps × B × S × dim elements, S the whole
  clip's video tokens, not S/C;
- the generator's terms on the whole grid: the hinge through the frozen heads, feature matching through
  the teacher's output head, whose saves are held until their backward;
- with the GAN, both sets of every micro-batch held from its generator pass to the discriminator's steps,
  which run after the optimizer step (so ``training.grad_accum`` micro-batches' sets are held at once; a
  ``dete.disc_steps`` > 1 re-noises and runs the teacher again: one more pair of sets), and one D step
  saving every head's activations (trainable, fp32) on the real and the fake sets.
The step's activation peak is the larger of the generator's backward (passes, terms, the sets held so far)
and the discriminator's step (every held set and one D step's saves; the FSDP working set, counted in
every row, is an over-count there: FSDP2 has resharded after backward).  These terms are measured on meta
through the objective's own pieces (``Discriminator``, the family adapter's ``capture_features`` and
``project_features``, ``gather_taps`` over the fake context-parallel group).
DMD2 (``dcm.distill.dmd2``): the whole generator trains as SemE does (online target, no EMA), and the fake
score, a second full transformer, trains beside it with its own AdamW, sharded like the generator
(``DistributionMatching.parallelize``); its training passes follow the generator's, so the activation
peak is one full-transformer pass, plus, with the GAN classifier, the generator's backward through the
fake score (a second pass with grad, as DetE's teacher pass) and one classifier head's state.
Sharding is over ``--shard-group`` ranks (default all N: FSDP over the data-parallel × context-parallel
ranks, torchtitan's ``dp_shard_cp``); N/S groups replicate.

Disk: the trajectory cache = (grid.steps + 1) points × latent elements × bytes of trajectories.dtype ×
num_trajectories, and each stage's outputs (diffusers / PEFT exports in fp32 and the resume state).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MethodType, SimpleNamespace

import torch
import torch.distributed as dist

from dcm.backbones.hunyuan15 import TRANSFORMER_CONFIGS as _HY15_CONFIGS
from dcm.backbones.wan import TRANSFORMER_CONFIGS as WAN_CONFIGS
from dcm.config import ConfigError, accumulation
from dcm.parallel.context import allowed_degrees, check_context_parallel, enable_context_parallel

GiB = 2**30
SHARD_KEY = "training.parallel.shard_group_size"

# ----------------------------------------------------------------------------- the released configs
# diffusers config dicts of the released transformers (their transformer/config.json).
#  Wan 2.1: the Wan team's configs (Wan2.1 repo, wan/configs/wan_t2v_1_3B.py: dim 1536, ffn_dim 8960,
#    num_heads 12, num_layers 30, freq_dim 256, patch (1, 2, 2), qk_norm, cross_attn_norm, eps 1e-6;
#    wan_t2v_14B.py: dim 5120, ffn_dim 13824, num_heads 40, num_layers 40), head dim 128 = dim / heads,
#    text_dim 4096 (umT5-XXL); diffusers' scripts/convert_wan_to_diffusers.py writes the same into
#    Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers/transformer/config.json.
#  HunyuanVideo 13B: diffusers' HunyuanVideoTransformer3DModel defaults, which its
#    scripts/convert_hunyuan_video_to_diffusers.py instantiates for the released checkpoint
#    (hunyuanvideo-community/HunyuanVideo): 24 heads × 128, 20 dual- + 40 single-stream blocks, 2 refiner
#    layers, mlp_ratio 4, text 4096 (LLaVA-Llama-3) + pooled 768 (CLIP-L), rope (16, 56, 56), guidance
#    embedded (tencent/HunyuanVideo's own config: hidden 3072, heads 24, mm_double_blocks_depth 20,
#    mm_single 40).
#  CogVideoX: diffusers' scripts/convert_cogvideox_to_diffusers.py ("For CogVideoX-2B, num_layers is 30.
#    For 5B, it is 42"; heads 30 / 48; RoPE off for 2B, on for 5B) over the class defaults (head dim 64,
#    time_embed_dim 512, text 4096 (T5-XXL), max_text_seq_length 226, sample 49 × 60 × 90, patch 2).
#  HunyuanVideo 1.5 8.3B (T2V): diffusers' scripts/convert_hunyuan_video1_5_to_diffusers.py,
#    TRANSFORMER_CONFIGS["480p_t2v"] (dcm.backbones.hunyuan15): 16 heads × 128, 54 dual-stream blocks,
#    patch 1, 65 input channels (32 latent + 32 condition + 1 mask), text 3584 (Qwen2.5-VL-7B) + 1472
#    (ByT5), image 1152.
CONFIGS: dict[tuple[str, str], dict] = {
    ("wan", "1.3B"): dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                          in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                          num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                          rope_max_seq_len=1024),
    ("wan", "14B"): dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
                         in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824,
                         num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                         rope_max_seq_len=1024),
    ("hunyuan", "13B"): dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                             num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0,
                             patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
                             text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
                             rope_axes_dim=(16, 56, 56)),
    ("cogvideox", "2B"): dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16,
                              time_embed_dim=512, text_embed_dim=4096, num_layers=30, sample_width=90,
                              sample_height=60, sample_frames=49, patch_size=2, max_text_seq_length=226,
                              attention_bias=True, use_rotary_positional_embeddings=False),
    ("cogvideox", "5B"): dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16,
                              time_embed_dim=512, text_embed_dim=4096, num_layers=42, sample_width=90,
                              sample_height=60, sample_frames=49, patch_size=2, max_text_seq_length=226,
                              attention_bias=True, use_rotary_positional_embeddings=True),
    # Wan 2.2 TI2V-5B and its tiny CPU form: dcm.backbones.wan.TRANSFORMER_CONFIGS (sources cited there)
    ("wan", "ti2v-5B"): WAN_CONFIGS["ti2v-5B"],
    ("wan", "ti2v-tiny"): WAN_CONFIGS["ti2v-tiny"],
    ("hunyuan15", "8.3B"): dict(_HY15_CONFIGS["8.3B"]),
}
#  Wan 2.2 T2V A14B: two experts of Wan 2.1 14B's configuration (the Wan2.2 repo, wan/configs/wan_t2v_A14B.py:
#    dim 5120, ffn_dim 13824, num_heads 40, num_layers 40; high_noise_model and low_noise_model).
CONFIGS[("wan", "A14B")] = CONFIGS[("wan", "14B")]
VARIANTS = {"wan": ("1.3B", "14B", "A14B", "ti2v-5B", "ti2v-tiny"), "hunyuan": ("13B",),
            "hunyuan15": ("8.3B",), "cogvideox": ("2B", "5B")}
# the teacher's transformers (each of the variant's config); one of them runs per forward
EXPERTS = {("wan", "A14B"): 2}
DEFAULT_VARIANT = {"wan": "1.3B", "hunyuan": "13B", "hunyuan15": "8.3B", "cogvideox": "2B"}
# (latent channels, spatial compression) of the family's VAE (time is ÷4 for all of them), where a variant's
# own VAE config (PIPELINE_EXTRAS) does not say
LATENT = {"hunyuan15": (32, 16)}
DEFAULT_LATENT = (16, 8)
# HunyuanVideo 1.5's other text streams beside the Qwen2.5-VL tokens: ByT5's 256 glyph tokens and the T2V
# call's 729 zero image tokens (HunyuanVideo15Pipeline.tokenizer_2_max_length, vision_num_semantic_tokens)
HY15_GLYPH_TOKENS, HY15_IMAGE_TOKENS = 256, 729
# the Wan 2.2 VAE (Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json, as diffusers'
# scripts/convert_wan_to_diffusers.py writes it: z_dim 48, residual, patchified by 2 into 12 channels, 16×
# spatial compression); its latents_mean / latents_std do not change sizes and are left at the defaults
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                 patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4)
# what a released variant's pipeline adds to its transformer: its VAE's config (none: the family class's
# defaults, the released VAE) and one timestep per video token (WanPipeline's expand_timesteps)
PIPELINE_EXTRAS = {("wan", "ti2v-5B"): dict(vae_config=WAN22_VAE, per_token_timestep=True),
                   ("wan", "ti2v-tiny"): dict(vae_config=WAN22_VAE, per_token_timestep=True)}
# the preset a variant is planned at by `dcm plan --family` (default: the family's)
VARIANT_PRESET = {("wan", "ti2v-5B"): "wan22_ti2v", ("wan", "ti2v-tiny"): "wan22_ti2v",
                  ("wan", "A14B"): "wan22_a14b"}
# what DetE copies and where the LoRA goes (dcm.backbones.<family>: timestep_layer_names, lora_target_modules)
TIMESTEP_LAYERS = {"wan": ("condition_embedder", "norm_out", "proj_out"),
                   "hunyuan": ("time_text_embed", "norm_out", "proj_out"),
                   "hunyuan15": ("time_embed", "norm_out", "proj_out"),
                   "cogvideox": ("time_embedding", "norm_out", "proj_out")}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ROLES = ("seme", "dete", "teacher")  # what trains in a forward: every weight, DetE's adapters, nothing
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GPU_COUNTS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


def transformer_class(family: str):
    import diffusers

    return {"wan": diffusers.WanTransformer3DModel, "hunyuan": diffusers.HunyuanVideoTransformer3DModel,
            "hunyuan15": diffusers.HunyuanVideo15Transformer3DModel,
            "cogvideox": diffusers.CogVideoXTransformer3DModel}[family]


def vae_class(family: str):
    """The family's VAE class; its defaults are the released VAE's configuration."""
    import diffusers

    return {"wan": diffusers.AutoencoderKLWan, "hunyuan": diffusers.AutoencoderKLHunyuanVideo,
            "hunyuan15": diffusers.AutoencoderKLHunyuanVideo15,
            "cogvideox": diffusers.AutoencoderKLCogVideoX}[family]


def vae_parameter_count(family: str, vae_config: dict | None = None) -> int:
    """The family's VAE (diffusers' class defaults = the released VAEs; ``vae_config``: another one, Wan
    2.2's), counted on the meta device."""
    with torch.device("meta"):
        return sum(p.numel() for p in vae_class(family)(**(vae_config or {})).parameters())


# ----------------------------------------------------------------------------- the workload

@dataclass
class Workload:
    """One family at one video size: what the plan needs to know."""

    family: str
    config: dict
    latent: tuple[int, int, int, int]  # (C, T, H, W)
    batch: int = 1
    text_tokens: int = 256
    lora_rank: int = 128
    gan: bool = True
    fm: bool = True
    # DMD2's classifier on the fake score's features (methods.dmd2.dmd2.gan_weight > 0)
    dmd2_gan: bool = False
    grad_accum: int = 1  # training.grad_accum: micro-batches whose GAN taps are held until the D steps
    global_batch: int | None = None  # training.global_batch_size: grad_accum then follows from the GPUs
    disc_steps: int = 1  # dete.disc_steps: D steps per generator step (> 1: the teacher runs again per step)
    vae_params: int = 0
    vae_bytes: int = 2
    # the teacher's transformers, each of ``config`` (Wan 2.2 A14B: 2, its high- and low-noise experts); one
    # runs per forward, so activations and FLOPs are one transformer's
    experts: int = 1
    grid_points: int = 51
    num_trajectories: int = 0
    trajectory_bytes: int = 4
    name: str = ""
    vae_config: dict | None = None  # the VAE's config where it is not the family class's defaults (Wan 2.2)
    per_token_timestep: bool = False  # one timestep per video token (Wan 2.2 TI2V: expand_timesteps)

    @property
    def tokens(self) -> int:
        from dcm.parallel.context import video_tokens

        return video_tokens(self.config, self.latent[1:], self.family)

    @property
    def heads(self) -> int:
        return int(self.config["num_attention_heads"])


def preset_workload(family: str, variant: str | None = None, params: str | Path = "params.yaml") -> Workload:
    """The workload of ``src/dcm/presets/<family>.yaml`` over the params file ``params`` (video size, batch,
    gradient accumulation, text length, LoRA rank, trajectories) with the released config of ``variant``."""
    from dcm import config as dcm_config

    variant = variant or DEFAULT_VARIANT[family]
    if variant not in VARIANTS[family]:
        raise ConfigError("--variant", variant, f"one of {list(VARIANTS[family])} for family {family!r}")
    # the preset as merged over params.yaml (load_raw: no check that the weights folder exists here)
    raw = dcm_config.load_raw(params, preset=VARIANT_PRESET.get((family, variant), family))
    return replace(raw_workload(raw, family, CONFIGS[(family, variant)], variant,
                                **PIPELINE_EXTRAS.get((family, variant), {})),
                   experts=EXPERTS.get((family, variant), 1))


def raw_workload(raw: dict, family: str, cfg: dict, variant: str, dcm: str = "dcm",
                 dmd2: str = "dmd2", vae_config: dict | None = None,
                 per_token_timestep: bool = False) -> Workload:
    """The workload of a params mapping (``load_raw``'s, or ``Params.to_dict()``) for the transformer config
    ``cfg`` (named ``variant``): DetE's settings from the row ``dcm``, DMD2's from the row ``dmd2``;
    ``vae_config`` and ``per_token_timestep`` as ``PIPELINE_EXTRAS`` gives them."""
    real = raw["backbone"]["real"]
    # the VAEs: ÷4 in time, ÷8 in space (a variant's own VAE config where it has one, Wan 2.2's: z_dim 48,
    # ÷16; HunyuanVideo 1.5: 32 channels, ÷16)
    vae = vae_config or {}
    channels, spatial = LATENT.get(family, DEFAULT_LATENT)
    channels, spatial = vae.get("z_dim", channels), vae.get("scale_factor_spatial", spatial)
    temporal = vae.get("scale_factor_temporal", 4)
    latent = (channels, (real["frames"] - 1) // temporal + 1, real["height"] // spatial,
              real["width"] // spatial)
    default_text = 1000 if family == "hunyuan15" else 256  # the pipelines' max_sequence_length defaults
    text = (cfg["max_text_seq_length"] if family == "cogvideox"
            else (real.get("max_sequence_length") or default_text))
    dete = (raw["methods"].get(dcm) or {}).get("dete") or {}
    dmd2_row = (raw["methods"].get(dmd2) or {}).get("dmd2") or {}
    trajectories = raw["trajectories"]
    return Workload(family=family, config=cfg, latent=latent, batch=raw["training"]["batch_size"],
                    text_tokens=text, lora_rank=dete.get("lora_rank", 128),
                    gan=dete.get("gan_weight", 1.0) > 0, fm=dete.get("fm_weight", 1.0) > 0,
                    dmd2_gan=dmd2_row.get("gan_weight", 5e-3) > 0,
                    grad_accum=raw["training"].get("grad_accum", 1), disc_steps=dete.get("disc_steps", 1),
                    global_batch=raw["training"].get("global_batch_size"),
                    vae_params=vae_parameter_count(family, vae_config), vae_config=vae_config,
                    per_token_timestep=per_token_timestep,
                    vae_bytes=DTYPE_BYTES[real.get("vae_dtype", "bf16")],
                    grid_points=raw["grid"]["steps"] + 1, num_trajectories=trajectories["num_trajectories"],
                    trajectory_bytes=DTYPE_BYTES[trajectories.get("dtype", "fp32")],
                    name=f"{family} {variant} at {real['frames']}×{real['height']}×{real['width']}")


# ----------------------------------------------------------------------------- fake process group

@contextlib.contextmanager
def fake_world(size: int):
    """PyTorch's fake process group: this process is rank 0 of ``size``; collectives do nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the memory plan needs a process without a process group (it uses the fake one)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build(work: Workload, dtype: torch.dtype = torch.float32):
    with torch.device("meta"):
        model = transformer_class(work.family)(**work.config).to(dtype)
    if work.family == "hunyuan15":
        model.forward = MethodType(_hunyuan15_meta_forward, model)
    return model


def _hunyuan15_meta_forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                            encoder_hidden_states_2=None, encoder_attention_mask_2=None, image_embeds=None,
                            return_dict=False, **_):
    """``HunyuanVideo15Transformer3DModel.forward`` with shapes only, for the meta device: its T2V test
    (``torch.all(image_embeds == 0)``) and its per-sample reorder of the text tokens (valid ones first, by
    boolean masks) need values.  Here the three text streams are concatenated in place (image, ByT5, Qwen,
    each with its condition-type embedding): tensors of the sizes the real forward makes; then the same
    blocks, output head and unpatchify."""
    b, _, t, h, w = hidden_states.shape
    pt, p = self.config.patch_size_t, self.config.patch_size
    rotary = self.rope(hidden_states)
    temb = self.time_embed(timestep)
    x = self.x_embedder(hidden_states)
    streams = [self.image_embedder(image_embeds), self.context_embedder_2(encoder_hidden_states_2),
               self.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)]
    kinds = [torch.full(s.shape[:2], k, dtype=torch.long, device=s.device)
             for k, s in zip((2, 1, 0), streams)]
    context = torch.cat([s + self.cond_type_embed(k) for s, k in zip(streams, kinds)], dim=1)
    mask = torch.cat([torch.zeros(b, image_embeds.shape[1], dtype=torch.bool, device=x.device),
                      encoder_attention_mask_2.bool(), encoder_attention_mask.bool()], dim=1)
    for block in self.transformer_blocks:
        x, context = block(x, context, temb, mask, rotary)
    x = self.proj_out(self.norm_out(x, temb))
    x = x.reshape(b, t // pt, h // p, w // p, -1, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return (x.reshape(b, x.shape[1], t, h, w),)


def make_dete_meta(seme, work: Workload):
    """DetE as ``dcm.distill.experts.make_dete`` builds it (LoRA on SemE + copied timestep layers), on
    meta."""
    from dcm.distill.experts import make_dete

    # the LoRA form on SemE: a two-expert teacher's DetE (the same adapter on a copy of the low-noise expert
    # of the same config) has these trainable numbers, its second frozen transformer is added in ``plan``
    backbone = SimpleNamespace(timestep_layer_names=TIMESTEP_LAYERS[work.family],
                               lora_target_modules=LORA_TARGETS, model_timestep=lambda s: 1000.0 * s,
                               two_experts=False)
    with torch.device("meta"):
        return make_dete(seme, backbone, work.lora_rank, 2.0 * work.lora_rank, kappa=1, sigma_kappa=0.5)


def shard_analytic(shape: torch.Size, ranks: int) -> int:
    """Rank 0's elements of a parameter FSDP2 shards on dim 0 over ``ranks`` (padded: ceil)."""
    if len(shape) == 0:
        return 1
    return math.ceil(shape[0] / ranks) * math.prod(shape[1:])


def sharded_numels(model, ranks: int) -> dict[str, tuple[int, int, bool]]:
    """name → (rank 0's elements, all elements, trainable) after ``fully_shard`` on every block and the
    root over ``ranks`` fake ranks (``dcm.parallel.fsdp.parallelize``'s wrapping), read from the DTensors."""
    from dcm.parallel.fsdp import transformer_blocks

    full = {n: (p.numel(), p.requires_grad) for n, p in model.named_parameters()}
    if ranks == 1:
        return {n: (numel, numel, grad) for n, (numel, grad) in full.items()}
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = copy.deepcopy(model)
    with fake_world(ranks):
        mesh = init_device_mesh("cpu", (ranks,))
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        local = {n: p.to_local().numel() for n, p in model.named_parameters()}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    for n, numel in local.items():  # FSDP2's rule, used for the GPU-count search without re-sharding
        assert numel == shard_analytic(shapes[n], ranks), (n, numel, shapes[n], ranks)
    return {n: (local[n], *full[n]) for n in full}


def numel_table(model) -> dict[str, tuple[torch.Size, bool]]:
    return {n: (p.shape, p.requires_grad) for n, p in model.named_parameters()}


def local_numels(table: dict[str, tuple[torch.Size, bool]], ranks: int) -> tuple[int, int]:
    """(trainable, frozen) elements rank 0 holds when sharded over ``ranks`` (FSDP2's rule)."""
    trainable = sum(shard_analytic(s, ranks) for s, g in table.values() if g)
    frozen = sum(shard_analytic(s, ranks) for s, g in table.values() if not g)
    return trainable, frozen


def block_numels(model) -> tuple[int, int]:
    """(largest block's parameters, the root's: those outside every block) as FSDP2 groups them."""
    from dcm.parallel.fsdp import transformer_blocks

    blocks = [sum(p.numel() for p in block.parameters()) for block in transformer_blocks(model)]
    return max(blocks), sum(p.numel() for p in model.parameters()) - sum(blocks)


def fsdp_working_set(block: tuple[int, int], compute_bytes: int) -> int:
    """FSDP2's gathered weights at backward's start, in the compute dtype: the block being computed, the
    prefetched next one and the root's (kept through forward and backward); no gradients (module
    docstring)."""
    largest, root = block
    return compute_bytes * (2 * largest + root)


# ----------------------------------------------------------------------------- activations on meta

class _FusedAttention(torch.autograd.Function):
    """Shape-only SDPA that saves what a fused kernel saves: q, k, v, out and the log-sum-exp, and an
    attention mask as the additive bias in q's dtype that the masked kernels keep for backward (HunyuanVideo
    1.5's (B, 1, S, S) query-and-key mask is quadratic in the tokens)."""

    @staticmethod
    def forward(ctx, q, k, v, bias=None):
        out = torch.empty_like(q)
        saved = (q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        ctx.save_for_backward(*saved, *(() if bias is None else (bias,)))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


@contextlib.contextmanager
def fused_attention_accounting():
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "meta":
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        bias = None if attn_mask is None else attn_mask.new_empty(attn_mask.shape, dtype=query.dtype)
        return _FusedAttention.apply(query, key, value, bias)

    functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def model_inputs(work: Workload, dtype: torch.dtype, device="meta", generator: torch.Generator | None = None):
    """The transformer's keyword inputs at the workload's size (random on a real device)."""
    def randn(*shape):
        if device == "meta":
            return torch.empty(*shape, dtype=dtype, device="meta")
        return torch.randn(*shape, generator=generator).to(dtype)

    c, t, h, w = work.latent
    b, cfg = work.batch, work.config
    timestep = torch.full((b,), 500.0, device=device)
    if work.per_token_timestep:  # (B, video tokens), as WanPipeline gives it with expand_timesteps
        timestep = torch.full((b, work.tokens), 500.0, device=device)
    if work.family == "wan":
        return dict(hidden_states=randn(b, c, t, h, w), timestep=timestep,
                    encoder_hidden_states=randn(b, work.text_tokens, cfg["text_dim"]))
    if work.family == "hunyuan15":  # the T2V input: latents + zero condition latents + zero mask channel
        mask = torch.ones(b, work.text_tokens, dtype=torch.long, device=device)
        # the timestep in the compute dtype, as the pipeline passes it (t.expand(B).to(latents.dtype))
        return dict(hidden_states=randn(b, cfg["in_channels"], t, h, w), timestep=timestep.to(dtype),
                    encoder_hidden_states=randn(b, work.text_tokens, cfg["text_embed_dim"]),
                    encoder_attention_mask=mask,
                    encoder_hidden_states_2=randn(b, HY15_GLYPH_TOKENS, cfg["text_embed_2_dim"]),
                    encoder_attention_mask_2=torch.ones(b, HY15_GLYPH_TOKENS, dtype=torch.long,
                                                        device=device),
                    image_embeds=torch.zeros(b, HY15_IMAGE_TOKENS, cfg["image_embed_dim"], dtype=dtype,
                                             device=device))  # T2V: zero image tokens
    if work.family == "hunyuan":
        return dict(hidden_states=randn(b, c, t, h, w), timestep=timestep,
                    encoder_hidden_states=randn(b, work.text_tokens, cfg["text_embed_dim"]),
                    encoder_attention_mask=torch.ones(b, work.text_tokens, dtype=torch.long, device=device),
                    pooled_projections=randn(b, cfg["pooled_projection_dim"]),
                    guidance=torch.full((b,), 6000.0, device=device))
    inputs = dict(hidden_states=randn(b, t, c, h, w), timestep=timestep.long(),
                  encoder_hidden_states=randn(b, work.text_tokens, cfg["text_embed_dim"]))
    if cfg.get("use_rotary_positional_embeddings"):
        tokens, dim = t * (h // cfg["patch_size"]) * (w // cfg["patch_size"]), cfg["attention_head_dim"]
        inputs["image_rotary_emb"] = (torch.ones(tokens, dim, device=device),
                                      torch.ones(tokens, dim, device=device))
    return inputs


@dataclass
class ActivationProfile:
    """Bytes autograd saves in one forward: per block, the blocks' inputs, outside the blocks."""

    per_block: list[int] = field(default_factory=list)
    block_inputs: int = 0
    outside: int = 0
    local_tokens: int = 0
    hidden: int = 0

    @property
    def no_checkpointing(self) -> int:
        return self.outside + sum(self.per_block)

    @property
    def checkpointing(self) -> int:
        return self.outside + self.block_inputs + max(self.per_block)

    @property
    def beta(self) -> float:
        """Bytes per token per hidden unit per block (the formula's constant)."""
        return sum(self.per_block) / max(1, len(self.per_block) * self.local_tokens * self.hidden)


def saved_bytes(run, blocks, joint: bool) -> ActivationProfile:
    """Run ``run()`` under saved-tensor hooks: what autograd keeps for backward, by block."""
    owner: list[int | None] = [None]
    saved: dict[int, tuple[int, int | None]] = {}
    inputs: dict[int, int] = {}
    keep = []

    def size(t):
        return t.numel() * t.element_size()

    def pack(t):
        base = t._base if t._base is not None else t
        if isinstance(base, torch.nn.Parameter):  # weights saved for backward are counted as parameters
            return t
        if id(base) not in saved:
            saved[id(base)] = (size(base), owner[0])
            keep.append(base)
        return t

    def pre(index):
        def hook(_module, args, kwargs):
            owner[0] = index
            values = list(args) + list(kwargs.values())
            for t in values[: 2 if joint else 1]:  # the residual stream (and the joint families' text stream)
                if isinstance(t, torch.Tensor):
                    base = t._base if t._base is not None else t
                    inputs[id(base)] = size(base)
                    keep.append(base)
        return hook

    def post(_module, _args, _output):
        owner[0] = None

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post) for b in blocks]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fused_attention_accounting():
            out = run()
    finally:
        for h in handles:
            h.remove()
    per_block = [0] * len(blocks)
    outside = 4 * out.numel() * 4  # the loss on the output: a few fp32 copies (x̂, motion differences)
    for nbytes, who in saved.values():
        if who is None:
            outside += nbytes
        else:
            per_block[who] += nbytes
    return ActivationProfile(per_block, sum(inputs.values()), outside)


def family_blocks(model, family: str) -> list:
    if family == "wan":
        return list(model.blocks)
    if family == "hunyuan":
        return list(model.transformer_blocks) + list(model.single_transformer_blocks)
    return list(model.transformer_blocks)


def activation_profile(work: Workload, cp: int, compute: torch.dtype,
                       role: str = "seme") -> ActivationProfile:
    """One forward of the real model on meta at the workload's size, through ``dcm.parallel.context`` over
    a fake group of ``cp`` ranks (rank 0's tokens).  ``role``: ``seme`` (every weight trains), ``dete``
    (the LoRA-wrapped SemE: only the adapters and copied layers train) or ``teacher`` (every weight frozen,
    the input requiring grad: DetE's feature pass and DMD2's pass through the fake score, which
    backpropagate to the student's output only; a frozen linear layer saves no input for a weight
    gradient)."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: one of {ROLES}")
    model = build(work, compute)
    inputs = model_inputs(work, compute)
    # DetE's path: the adapters on and its trainable copies of the timestep layers swapped in
    dual = make_dete_meta(model, work) if role == "dete" else None

    def run():
        return (dual.run_expert("dete", **inputs) if dual is not None
                else model(**inputs, return_dict=False)[0])

    if role == "teacher":
        model.requires_grad_(False)
        inputs["hidden_states"].requires_grad_(True)
    with fake_world(cp):
        if cp > 1:
            enable_context_parallel(model, work.family)
        profile = saved_bytes(run, family_blocks(model, work.family), joint=work.family != "wan")
    profile.local_tokens = work.tokens // cp
    profile.hidden = int(work.config["num_attention_heads"] * work.config["attention_head_dim"])
    return profile


def activation_profiles(work: Workload, cp: int,
                        compute: torch.dtype) -> dict[tuple[int, str], ActivationProfile]:
    """(cp, role) → the activation profile of each role at context-parallel degree ``cp``."""
    return {(cp, role): activation_profile(work, cp, compute, role) for role in ROLES}


@dataclass
class AdversarialProfile:
    """DetE's GAN / feature-matching bytes per micro-batch beyond the teacher's pass with grad (module
    docstring)."""

    # one set of feature taps (the real pass's or the fake's) as the objective holds it: gathered
    taps: int = 0
    # what the generator's terms save beyond the two sets: hinge through frozen heads, FM's head
    generator: int = 0
    # what one D step saves: every head, trainable, on the real set and on the fake set
    discriminator: int = 0
    params: int = 0  # the discriminator's parameters (0 without the GAN)


def _family_adapter(family: str):
    """The family's ``Backbone`` adapter without its pipeline: only its methods on a transformer are used
    (``capture_features``, ``project_features``, ``token_patch``)."""
    from dcm.backbones import adapter_class

    return object.__new__(adapter_class(family))


def adversarial_profile(work: Workload, cp: int, compute: torch.dtype) -> AdversarialProfile:
    """DetE's adversarial terms on meta, as ``GanFeatureMatching`` runs them on rank 0 of ``cp``: the
    teacher's taps and output-head condition from a forward at the rank's tokens, gathered by
    ``gather_taps`` over the fake group (the whole grid on every rank); the generator's hinge (heads
    frozen) and feature matching on the fake set, then one D step on both sets, each under saved-tensor
    hooks (bytes of the sets not counted twice)."""
    from dcm.backbones.base import TeacherFeatures
    from dcm.distill import losses
    from dcm.distill.discriminator import Discriminator, frozen
    from dcm.parallel.context import gather_taps

    if not (work.gan or work.fm):
        return AdversarialProfile()
    model = build(work, compute).requires_grad_(False)
    backbone = _family_adapter(work.family)
    thw = tuple(work.latent[1:])
    with fake_world(cp):
        if cp > 1:
            enable_context_parallel(model, work.family)
        with torch.no_grad(), backbone.capture_features(model) as feats:  # the real pass (no grad)
            model(**model_inputs(work, compute), return_dict=False)
        real = gather_taps(model, feats.taps)
    # the fake pass's taps: with grad, the same size
    fake = [torch.empty_like(t).requires_grad_(True) for t in real]
    held = {id(t) for t in real + fake}
    with torch.device("meta"):
        disc = Discriminator(backbone.feature_dim(model), len(real), backbone.token_patch(model))
    keep = []

    def saves(run) -> int:
        saved: dict[int, int] = {}

        def pack(x):
            base = x._base if x._base is not None else x
            if not isinstance(base, torch.nn.Parameter) and id(base) not in held:
                saved[id(base)] = base.numel() * base.element_size()
                keep.append(base)  # ids stay unique while counted
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            run()
        return sum(saved.values())

    def generator_terms():
        if work.gan:
            with frozen(disc):
                losses.generator_hinge(disc(fake, thw))
        if work.fm:
            proj_fake = backbone.project_features(model, TeacherFeatures(fake, feats.head_condition, thw))
            with torch.no_grad():
                proj_real = backbone.project_features(model, TeacherFeatures(real, feats.head_condition, thw))
            losses.feature_matching(proj_fake, proj_real)

    def discriminator_step():
        losses.discriminator_hinge(disc(real, thw), disc([t.detach() for t in fake], thw))

    return AdversarialProfile(taps=sum(t.numel() * t.element_size() for t in real),
                              generator=saves(generator_terms),
                              discriminator=saves(discriminator_step) if work.gan else 0,
                              params=sum(p.numel() for p in disc.parameters()) if work.gan else 0)


# ----------------------------------------------------------------------------- the plan

@dataclass
class Setting:
    gpus: int
    cp: int = 1
    shard_group: int | None = None  # None: all GPUs
    shard_teacher: bool = False
    ema: bool = False
    compute: str = "bf16"  # bf16 (training.parallel.mixed_precision: bf16) or fp32

    @property
    def shard(self) -> int:
        return self.shard_group or self.gpus


def check_setting(work: Workload, s: Setting) -> None:
    """Bad combinations fail here, before any work, naming the key, the value and what is allowed."""
    if s.gpus < 1:
        raise ConfigError("--gpus", s.gpus, "a positive number of GPUs")
    check_context_parallel(s.cp, tokens=work.tokens, heads=work.heads, world_size=s.gpus)
    if s.gpus % s.shard:
        raise ConfigError(SHARD_KEY, s.shard, f"a divisor of the GPU count {s.gpus} (ranks are sharded in "
                                              f"groups of this size and replicated across groups): allowed "
                                              f"{[d for d in range(1, s.gpus + 1) if s.gpus % d == 0]}")


@dataclass
class Structure:
    """Parameter tables of SemE / DetE / teacher and the activation profiles per context-parallel degree."""

    seme: dict
    dete: dict
    total: int
    block: tuple[int, int]  # (largest block, root) parameters
    dete_block: tuple[int, int]
    disc_params: int = 0
    dmd2_head: int = 0  # DMD2's classifier: one DetE head on one tap of the fake score
    profiles: dict = field(default_factory=dict)  # (cp, role) → ActivationProfile (role: ROLES)
    adversarial: dict = field(default_factory=dict)  # cp → AdversarialProfile


def structure(work: Workload, compute: torch.dtype, cps=(1,)) -> Structure:
    seme = build(work)
    dual = make_dete_meta(build(work), work)
    from dcm.distill.discriminator import head_parameter_count

    st = Structure(seme=numel_table(seme), dete=numel_table(dual),
                   total=sum(p.numel() for p in seme.parameters()),
                   block=block_numels(seme), dete_block=block_numels(dual),
                   dmd2_head=head_parameter_count(int(seme.proj_out.in_features)))
    for cp in cps:
        st.profiles.update(activation_profiles(work, cp, compute))
        st.adversarial[cp] = adversarial_profile(work, cp, compute)
        st.disc_params = st.adversarial[cp].params
    return st


def checkpointed_passes(*passes: ActivationProfile) -> int:
    """Activation bytes at the peak of one backward through checkpointed passes chained in forward order,
    each on the one before's output (the later ones frozen networks'): backward runs the last first,
    recomputing its blocks one at a time while every earlier pass's saves outside its blocks and its block
    inputs are held; a pass's saves are freed before the one before it recomputes.  A pass without blocks
    adds its saves."""
    peak = held = 0
    for p in passes:
        peak = max(peak, held + p.outside + p.block_inputs + max(p.per_block, default=0))
        held += p.outside + p.block_inputs
    return peak


def dete_phases(student: ActivationProfile, teacher: ActivationProfile, adv: AdversarialProfile,
                work: Workload, checkpointing: bool) -> tuple[int, int]:
    """Activation bytes of a DetE step with the GAN / FM terms at its two peaks (module docstring): the
    generator's backward (student pass, the teacher's pass with grad, the terms' saves, and the sets of taps
    held then: this micro-batch's two, with the GAN also the earlier micro-batches' pairs waiting for the D
    steps) and the discriminator's step (every micro-batch's pair, one more with ``disc_steps`` > 1, one D
    step's saves; 0 without the GAN)."""
    terms = ActivationProfile(outside=adv.generator)
    passes = (checkpointed_passes(student, teacher, terms) if checkpointing
              else student.no_checkpointing + teacher.no_checkpointing + terms.outside)
    if not work.gan:
        return passes + 2 * adv.taps, 0
    return (passes + 2 * adv.taps * work.grad_accum,
            2 * adv.taps * (work.grad_accum + (work.disc_steps > 1)) + adv.discriminator)


def plan(work: Workload, s: Setting, st: Structure) -> dict[str, dict[str, int]]:
    """Per-GPU bytes of SemE, DetE and DMD2 (rank 0: the largest shards) under setting ``s``."""
    c = DTYPE_BYTES[s.compute]
    sharded = s.shard > 1
    e = work.experts
    teacher = 4 * e * (st.total if not s.shard_teacher else sum(local_numels(st.seme, s.shard)))
    vae = work.vae_params * work.vae_bytes
    rows = {}
    # SemE: the whole transformer trains
    train, _ = local_numels(st.seme, s.shard)
    prof = st.profiles[(s.cp, "seme")]
    seme = {"parameters (fp32)": 4 * train, "gradients (fp32)": 4 * train,
            "optimizer (AdamW, 2 × fp32)": 8 * train,
            "EMA (fp32)": 4 * train if s.ema else 0, "frozen student weights": 0,
            "frozen teacher (fp32)": teacher, "VAE": vae, "discriminator (weights+grads+AdamW)": 0,
            "fake score (weights+grads+AdamW)": 0,
            "FSDP working set": fsdp_working_set(st.block, c) if sharded else 0,
            "activations, checkpointing": prof.checkpointing,
            "activations, no checkpointing": prof.no_checkpointing}
    rows["SemE"] = seme
    # DetE: LoRA + copied timestep layers train over a frozen SemE; the teacher's feature pass with grad
    lora, frozen = local_numels(st.dete, s.shard)
    lprof = st.profiles[(s.cp, "dete")]
    # a two-expert teacher's DetE: its LoRA sits on a frozen copy of the low-noise expert, beside the frozen
    # SemE
    dete = {"parameters (fp32)": 4 * lora, "gradients (fp32)": 4 * lora,
            "optimizer (AdamW, 2 × fp32)": 8 * lora,
            "EMA (fp32)": 4 * lora if s.ema else 0, "frozen student weights": 4 * frozen * min(e, 2),
            "frozen teacher (fp32)": teacher, "VAE": vae,
            "discriminator (weights+grads+AdamW)": 16 * st.disc_params if work.gan else 0,
            "fake score (weights+grads+AdamW)": 0,
            "FSDP working set": fsdp_working_set(st.dete_block, c) if sharded else 0,
            "activations, checkpointing": lprof.checkpointing,
            "activations, no checkpointing": lprof.no_checkpointing}
    tprof = st.profiles[(s.cp, "teacher")]  # a frozen network's pass with grad (to its input only)
    # the teacher's passes on the student's output and the real endpoint, the GAN/FM terms
    if work.gan or work.fm:
        adv = st.adversarial[s.cp]
        dete["activations, checkpointing"] = max(dete_phases(lprof, tprof, adv, work, checkpointing=True))
        dete["activations, no checkpointing"] = max(dete_phases(lprof, tprof, adv, work, checkpointing=False))
    rows["DetE"] = dete
    # LCM / PCM: the whole teacher copied and trained (a two-expert teacher: both experts), an EMA with LCM's
    baseline = {**seme, **{k: e * v for k, v in seme.items()
                           if k in ("parameters (fp32)", "gradients (fp32)", "optimizer (AdamW, 2 × fp32)",
                                    "EMA (fp32)")}}
    rows["Baseline"] = baseline
    # DMD2: the generator as a baseline (online target: no EMA) + the fake score sharded like it (fp32
    # weights, grads, AdamW; a two-expert teacher: one per expert); with the classifier, its head and the
    # generator's second pass with grad (through the fake score)
    dmd2 = {**baseline, "EMA (fp32)": 0, "fake score (weights+grads+AdamW)": 16 * train * e,
            "discriminator (weights+grads+AdamW)": 16 * st.dmd2_head if work.dmd2_gan else 0}
    if work.dmd2_gan:  # the fake score stays frozen through the generator's backward (dcm.distill.dmd2)
        dmd2["activations, checkpointing"] = checkpointed_passes(prof, tprof)
        dmd2["activations, no checkpointing"] += tprof.no_checkpointing
    rows["DMD2"] = dmd2
    for row in rows.values():
        fixed = sum(v for k, v in row.items() if not k.startswith("activations"))
        row["total, checkpointing"] = fixed + row["activations, checkpointing"]
        row["total, no checkpointing"] = fixed + row["activations, no checkpointing"]
    return rows


def smallest(work: Workload, st_for, gpu_bytes: int, compute: str, ema: bool,
             max_gpus: int = GPU_COUNTS[-1]) -> dict[str, dict]:
    """Per stage the smallest GPU count (FSDP over all of them, teacher sharded, activation checkpointing)
    and at it the smallest context-parallel degree (up to 8) that fits; None where nothing up to
    ``max_gpus`` GPUs does."""
    found = {}
    cps = allowed_degrees(work.tokens, work.heads)
    for stage in ("SemE", "DetE", "DMD2"):
        found[stage] = None
        for n in (g for g in GPU_COUNTS if g <= max_gpus):
            for cp in (d for d in cps if n % d == 0 and d <= 8):
                rows = plan(work, Setting(n, cp, None, True, ema, compute), st_for(cp))
                if rows[stage]["total, checkpointing"] <= gpu_bytes:
                    found[stage] = {"gpus": n, "context_parallel": cp,
                                    "bytes": rows[stage]["total, checkpointing"]}
                    break
            if found[stage]:
                break
    return found


def disk(work: Workload, st: Structure) -> dict[str, int]:
    """Bytes on disk: the trajectory cache and each training stage's outputs (export + resume state)."""
    c, t, h, w = work.latent
    lora = sum(math.prod(s) for s, g in st.dete.values() if g)
    out = {"trajectory cache": (work.grid_points * c * t * h * w * work.trajectory_bytes
                                * work.num_trajectories),
           "one trajectory": work.grid_points * c * t * h * w * work.trajectory_bytes,
           # SemE: diffusers export (fp32) + resume (weights + 2 Adam moments)
           "train_seme (export + resume)": st.total * 4 + st.total * 12,
           # DetE: PEFT adapter + copied layers (fp32) + resume (them + Adam) + discriminator (weights + Adam)
           "train_dete (export + resume)": lora * 4 + lora * 12 + (st.disc_params * 12 if work.gan else 0),
           # LCM / PCM baselines: a full student + an EMA target (LCM) in the resume state
           "train_baseline (export + resume, with EMA)": work.experts * (st.total * 4 + st.total * 16),
           # DMD2: the generator's export + resume (weights + Adam), and the fake score (+ head) with its Adam
           "train_baseline dmd2 (export + resume)": (work.experts * (st.total * 4 + st.total * 12
                                                                     + st.total * 12) + st.dmd2_head * 12)}
    return out


# ----------------------------------------------------------------------------- the command

def fmt(nbytes: int) -> str:
    return f"{nbytes / GiB:9.2f}"


def report(work: Workload, s: Setting, rows, best, disk_bytes, gpu_mem_gb: float, st: Structure,
           max_gpus: int = GPU_COUNTS[-1], reserve_gb: float = 0.0) -> str:
    gpu_bytes = (gpu_mem_gb - reserve_gb) * GiB
    prof = st.profiles[(s.cp, "seme")]
    lines = [f"memory plan: {work.name}, {work.tokens} video tokens, batch {work.batch}, "
             f"{s.gpus} GPUs × {gpu_mem_gb:g} GiB, context parallel {s.cp}, FSDP shard group {s.shard}, "
             f"teacher {'sharded' if s.shard_teacher else 'replicated'}, compute {s.compute}; fits = total ≤ "
             f"{gpu_mem_gb:g} − {reserve_gb:g} GiB (CUDA context, NCCL buffers, allocator slack)",
             f"parameters: transformer {st.total / 1e9:.3f} B, DetE trainable "
             f"{sum(math.prod(x) for x, g in st.dete.values() if g) / 1e6:.1f} M, discriminator "
             f"{st.disc_params / 1e6:.1f} M, VAE {work.vae_params / 1e6:.0f} M",
             f"activation constant β = {prof.beta:.1f} bytes per token per hidden unit per block "
             f"({len(prof.per_block)} blocks × {prof.local_tokens} tokens/rank × {prof.hidden})",
             "", f"{'per GPU (GiB)':40s} {'SemE':>9s} {'DetE':>9s} {'DMD2':>9s}"]
    for key in rows["SemE"]:
        lines.append(f"{key:40s} {fmt(rows['SemE'][key])} {fmt(rows['DetE'][key])} {fmt(rows['DMD2'][key])}")
    for mode in ("checkpointing", "no checkpointing"):
        fits = ["yes" if rows[st_][f"total, {mode}"] <= gpu_bytes else "NO"
                for st_ in ("SemE", "DetE", "DMD2")]
        lines.append(f"{'fits ' + f'{gpu_mem_gb:g} GiB, ' + mode:40s} "
                     f"{fits[0]:>9s} {fits[1]:>9s} {fits[2]:>9s}")
    lines.append("")
    for stage, b in best.items():
        lines.append(f"smallest fit for {stage} (checkpointing, FSDP over all GPUs, teacher sharded): "
                     + (f"{b['gpus']} GPUs, context parallel {b['context_parallel']} "
                        f"({b['bytes'] / GiB:.1f} GiB)" if b else f"none up to {max_gpus} GPUs"))
    lines.append("")
    lines.append(f"{'disk':40s} {'GiB':>9s}")
    for key, value in disk_bytes.items():
        lines.append(f"{key:40s} {fmt(value)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``dcm plan``: print (or write as JSON) the plan of one preset at one setting; 2 on a bad
    combination."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the meta builds' "keep in fp32" notes
    ap = argparse.ArgumentParser(prog="dcm plan", description=__doc__.split("\n")[0])
    ap.add_argument("--family", required=True, choices=sorted(VARIANTS))
    ap.add_argument("--params", default="params.yaml",
                    help="experiment file the preset overlays (default: params.yaml)")
    ap.add_argument("--variant", help="1.3B|14B|A14B|ti2v-5B (wan; ti2v-5B at the wan22_ti2v preset), 13B "
                                      "(hunyuan), 8.3B (hunyuan15), 2B|5B (cogvideox)")
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--gpu-mem-gb", type=float, required=True, help="GiB per GPU (an A100-80GB: 80)")
    ap.add_argument("--context-parallel", type=int, default=1)
    ap.add_argument("--shard-group", type=int, default=None, help="FSDP shard group size (default: all GPUs)")
    ap.add_argument("--shard-teacher", action="store_true",
                    help="shard the frozen teacher (default: a copy per GPU)")
    ap.add_argument("--ema", action="store_true",
                    help="count an EMA target (LCM); DCM's experts use the online one")
    ap.add_argument("--compute", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--reserve-gb", type=float, default=2.0,
                    help="GiB per GPU kept for the CUDA context, NCCL buffers and allocator slack "
                         "(default 2)")
    ap.add_argument("--max-gpus", type=int, default=GPU_COUNTS[-1], help="largest GPU count the search tries")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON instead of the table")
    ap.add_argument("--json-out", help="also write the plan as JSON to this file")
    args = ap.parse_args(argv)
    try:
        work = preset_workload(args.family, args.variant, args.params)
        setting = Setting(args.gpus, args.context_parallel, args.shard_group, args.shard_teacher, args.ema,
                          args.compute)
        check_setting(work, setting)
        if work.global_batch is not None:  # the micro-batches (and GAN taps held) at this GPU count
            accum = accumulation(work.global_batch, work.batch, work.grad_accum, setting.gpus // setting.cp,
                                 setting.gpus, setting.cp)
            work = replace(work, grad_accum=accum)
    except ConfigError as err:
        print(f"dcm plan: {err}", file=sys.stderr)
        return 2
    compute = torch.bfloat16 if args.compute == "bf16" else torch.float32
    cache: dict[int, Structure] = {}
    base = structure(work, compute, cps=(setting.cp,))
    cache[setting.cp] = base

    def st_for(cp: int) -> Structure:
        if cp not in cache:
            extra = structure_profiles(work, compute, cp, base)
            cache[cp] = extra
        return cache[cp]

    # the requested setting through fully_shard on the fake group (the search uses FSDP2's rule, checked here)
    sharded_numels(build(work), setting.shard)
    rows = plan(work, setting, base)
    best = smallest(work, st_for, int((args.gpu_mem_gb - args.reserve_gb) * GiB), args.compute, args.ema,
                    args.max_gpus)
    disk_bytes = disk(work, base)
    document = json.dumps({"workload": work.name, "tokens": work.tokens, "setting": setting.__dict__,
                           "per_gpu": rows, "smallest": best, "disk": disk_bytes,
                           "beta": base.profiles[(setting.cp, "seme")].beta, "reserve_gb": args.reserve_gb},
                          indent=1)
    if args.json_out:
        Path(args.json_out).write_text(document)
    if args.json:
        print(document)
    else:
        print(report(work, setting, rows, best, disk_bytes, args.gpu_mem_gb, base, args.max_gpus,
                     args.reserve_gb))
    return 0


def structure_profiles(work: Workload, compute: torch.dtype, cp: int, base: Structure) -> Structure:
    """``base`` with the activation profiles of another context-parallel degree added."""
    extra = copy.copy(base)
    extra.profiles = dict(base.profiles)
    extra.adversarial = dict(base.adversarial)
    extra.profiles.update(activation_profiles(work, cp, compute))
    extra.adversarial[cp] = adversarial_profile(work, cp, compute)
    return extra


if __name__ == "__main__":
    sys.exit(main())
