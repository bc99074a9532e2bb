"""CogVideoX (``CogVideoXPipeline``) as a teacher: T5 text encoder, CogVideoX VAE,
CogVideoXTransformer3DModel.

CogVideoX is not flow matching: it is a variance-preserving (VP) diffusion model with
v-prediction, sampled by DDIM over 1000 discrete timesteps whose ᾱ_t come from the folder's
scheduler (scaled-linear betas, SNR shift, zero terminal SNR).  The engine works in the flow
parametrisation of METHODS.md, so this adapter maps between the two at every forward:

    VP:    z_t = α_t·x0 + s_t·ε,   α_t = √ᾱ_t, s_t = √(1 − ᾱ_t),   the network predicts v = α_t·ε − s_t·x0
    flow:  x_σ = (1 − σ)·x0 + σ·ε,                                  the engine wants u = ε − x0

    the same noisy sample:  x_σ = z_t / (α_t + s_t)  with  σ = s_t / (α_t + s_t)
    conversely, for any σ:  r = √((1 − σ)² + σ²),  α = (1 − σ)/r,  s = σ/r,  z = x_σ / r
    from v back to u:        x0 = α·z − s·v,  ε = s·z + α·v,  u = ε − x0   (α² + s² = 1)

The timestep fed to the network is the (fractional) t whose table value σ_t = s_t/(α_t + s_t)
equals σ, linearly interpolated between the integer timesteps and clamped to [0, 999] (below
σ_0 ≈ 0.03 the network sees t = 0; α, s and z still use σ itself, so the mapping stays exact).
σ = 1 is t = 999 (zero terminal SNR: α = 0, z = ε).  Guidance is CFG with the negative prompt.
Latents are the VAE mean × ``scaling_factor`` in the engine's (B, C, T, H, W) layout; the
transformer takes (B, T, C, H, W), so ``forward`` transposes in and out.

Discriminator taps: every 2nd of ``transformer_blocks`` (their first output is the video tokens,
frame-major).  Feature matching maps them through the output head as the forward does:
``proj_out(norm_out(norm_final(h), temb=emb))`` (``norm_out`` an AdaLayerNorm on the time embedding),
tokens holding (C, p_t, p, p); the result is the network's own (VP v-prediction) output space.
DetE copies ``time_embedding`` (the timestep MLP; ``time_proj`` is parameter-free), ``norm_out``
(the timestep-modulated output norm) and ``proj_out``: the same three roles as
HunyuanVideo's and Wan's choices (our choice; the DCM paper reports CogVideoX without naming them).
Text length is the transformer's ``max_text_seq_length`` (its positional table assumes it).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from dcm.backbones.base import unwrap
from dcm.backbones.real import PipelineBackbone

# Random-initialised transformer configurations (benchmarks; "tiny" for CPU tests).
TRANSFORMER_CONFIGS = {
    "2B": dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16,
               time_embed_dim=512, text_embed_dim=4096, num_layers=30, sample_width=90, sample_height=60,
               sample_frames=49, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226),
    "tiny": dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                 time_embed_dim=4, text_embed_dim=32, num_layers=4, sample_width=4, sample_height=4,
                 sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8),
}


# ------------------------------------------------------------------------------ VP ↔ flow


def vp_coefficients(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(α, s, r) of flow level σ: x_σ = r·(α·x0 + s·ε) with α² + s² = 1."""
    sigma = sigma.double()
    r = torch.sqrt((1 - sigma) ** 2 + sigma**2)
    return (1 - sigma) / r, sigma / r, r


def flow_sigma(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_t = s_t / (α_t + s_t) of each VP timestep."""
    a, s = alphas_cumprod.double().sqrt(), (1 - alphas_cumprod.double()).sqrt()
    return s / (a + s)


def flow_to_vp(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """z = x_σ / r: the VP sample holding the same x0 and ε."""
    _, _, r = vp_coefficients(sigma)
    return x / _bcast(r, x)


def vp_velocity_to_flow(z: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """u = ε − x0 from the VP v-prediction at z (x0 = α·z − s·v, ε = s·z + α·v)."""
    a, s, _ = (_bcast(c, z) for c in vp_coefficients(sigma))
    return (s * z + a * v) - (a * z - s * v)


def flow_velocity_to_vp(x: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The VP v-prediction α·ε − s·x0 that a flow velocity u at x_σ stands for (x0 = x − σu,
    ε = x + (1−σ)u)."""
    sig = _bcast(sigma.double(), x)
    a, s, _ = (_bcast(c, x) for c in vp_coefficients(sigma))
    x0, eps = x - sig * u, x + (1 - sig) * u
    return a * eps - s * x0


def _bcast(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class VPTimesteps:
    """σ ↔ t for the folder's ᾱ table: t(σ) interpolates the integer timesteps' σ_t, clamped."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.sigmas = flow_sigma(alphas_cumprod).numpy()
        if np.any(np.diff(self.sigmas) <= 0):
            raise ValueError("the scheduler's alphas_cumprod must decrease strictly with t")
        self.timesteps = np.arange(len(self.sigmas), dtype=np.float64)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        t = np.interp(sigma.detach().double().cpu().numpy(), self.sigmas, self.timesteps)
        return torch.as_tensor(t, dtype=torch.float32)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        s = np.interp(timestep.detach().double().cpu().numpy(), self.timesteps, self.sigmas)
        return torch.as_tensor(s, dtype=torch.float64)


# ------------------------------------------------------------------------------ the adapter


class CogVideoXBackbone(PipelineBackbone):
    family = "cogvideox"
    guidance_mode = "cfg"
    timestep_layer_names = ("time_embedding", "norm_out", "proj_out")
    pipeline_class_name = "CogVideoXPipeline"
    components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    text_components = ("text_encoder",)
    default_max_sequence_length = 226

    def __init__(self, pipe, settings, guidance_scale, path=None):
        super().__init__(pipe, settings, guidance_scale, path)
        self.vp = VPTimesteps(pipe.scheduler.alphas_cumprod)
        if pipe.scheduler.config.prediction_type != "v_prediction":
            raise ValueError(f"CogVideoX scheduler predicts {pipe.scheduler.config.prediction_type!r}; this "
                             "adapter maps v_prediction only")
        self._rotary: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def max_sequence_length(self) -> int:
        """The transformer's ``max_text_seq_length`` (backbone.real.max_sequence_length does not apply)."""
        if self.transformer is not None:
            return int(self.transformer.config.max_text_seq_length)
        return int(json.loads((self.path / "transformer" / "config.json").read_text())["max_text_seq_length"])

    # --- video
    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8

    def latent_shape_hw(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        cfg = self.vae.config if self.vae is not None else None
        temporal = cfg.temporal_compression_ratio if cfg else 4
        channels = cfg.latent_channels if cfg else self.transformer.config.in_channels
        f = self.spatial_factor
        return (channels, (frames - 1) // int(temporal) + 1, height // f, width // f)

    # --- network
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return unwrap(model).transformer_blocks

    def token_patch(self, model: nn.Module) -> tuple[int, int, int]:
        cfg = unwrap(model).config
        return (int(cfg.patch_size_t or 1), int(cfg.patch_size), int(cfg.patch_size))

    def watch_head_condition(self, model: nn.Module, store):
        return unwrap(model).norm_out.register_forward_pre_hook(
            lambda _m, _args, kwargs: store(kwargs["temb"]), with_kwargs=True)

    def output_head(self, model: nn.Module, hidden: torch.Tensor,
                    head_condition: torch.Tensor) -> torch.Tensor:
        m = unwrap(model)
        return m.proj_out(m.norm_out(m.norm_final(hidden), temb=head_condition))

    def rotary_embedding(self, model: nn.Module, latent_thw: tuple[int, int, int], device):
        """The pipeline's RoPE tables for this latent grid (CogVideoX-5B and 1.5), cached per shape."""
        cfg = unwrap(model).config
        if not cfg.use_rotary_positional_embeddings:
            return None
        t, h, w = latent_thw
        key = (t, h, w, str(device))
        if key not in self._rotary:
            f = self.spatial_factor
            self._rotary[key] = self.pipe._prepare_rotary_positional_embeddings(h * f, w * f, t, device)
        return self._rotary[key]

    def model_timestep(self, sigma: float) -> float:
        return float(self.vp.timestep(torch.tensor([float(sigma)]))[0])

    def forward(self, model, x, sigma, cond, guidance=None):
        sigma = sigma.reshape(-1).expand(x.shape[0])
        z = flow_to_vp(x, sigma)
        timestep = self.vp.timestep(sigma).to(x.device)
        v = model(hidden_states=z.transpose(1, 2), encoder_hidden_states=cond.hidden.to(x.dtype),
                  timestep=timestep,
                  image_rotary_emb=self.rotary_embedding(model, tuple(x.shape[2:]), x.device),
                  return_dict=False)[0].transpose(1, 2)
        return vp_velocity_to_flow(z, v, sigma)
