"""Wan 2.1 text-to-video and Wan 2.2 TI2V-5B in text-to-video mode (``WanPipeline``) as a teacher: UMT5 text
encoder, Wan VAE, WanTransformer3DModel.

Conventions (checked against diffusers' ``WanPipeline`` and ``FlowMatchEulerDiscreteScheduler``):
the transformer is called with t = 1000·σ and its output is the flow velocity v ≈ ε − x0 (the
scheduler steps x ← x + (σ_next − σ)·v), so ``forward`` returns it unchanged.  Guidance is CFG
v_u + w·(v_c − v_u) with the negative prompt (``backbone.real.negative_prompt``, "" by default)
as the unconditional input.  Latents are the VAE's mean, normalised with the VAE config's
``latents_mean`` / ``latents_std`` as the pipeline does before decoding.

Wan 2.2 TI2V-5B is the same pipeline class with ``expand_timesteps: true`` in its model_index.json and the
Wan 2.2 VAE (z_dim 48, 16× spatial compression, ``is_residual``, patch size 2): the latent shape and the
normalisation come from the VAE's config, and the transformer gets one timestep per video token,
(B, T'·H'·W'), as ``WanPipeline.__call__`` builds it in text-to-video mode (its mask is all ones: every
token at t).  The condition embedder then gives a per-token temb (B, tokens, dim), which the blocks and
the output head (``WanOutputHead``) modulate with token by token.

Discriminator taps: every 2nd of ``blocks`` (0, 2, …, 28 for the 30-block 1.3B model).  Feature
matching maps them through the output head (``WanOutputHead``, shared with the shapes toy).
DetE copies ``condition_embedder`` (time + text embedding), ``norm_out`` and ``proj_out``, as the official
DCM code does (``WanTransformer3DModel.add_layer``/``init_layer`` in Vchitect/DCM's
``fastvideo/models/wan_hf/modeling_wan.py``: ``scale_shift_table_lora`` is commented out, and DetE's
forward modulates with the shared ``scale_shift_table``, frozen with the rest of the backbone once the
LoRA adapter is added).  DetE's output modulation still differs from SemE's through its own
``condition_embedder``'s temb.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dcm.backbones.base import token_grid, unwrap
from dcm.backbones.real import PipelineBackbone
from dcm.backbones.routing import BoundaryExperts, row_timesteps
from dcm.config import ConfigError, folder_vae_config

# Random-initialised transformer configurations (benchmarks; "tiny" for CPU tests).
TRANSFORMER_CONFIGS = {
    "1.3B": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    "14B": dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    "tiny": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                 out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=4, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", rope_max_seq_len=64),
    # Wan 2.2 TI2V-5B (Wan2.2's wan/configs/wan_ti2v_5B.py: dim 3072, ffn_dim 14336, 24 heads, 30 layers,
    # freq_dim 256, in_dim 48 = the Wan 2.2 VAE's z_dim); its tiny CPU form has the 48 latent channels
    "ti2v-5B": dict(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48,
                    out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30,
                    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    "ti2v-tiny": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=48,
                      out_channels=48, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=4,
                      cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64),
}


class WanOutputHead:
    """WanTransformer3DModel's final layer (its forward, step 5), for Wan and the shapes toy:

        shift, scale = scale_shift_table + temb          (temb: the condition embedder's time embedding)
        out = proj_out(norm_out(h)·(1 + scale) + shift)  (norm_out: affine-free LayerNorm, in fp32)

    tokens hold their patch as (p_t, p_h, p_w, C).
    """

    head_channels_last = True

    def watch_head_condition(self, model: nn.Module, store):
        # Wan calls norm_out without temb: take it where it is made, the condition embedder's first output
        return unwrap(model).condition_embedder.register_forward_hook(lambda _m, _inputs, out: store(out[0]))

    def output_head(self, model: nn.Module, hidden: torch.Tensor,
                    head_condition: torch.Tensor) -> torch.Tensor:
        m = unwrap(model)
        table, temb = m.scale_shift_table.to(head_condition.device), head_condition
        if temb.ndim == 3:  # one timestep per token (Wan 2.2 TI2V): temb (B, tokens, dim)
            shift, scale = (table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (table + temb.unsqueeze(1)).chunk(2, dim=1)
        return m.proj_out((m.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden))


class WanBackbone(WanOutputHead, PipelineBackbone):
    family = "wan"
    guidance_mode = "cfg"
    # DetE's copies (the official list; the output modulation table stays SemE's, shared and frozen)
    timestep_layer_names = ("condition_embedder", "norm_out", "proj_out")
    pipeline_class_name = "WanPipeline"
    components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    text_components = ("text_encoder",)
    network_components = ("transformer", "transformer_2", "vae")
    default_max_sequence_length = 512  # WanPipeline.__call__'s default

    def __init__(self, pipe, settings, guidance_scale: float, path=None):
        super().__init__(pipe, settings, guidance_scale, path)
        ratio = pipe.config.get("boundary_ratio") if hasattr(pipe, "config") else None
        low = getattr(pipe, "transformer_2", None)
        # the low-noise expert's CFG scale: WanPipeline's guidance_scale_2, defaulting to guidance_scale
        scale_2 = getattr(settings, "guidance_scale_2", None)
        self.guidance_scale_2 = self.guidance_scale if scale_2 is None else float(scale_2)
        self.boundary_ratio = None if ratio is None else float(ratio)
        if low is not None and self.transformer is not None:
            if ratio is None:
                raise ConfigError("backbone.path", str(path), "a WanPipeline folder whose model_index.json "
                                  "sets boundary_ratio with its transformer_2 (Wan 2.2 A14B)")
            # WanPipeline.__call__: boundary_timestep = boundary_ratio · num_train_timesteps,
            # t ≥ it → transformer
            boundary_t = float(ratio) * int(pipe.scheduler.config.num_train_timesteps)
            self.transformer = BoundaryExperts(pipe.transformer, low, boundary_t)
        elif scale_2 is not None and ratio is None and path is not None:
            raise ConfigError("backbone.real.guidance_scale_2", scale_2,
                              "null for a one-transformer Wan folder (it sets the low-noise expert's "
                              "scale of a two-expert Wan 2.2 folder)")

    @classmethod
    def required_components(cls, index: dict) -> tuple[str, ...]:
        """Wan 2.2 A14B's folder also holds its low-noise expert, ``transformer_2``."""
        two = (index.get("transformer_2") or [None])[0] is not None
        return cls.components + (("transformer_2",) if two else ())

    @property
    def two_experts(self) -> bool:
        return isinstance(self.transformer, BoundaryExperts)

    def guidance_scales(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor | float:
        """The CFG scale of each sample: ``guidance_scale``, or with two experts the scale of the expert the
        sample's timestep picks (WanPipeline's ``current_guidance_scale``), shaped to broadcast over x."""
        if not self.two_experts or self.guidance_scale_2 == self.guidance_scale:
            return self.guidance_scale
        high = self.transformer.route(row_timesteps(self.timestep(sigma, x), x.shape[0]))
        scale = torch.where(high, torch.tensor(self.guidance_scale), torch.tensor(self.guidance_scale_2))
        return scale.to(x.device, torch.float32).view(-1, *([1] * (x.ndim - 1)))

    def record(self) -> dict:
        record = super().record()
        if self.boundary_ratio is not None:
            record.update(boundary_ratio=self.boundary_ratio, guidance_scale_2=self.guidance_scale_2)
        return record

    # --- video
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1, 1)
        return mean, std

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Wan's VAE has per-channel latents_mean / latents_std instead of one scaling factor."""
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_stats(latents)
        return latents * std + mean

    def latent_shape_hw(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """From the VAE's config (Wan 2.1: z_dim 16, ÷4 in time, ÷8 in space; Wan 2.2: z_dim 48, ÷16 in
        space), read from the folder's vae/config.json when the VAE is not loaded."""
        cfg = dict(self.vae.config) if self.vae is not None else folder_vae_config(self.path)
        temporal, spatial = cfg.get("scale_factor_temporal") or 4, cfg.get("scale_factor_spatial") or 8
        channels = cfg.get("z_dim") or self.transformer.config.out_channels
        return (channels, (frames - 1) // temporal + 1, height // spatial, width // spatial)

    # --- network
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return unwrap(model).blocks

    @property
    def expand_timesteps(self) -> bool:
        """The pipeline's ``expand_timesteps`` (model_index.json; Wan 2.2 TI2V-5B): one timestep per token."""
        return bool((getattr(self.pipe, "config", None) or {}).get("expand_timesteps", False))

    def timestep(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """t = 1000·σ per sample (B,); with ``expand_timesteps`` per video token (B, T'·H'·W'), as
        ``WanPipeline.__call__`` builds it in text-to-video mode: ``(mask[0][0][:, ::2, ::2] * t).flatten()``
        with a mask of ones, i.e. every token of the latent grid over the (1, 2, 2) patch at t."""
        t = super().timestep(sigma, x)
        if not self.expand_timesteps:
            return t
        tokens = math.prod(token_grid(x.shape[2:], self.token_patch(self.transformer)))
        return t[:, None].expand(-1, tokens)

    def forward(self, model, x, sigma, cond, guidance=None):
        return model(hidden_states=x, timestep=self.timestep(sigma, x),
                     encoder_hidden_states=cond.hidden.to(x.dtype), return_dict=False)[0]
