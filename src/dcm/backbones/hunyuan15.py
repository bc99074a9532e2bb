"""HunyuanVideo 1.5 (``HunyuanVideo15Pipeline``) as a teacher: Qwen2.5-VL + ByT5 text encoders, its
16× VAE (``AutoencoderKLHunyuanVideo15``), HunyuanVideo15Transformer3DModel (54 dual-stream blocks, 8.3B).

Conventions, checked against diffusers 0.42.1 ``pipelines/hunyuan_video1_5/pipeline_hunyuan_video1_5.py``
(``HunyuanVideo15Pipeline.__call__``) and ``models/transformers/transformer_hunyuan_video15.py``:

- Input channels: the T2V call feeds ``cat([latents, cond_latents_concat, mask_concat], dim=1)``, where
  ``prepare_cond_latents_and_mask`` makes both zero (C channels of conditioning latents, 1 mask channel):
  ``in_channels`` = 2·C + 1 (65 for C = 32).  ``forward`` appends the same zeros; the output has C channels.
- Image input: ``image_embeds`` is zeros of (B, ``vision_num_semantic_tokens`` = 729, ``image_embed_dim``);
  the transformer sees all-zero embeds as T2V (``is_t2v``), zeroes that stream and masks its tokens out.
- t = 1000·σ (``scheduler.timesteps``, passed as ``t.expand(B)``); the output is the flow velocity
  v ≈ ε − x0 (``FlowMatchEulerDiscreteScheduler.step``: x ← x + (σ_next − σ)·v).
- Text: ``encode_prompt`` = ``_get_mllm_prompt_embeds`` (Qwen2.5-VL chat template with the pipeline's
  system message, the hidden states 3 from the end, the first ``prompt_template_encode_start_idx`` = 108
  template tokens cropped, padded to ``tokenizer_max_length`` = 1000, with their mask) and
  ``_get_byt5_prompt_embeds`` (ByT5 on the quoted glyph text of the prompt, padded to 256; zeros with an
  all-zero mask when the prompt quotes nothing).  Carried as ``PromptEmbeds(qwen, {"attention_mask",
  "hidden_2", "attention_mask_2"})``: the ``preprocess`` stage's prompt store keeps all four.  The
  length of the Qwen part is ``backbone.real.max_sequence_length`` (default the pipeline's 1000).
- Guidance: CFG by the pipeline's guider, ``ClassifierFreeGuidance.forward``: pred_uncond +
  w·(pred_cond − pred_uncond) (pred_cond + w·(…) with ``use_original_formulation``), then
  ``rescale_noise_cfg`` when ``guidance_rescale`` > 0, no guidance at w = 1; ``guided_velocity`` follows
  the folder's guider config.  The unconditional input is the negative prompt: the pipeline's default
  ``negative_prompt=None`` encodes "" (``backbone.real.negative_prompt``'s default), which the chat
  template turns into " " (``format_text_input``).
- Latents: the VAE's posterior × ``scaling_factor`` (the pipeline decodes ``latents / scaling_factor``),
  no shift; compression 4× in time, 16× in space (``temporal/spatial_compression_ratio``), patch 1.  The
  VAE always runs sliced (``_slice_vae``: batches above 1 fail in its mid-block attention).

Discriminator taps: every 2nd dual-stream block (0, 2, …, 52); a block returns (video, text) tokens and
the hook keeps the video tokens.  Feature matching maps them through the output head as the forward does,
``proj_out(norm_out(h, temb))`` (``norm_out`` an AdaLayerNormContinuous on ``time_embed``'s temb), tokens
holding (C, p_t, p, p).  DetE copies the layers that see t at the top level: ``time_embed``, ``norm_out``
and ``proj_out`` (as for HunyuanVideo); the token refiner (``context_embedder``, whose own
``time_text_embed`` also sees t) is shared, as HunyuanVideo's is.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dcm.backbones.base import PromptEmbeds, unwrap
from dcm.backbones.hunyuan import HunyuanVideoParts
from dcm.backbones.real import PipelineBackbone
from dcm.config import ConfigError

# Random-initialised transformer configurations (benchmarks, the memory plan; "tiny" for CPU tests).  "8.3B":
# the 480p/720p T2V transformer as diffusers' scripts/convert_hunyuan_video1_5_to_diffusers.py configures
# it (TRANSFORMER_CONFIGS["480p_t2v"]; 720p_t2v differs only in target_size 960).
TRANSFORMER_CONFIGS = {
    "8.3B": dict(in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128,
                 num_layers=54, num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1,
                 qk_norm="rms_norm", text_embed_dim=3584, text_embed_2_dim=1472, image_embed_dim=1152,
                 rope_theta=256.0, rope_axes_dim=(16, 56, 56), use_meanflow=False, target_size=640,
                 task_type="t2v"),
    "tiny": dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=4,
                 num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=32, text_embed_2_dim=32,
                 image_embed_dim=16, rope_axes_dim=(4, 6, 6), task_type="t2v"),
}
VISION_TOKENS = 729  # HunyuanVideo15Pipeline.vision_num_semantic_tokens: the zero image tokens of T2V


class Hunyuan15Backbone(HunyuanVideoParts, PipelineBackbone):
    family = "hunyuan15"
    default_spatial_compression = 16
    guidance_mode = "cfg"
    timestep_layer_names = ("time_embed", "norm_out", "proj_out")
    pipeline_class_name = "HunyuanVideo15Pipeline"
    components = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                  "scheduler", "guider")
    text_components = ("text_encoder", "text_encoder_2")
    default_max_sequence_length = 1000  # HunyuanVideo15Pipeline.tokenizer_max_length

    def __init__(self, pipe, settings, guidance_scale, path=None):
        super().__init__(pipe, settings, guidance_scale, path)
        if self.transformer is not None:
            cfg, channels = self.transformer.config, self.transformer.config.out_channels
            if cfg.in_channels != 2 * channels + 1:
                raise ConfigError("backbone.path", str(path), "a HunyuanVideo-1.5 T2V transformer whose "
                                  f"in_channels is 2·out_channels + 1 (latents, zero condition latents, zero "
                                  f"mask), not {cfg.in_channels} for {channels} output channels")
        self._check_guider(getattr(pipe, "guider", None), path)
        self._slice_vae()

    @staticmethod
    def _check_guider(guider, path) -> None:
        """``guided_velocity`` reproduces ``ClassifierFreeGuidance`` on every step; a guider of another class,
        or one limited to a range of steps (``start``/``stop``: step indices, not σ) or disabled, is
        refused."""
        if guider is None:
            return
        from diffusers import ClassifierFreeGuidance

        defaults = (("_start", 0.0), ("_stop", 1.0), ("_enabled", True))
        settings = tuple(getattr(guider, k, v) for k, v in defaults)
        if type(guider) is not ClassifierFreeGuidance or settings != (0.0, 1.0, True):
            raise ConfigError("backbone.path", str(path), "a folder whose guider is a ClassifierFreeGuidance "
                              f"on every step (start 0, stop 1, enabled), not {type(guider).__name__} with "
                              f"(start, stop, enabled) = {settings}")

    def _slice_vae(self) -> None:
        """One video per VAE call: in diffusers 0.42.1 the VAE's mid-block attention
        (``HunyuanVideo15AttnBlock.forward``) passes a (B, S, S) causal mask to SDPA on (B, 1, S, S) queries,
        which fails to broadcast for B > 1; ``enable_slicing`` encodes and decodes video by video."""
        if self.vae is not None:
            self.vae.enable_slicing()

    def load_vae(self) -> None:
        super().load_vae()
        self._slice_vae()

    @classmethod
    def load_pipeline(cls, folder, dtypes: dict, skip: dict):
        """``HunyuanVideo15Pipeline.__init__`` reads ``vae.config.latent_channels`` whenever the attribute
        exists, so a folder loaded without its networks gets a weightless (meta-device) VAE of the folder's
        config for the constructor, dropped right after (``load_vae`` loads the real one)."""
        if "vae" not in skip:
            return super().load_pipeline(folder, dtypes, skip)
        from diffusers import AutoencoderKLHunyuanVideo15

        with torch.device("meta"):
            placeholder = AutoencoderKLHunyuanVideo15.from_config(
                AutoencoderKLHunyuanVideo15.load_config(folder / "vae", local_files_only=True))
        pipe = super().load_pipeline(folder, dtypes, {**skip, "vae": placeholder})
        pipe.register_modules(vae=None)
        return pipe

    # --- text
    def encode_text(self, prompts: list[str]) -> PromptEmbeds:
        """The pipeline's two encoders, called as its ``encode_prompt`` calls them, with the Qwen part's
        length ``max_sequence_length``."""
        pipe = self.pipe
        hidden, mask = pipe._get_mllm_prompt_embeds(
            text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, prompt=prompts, device=self.device,
            tokenizer_max_length=self.max_sequence_length, system_message=pipe.system_message,
            crop_start=pipe.prompt_template_encode_start_idx)
        hidden_2, mask_2 = pipe._get_byt5_prompt_embeds(
            tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2, prompt=prompts, device=self.device,
            tokenizer_max_length=pipe.tokenizer_2_max_length)
        return PromptEmbeds(hidden, {"attention_mask": mask.long(), "hidden_2": hidden_2,
                                     "attention_mask_2": mask_2.long()})

    # --- guidance
    def guided_velocity(self, model, x, sigma, cond, uncond, scale=None):
        """CFG as the folder's ``ClassifierFreeGuidance`` combines the two predictions (one batched forward
        here, two in the pipeline)."""
        guider = getattr(self.pipe, "guider", None)
        original = bool(getattr(guider, "use_original_formulation", False))
        rescale = float(getattr(guider, "guidance_rescale", 0.0))
        w = self.guidance_scale if scale is None else float(scale)
        if uncond is None or math.isclose(w, 0.0 if original else 1.0):
            return self.forward(model, x, sigma, cond)
        both = PromptEmbeds.cat([uncond, cond])
        v = self.forward(model, torch.cat([x, x]), torch.cat([sigma, sigma]), both)
        v_u, v_c = v.chunk(2)
        guided = (v_c if original else v_u) + w * (v_c - v_u)
        if rescale > 0.0:
            from diffusers.guiders.guider_utils import rescale_noise_cfg

            guided = rescale_noise_cfg(guided, v_c, rescale)
        return guided

    # --- network
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return unwrap(model).transformer_blocks

    def forward(self, model, x, sigma, cond, guidance=None):
        batch, extra = x.shape[0], cond.extra or {}
        condition = x.new_zeros(batch, x.shape[1] + 1, *x.shape[2:])  # zero condition latents + zero mask
        image_dim = unwrap(model).config.image_embed_dim
        tokens = getattr(self.pipe, "vision_num_semantic_tokens", VISION_TOKENS)
        return model(hidden_states=torch.cat([x, condition], dim=1), timestep=self.timestep(sigma, x),
                     encoder_hidden_states=cond.hidden.to(x.dtype),
                     encoder_attention_mask=extra["attention_mask"].to(x.device),
                     encoder_hidden_states_2=extra["hidden_2"].to(x.device, x.dtype),
                     encoder_attention_mask_2=extra["attention_mask_2"].to(x.device),
                     image_embeds=x.new_zeros(batch, tokens, image_dim), return_dict=False)[0]
