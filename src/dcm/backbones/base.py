"""The small protocol every teacher family implements, and what all of them share.

A backbone owns the frozen pieces (prompt encoder, video codec) and the teacher transformer; the
distillation code passes *which* transformer to run (teacher, student, expert) to ``predict``, so
one adapter serves every model of a run.  Velocity parametrisation: v ≈ ε − x0 (METHODS.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch; ``extra`` holds family-specific tensors (pooled, masks)."""

    hidden: torch.Tensor  # (B, L, D)
    extra: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def index(self, idx: torch.Tensor | slice | list[int]) -> PromptEmbeds:
        extra = {k: v[idx] for k, v in (self.extra or {}).items()} or None
        return PromptEmbeds(self.hidden[idx], extra)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptEmbeds:
        move = (lambda t: t.to(device, dtype) if t.is_floating_point() and dtype else t.to(device))  # noqa: E731
        return PromptEmbeds(move(self.hidden), {k: move(v) for k, v in (self.extra or {}).items()} or None)

    @staticmethod
    def cat(items: list[PromptEmbeds]) -> PromptEmbeds:
        keys = (items[0].extra or {}).keys()
        extra = {k: torch.cat([i.extra[k] for i in items]) for k in keys} or None
        return PromptEmbeds(torch.cat([i.hidden for i in items]), extra)


class Backbone(ABC):
    """Interface of a teacher family.  Subclasses set the class attributes and implement the methods."""

    family: str = ""
    guidance_mode: str = "cfg"  # "cfg" (two forwards) or "embedded" (guidance is a model input)
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    timestep_layer_names: tuple[str, ...] = ()  # top-level modules/parameters DetE copies
    transformer: nn.Module
    guidance_scale: float = 1.0

    # --- text
    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        ...

    # --- video <-> latents
    @abstractmethod
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        ...

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        ...

    @abstractmethod
    def latent_shape(self, frames: int, size: int) -> tuple[int, int, int, int]:
        """(C, T, H, W) of a ``frames`` × ``size`` × ``size`` video (real families: see ``video_latent_shape``)."""
        ...

    def video_latent_shape(self, params) -> tuple[int, int, int, int]:
        """The latent shape of the run's videos: world.frames × world.size² (real families: backbone.real)."""
        return self.latent_shape(params.world.frames, params.world.size)

    def to(self, device: torch.device | str) -> Backbone:
        """Move the networks this backbone holds (every ``nn.Module`` attribute) to ``device``."""
        for value in vars(self).values():
            if isinstance(value, nn.Module):
                value.to(device)
        return self

    # --- the network
    @abstractmethod
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The transformer blocks whose outputs are features for the discriminator."""
        ...

    @abstractmethod
    def forward(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        """One transformer forward: velocity for latents ``x`` at noise level ``sigma`` (B,)."""
        ...

    def feature_block_indices(self, model: nn.Module) -> list[int]:
        """Every 2nd block (METHODS.md: the discriminator taps)."""
        return list(range(0, len(self.blocks(model)), 2))

    def model_timestep(self, sigma: float) -> float:
        """The transformer's timestep input at noise level σ: 1000·σ (a VP family maps it); experts route on it."""
        return 1000.0 * float(sigma)

    def feature_dim(self, model: nn.Module) -> int:
        """Width of the tapped block outputs (the transformer's inner dim)."""
        return int(unwrap(model).proj_out.in_features)

    def token_patch(self, model: nn.Module) -> tuple[int, int, int]:
        """(t, h, w) patch of the transformer's tokens: latent grid / patch = the discriminator's token grid."""
        return tuple(int(p) for p in unwrap(model).config.patch_size)

    def feature_projection(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """Block features → the output head (``norm_out`` + ``proj_out``) for feature matching; Wan's form."""
        from dcm.distill.discriminator import output_projection

        return output_projection(model)

    # --- shared behaviour
    def predict(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds,
                features: bool = False, guidance: torch.Tensor | None = None):
        """Velocity, and with ``features=True`` also the outputs of every 2nd block (B, tokens, dim)."""
        if not features:
            return self.forward(model, x, sigma, cond, guidance)
        with self.capture_features(model) as feats:
            v = self.forward(model, x, sigma, cond, guidance)
        return v, list(feats)

    @contextmanager
    def capture_features(self, model: nn.Module):
        blocks = self.blocks(model)
        taps = self.feature_block_indices(model)
        feats: list[torch.Tensor] = [None] * len(taps)  # type: ignore[list-item]

        def hook_for(slot: int):
            def hook(_module, _inputs, output):
                feats[slot] = output[0] if isinstance(output, tuple) else output
            return hook

        handles = [blocks[i].register_forward_hook(hook_for(k)) for k, i in enumerate(taps)]
        try:
            yield feats
        finally:
            for h in handles:
                h.remove()

    def guided_velocity(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds,
                        uncond: PromptEmbeds | None, scale: float | None = None) -> torch.Tensor:
        """Teacher velocity with guidance: CFG v_u + w·(v_c − v_u) in one batched forward, or embedded."""
        w = self.guidance_scale if scale is None else scale
        if self.guidance_mode == "embedded":
            g = torch.full((x.shape[0],), float(w), device=x.device)
            return self.forward(model, x, sigma, cond, guidance=g)
        if uncond is None or w == 1.0:
            return self.forward(model, x, sigma, cond)
        v = self.forward(model, torch.cat([x, x]), torch.cat([sigma, sigma]), PromptEmbeds.cat([uncond, cond]))
        v_u, v_c = v.chunk(2)
        return v_u + w * (v_c - v_u)

    def null_prompts(self, batch: int) -> PromptEmbeds:
        return self.encode_prompts([""] * batch)

    @abstractmethod
    def save(self, path) -> None:
        ...


def enable_activation_checkpointing(*models: nn.Module) -> int:
    """diffusers' block-level activation checkpointing on every transformer inside ``models`` (through
    expert / PEFT / DDP wrappers); it acts only on forwards with grad enabled.  Returns how many it set."""
    from diffusers import ModelMixin

    count, seen = 0, set()
    for model in models:
        for module in model.modules():
            if isinstance(module, ModelMixin) and id(module) not in seen and module._supports_gradient_checkpointing:
                seen.add(id(module))
                module.enable_gradient_checkpointing()
                count += 1
    return count


def unwrap(model: nn.Module) -> nn.Module:
    """The diffusers transformer (a ``ModelMixin``) under expert / PEFT / DDP / FSDP wrappers."""
    from diffusers import ModelMixin

    seen = 0
    while not isinstance(model, ModelMixin) and seen < 8:
        for attr in ("seme_transformer", "module", "base_model", "model"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module) and inner is not model:
                model = inner
                break
        else:
            break
        seen += 1
    return model
