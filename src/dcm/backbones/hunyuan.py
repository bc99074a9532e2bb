"""HunyuanVideo (``HunyuanVideoPipeline``) as a teacher: Llama + CLIP text encoders, its causal 3D VAE,
HunyuanVideoTransformer3DModel (20 dual-stream + 40 single-stream blocks, 13B).

Conventions (checked against diffusers' ``HunyuanVideoPipeline``): t = 1000·σ, the output is the
flow velocity v ≈ ε − x0 (``FlowMatchEulerDiscreteScheduler.step``: x ← x + (σ_next − σ)·v).
Guidance is *embedded*: the guidance-distilled model takes w as an input, one forward per step,
no unconditional pass.  The pipeline passes ``guidance = tensor([w], bf16) · 1000``; the bf16
rounding is kept here on purpose (w = 6 reaches the model as 6016, as in the official DCM code),
and every forward without an explicit ``guidance`` (the students) gets the teacher's w, since a
student distils the guided teacher and keeps its input signature.

Text conditioning: the pipeline's ``encode_prompt`` (the Llama hidden states of the prompt template
with its 95-token system prefix cropped, their attention mask, CLIP's pooled output), carried as
``PromptEmbeds(hidden, {"attention_mask", "pooled"})``.  Latents: VAE mean × ``scaling_factor``.

Discriminator taps: every 2nd single-stream block (0, 2, …, 38); their outputs are split into
video and text tokens and the hook keeps the video tokens.  Feature matching maps them through the
output head as the forward does: ``proj_out(norm_out(h, temb))`` (``norm_out`` is an
AdaLayerNormContinuous, temb the time/guidance/pooled-text embedding), tokens holding (C, p_t, p, p).
DetE copies ``time_text_embed`` (timestep + guidance + pooled-text embedding), ``norm_out`` and
``proj_out`` (METHODS.md); the token refiner (``context_embedder``) also sees t but is shared, as in
the official code.
"""

from __future__ import annotations

import torch
from torch import nn

from dcm.backbones.base import PromptEmbeds, unwrap
from dcm.backbones.real import PipelineBackbone

GUIDANCE_SCALE_FACTOR = 1000.0  # the pipeline's guidance input is w · 1000

# Random-initialised transformer configurations (benchmarks; "tiny" for CPU tests).
TRANSFORMER_CONFIGS = {
    "13B": dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2,
                patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096,
                pooled_projection_dim=768, rope_theta=256.0, rope_axes_dim=(16, 56, 56)),
    "tiny": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                 num_single_layers=4, num_refiner_layers=1, patch_size=2, patch_size_t=1,
                 guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(4, 6, 6)),
}


def embedded_guidance(scale: torch.Tensor) -> torch.Tensor:
    """The transformer's guidance input: w · 1000 rounded through bf16 like the pipeline (6.0 → 6016)."""
    return scale.to(torch.bfloat16) * GUIDANCE_SCALE_FACTOR


class HunyuanVideoParts:
    """What HunyuanVideo and HunyuanVideo 1.5 share: the VAE's latent grid (``temporal_compression_ratio``,
    ``spatial_compression_ratio``, ``latent_channels``), tokens holding (C, p_t, p, p), and the output head
    ``proj_out(norm_out(h, temb))`` (``norm_out``: an AdaLayerNormContinuous, temb its second input)."""

    default_spatial_compression = 8  # the VAE's, when the folder is recorded without its VAE

    def latent_shape_hw(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        cfg = self.vae.config if self.vae is not None else None
        temporal = cfg.temporal_compression_ratio if cfg else 4
        spatial = cfg.spatial_compression_ratio if cfg else self.default_spatial_compression
        channels = cfg.latent_channels if cfg else self.transformer.config.out_channels
        return (channels, (frames - 1) // temporal + 1, height // spatial, width // spatial)

    def token_patch(self, model: nn.Module) -> tuple[int, int, int]:
        cfg = unwrap(model).config
        return (int(cfg.patch_size_t), int(cfg.patch_size), int(cfg.patch_size))

    def watch_head_condition(self, model: nn.Module, store):
        return unwrap(model).norm_out.register_forward_pre_hook(lambda _m, args: store(args[1]))

    def output_head(self, model: nn.Module, hidden: torch.Tensor,
                    head_condition: torch.Tensor) -> torch.Tensor:
        m = unwrap(model)
        return m.proj_out(m.norm_out(hidden, head_condition))


class HunyuanBackbone(HunyuanVideoParts, PipelineBackbone):
    family = "hunyuan"
    guidance_mode = "embedded"
    timestep_layer_names = ("time_text_embed", "norm_out", "proj_out")
    pipeline_class_name = "HunyuanVideoPipeline"
    components = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                  "scheduler")
    text_components = ("text_encoder", "text_encoder_2")
    default_max_sequence_length = 256  # HunyuanVideoPipeline's default (after the template prefix)

    def encode_text(self, prompts: list[str]) -> PromptEmbeds:
        hidden, pooled, mask = self.pipe.encode_prompt(prompts, device=self.device,
                                                       max_sequence_length=self.max_sequence_length)
        return PromptEmbeds(hidden, {"attention_mask": mask, "pooled": pooled})

    # --- network
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return unwrap(model).single_transformer_blocks

    def forward(self, model, x, sigma, cond, guidance=None):
        batch = x.shape[0]
        scale = guidance if guidance is not None else torch.full((batch,), self.guidance_scale)
        extra = cond.extra or {}
        return model(hidden_states=x, timestep=self.timestep(sigma, x),
                     encoder_hidden_states=cond.hidden.to(x.dtype),
                     encoder_attention_mask=extra["attention_mask"].to(x.device),
                     pooled_projections=extra["pooled"].to(x.device, x.dtype),
                     guidance=embedded_guidance(scale.reshape(-1).to(x.device)).to(x.dtype).expand(batch),
                     return_dict=False)[0]
