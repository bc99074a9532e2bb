"""The small protocol every teacher family implements, and what all of them share.

A backbone owns the frozen pieces (prompt encoder, video codec) and the teacher transformer; the
distillation code passes *which* transformer to run (teacher, student, expert) to ``predict``, so
one adapter serves every model of a run.  Velocity parametrisation: v ≈ ε − x0 (METHODS.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

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
        move = (lambda t: t.to(device, dtype)  # noqa: E731
                if t.is_floating_point() and dtype else t.to(device))
        return PromptEmbeds(move(self.hidden), {k: move(v) for k, v in (self.extra or {}).items()} or None)

    @staticmethod
    def cat(items: list[PromptEmbeds]) -> PromptEmbeds:
        keys = (items[0].extra or {}).keys()
        extra = {k: torch.cat([i.extra[k] for i in items]) for k in keys} or None
        return PromptEmbeds(torch.cat([i.hidden for i in items]), extra)

    def pooled(self) -> torch.Tensor:
        """(B, D) one vector per prompt: the family's pooled embedding (Hunyuan's CLIP) where it has one,
        else the mean of the real tokens: those of the text mask where the family keeps one (HunyuanVideo
        1.5: its Qwen2.5-VL states at padding are not zero), else those not all zero (the toy's and Wan's
        padding is zero; CogVideoX's pipeline returns the encoder's outputs at pad tokens, so they count)."""
        if self.extra and "pooled" in self.extra:
            return self.extra["pooled"]
        hidden = self.hidden.float()
        if self.extra and "attention_mask" in self.extra:
            real = self.extra["attention_mask"].to(hidden.device, torch.float32).unsqueeze(-1)
        else:
            real = (hidden.abs().sum(-1, keepdim=True) > 0).float()
        return (hidden * real).sum(1) / real.sum(1).clamp(min=1.0)


def token_grid(latent_thw: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int, int]:
    """(T', H', W') of the transformer's tokens: latent frames/height/width over the patch size."""
    t, h, w = latent_thw
    pt, ph, pw = patch_size
    if t % pt or h % ph or w % pw:
        raise ValueError(f"latent (T, H, W) = {tuple(latent_thw)} is not divisible by the patch size "
                         f"{tuple(patch_size)}")
    return t // pt, h // ph, w // pw


def unpatchify(tokens: torch.Tensor, latent_thw: Sequence[int], patch_size: Sequence[int],
               channels_last: bool) -> torch.Tensor:
    """Output-head tokens (B, T'·H'·W', p_t·p_h·p_w·C) → latents (B, C, T, H, W).

    Each token holds its patch's values as (p_t, p_h, p_w, C) (Wan: ``channels_last``) or (C, p_t, p_h, p_w)
    (HunyuanVideo, CogVideoX), tokens ordered (frame, row, column).
    """
    b = tokens.shape[0]
    (t, h, w), (pt, ph, pw) = token_grid(latent_thw, patch_size), patch_size
    if channels_last:
        x = tokens.reshape(b, t, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    else:
        x = tokens.reshape(b, t, h, w, -1, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, x.shape[1], t * pt, h * ph, w * pw)


@dataclass
class TeacherFeatures(Sequence):
    """What one feature pass of a transformer gives DetE's discriminator and feature matching: the
    tapped block outputs (B, tokens, dim), in tap order, and what the output head needs to map them
    to latent space (the timestep embedding it modulates with, the latent shape).  Iterates over the taps."""

    taps: list[torch.Tensor] = field(default_factory=list)
    head_condition: torch.Tensor | None = None
    latent_thw: tuple[int, int, int] = (0, 0, 0)

    def __len__(self) -> int:
        return len(self.taps)

    def __getitem__(self, index):
        return self.taps[index]

    def detach(self) -> TeacherFeatures:
        condition = self.head_condition.detach() if self.head_condition is not None else None
        return TeacherFeatures([t.detach() for t in self.taps], condition, self.latent_thw)


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
        """(C, T, H, W) of a ``frames`` × ``size`` × ``size`` video (real families: see
        ``video_latent_shape``)."""
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
    #: True for a teacher made of two experts of its own (Wan 2.2 A14B: ``transformer`` for high noise,
    #: ``transformer_2`` for low noise; ``self.transformer`` is then a ``routing.BoundaryExperts``)
    two_experts: bool = False

    def expert_transformer(self, expert: str) -> nn.Module:
        """The frozen teacher transformer DCM's ``expert`` ('seme' | 'dete') is initialised from, and the
        one whose features DetE's GAN and feature matching read ('dete'): the teacher's transformer for
        a single-expert teacher; a two-expert teacher's high-noise expert for SemE, low-noise for DetE."""
        if expert not in ("seme", "dete"):
            raise ValueError(f"expert must be 'seme' or 'dete', got {expert!r}")
        if not self.two_experts:
            return self.transformer
        return self.transformer.high if expert == "seme" else self.transformer.low

    def teacher_at(self, sigma: float) -> nn.Module:
        """The frozen teacher transformer that runs at noise level σ (a two-expert teacher: the expert its
        boundary picks there)."""
        if not self.two_experts:
            return self.transformer
        return self.transformer.expert_at(self.model_timestep(sigma))

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
        """The transformer's timestep input at noise level σ: 1000·σ (a VP family maps it); experts route
        on it."""
        return 1000.0 * float(sigma)

    def feature_dim(self, model: nn.Module) -> int:
        """Width of the tapped block outputs (the transformer's inner dim)."""
        return int(unwrap(model).proj_out.in_features)

    def token_patch(self, model: nn.Module) -> tuple[int, int, int]:
        """(t, h, w) patch of the transformer's tokens: latent grid / patch = the discriminator's token
        grid."""
        return tuple(int(p) for p in unwrap(model).config.patch_size)

    # --- the output head, for feature matching (METHODS.md, DetE)
    @abstractmethod
    def watch_head_condition(self, model: nn.Module, store: Callable[[torch.Tensor], None]):
        """Register a hook that hands ``store`` the conditioning the output head modulates with (the
        timestep embedding) during a forward of ``model``; returns the hook's handle."""
        ...

    @abstractmethod
    def output_head(self, model: nn.Module, hidden: torch.Tensor,
                    head_condition: torch.Tensor) -> torch.Tensor:
        """The transformer's final layer on block outputs (B, tokens, dim): modulated ``norm_out``, then
        ``proj_out``; (B, tokens, patch values), before unpatchifying."""
        ...

    #: how a token of the output head holds its patch: (p_t, p_h, p_w, C) (Wan) or (C, p_t, p_h, p_w)
    head_channels_last: bool = False

    def project_features(self, model: nn.Module, features: TeacherFeatures) -> list[torch.Tensor]:
        """Each tap through the teacher's output head at the pass's t (modulation included), unpatchified
        to the network's output space (B, C, T, H, W): what feature matching compares."""
        if features.head_condition is None:
            raise ValueError("these features carry no output-head conditioning: take them with "
                             "predict(features=True)")
        patch = self.token_patch(model)
        return [unpatchify(self.output_head(model, tap, features.head_condition), features.latent_thw, patch,
                           self.head_channels_last) for tap in features.taps]

    # --- shared behaviour
    def predict(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds,
                features: bool = False, guidance: torch.Tensor | None = None):
        """Velocity, and with ``features=True`` also a ``TeacherFeatures``: the outputs of every 2nd block
        (B, tokens, dim) and the output head's conditioning of this forward."""
        if not features:
            return self.forward(model, x, sigma, cond, guidance)
        with self.capture_features(model) as feats:
            v = self.forward(model, x, sigma, cond, guidance)
        feats.latent_thw = tuple(int(d) for d in x.shape[2:])
        return v, feats

    @contextmanager
    def capture_features(self, model: nn.Module):
        blocks = self.blocks(model)
        taps = self.feature_block_indices(model)
        feats = TeacherFeatures([None] * len(taps))  # type: ignore[list-item]

        def hook_for(slot: int):
            def hook(_module, _inputs, output):
                feats.taps[slot] = output[0] if isinstance(output, tuple) else output
            return hook

        def store(condition: torch.Tensor) -> None:
            feats.head_condition = condition

        handles = [blocks[i].register_forward_hook(hook_for(k)) for k, i in enumerate(taps)]
        handles.append(self.watch_head_condition(model, store))
        try:
            yield feats
        finally:
            for h in handles:
                h.remove()

    def guidance_scales(self, sigma: torch.Tensor, x: torch.Tensor) -> float | torch.Tensor:
        """The teacher's own guidance scale at these samples: ``guidance_scale`` (a two-expert teacher: each
        sample's expert's, a tensor broadcasting over x)."""
        return self.guidance_scale

    def guided_velocity(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds,
                        uncond: PromptEmbeds | None, scale: float | None = None) -> torch.Tensor:
        """Teacher velocity with guidance: CFG v_u + w·(v_c − v_u) in one batched forward, or embedded; w is
        ``scale``, else the teacher's own (``guidance_scales``)."""
        w = self.guidance_scales(sigma, x) if scale is None else scale
        if self.guidance_mode == "embedded":
            g = torch.full((x.shape[0],), float(w), device=x.device)
            return self.forward(model, x, sigma, cond, guidance=g)
        if uncond is None or (not torch.is_tensor(w) and w == 1.0):
            return self.forward(model, x, sigma, cond)
        v = self.forward(model, torch.cat([x, x]), torch.cat([sigma, sigma]),
                         PromptEmbeds.cat([uncond, cond]))
        v_u, v_c = v.chunk(2)
        return v_u + w * (v_c - v_u)

    def null_prompts(self, batch: int) -> PromptEmbeds:
        return self.encode_prompts([""] * batch)

    @abstractmethod
    def save(self, path) -> None:
        ...


@contextmanager
def inference_precision(device: torch.device | str) -> Iterator[None]:
    """The precision the inference stages (trajectories, sample) run the transformers in: on a GPU the
    families' own, bf16 autocast over the forwards (diffusers' pipelines run these transformers in bf16)
    with TF32 matmuls; on the CPU fp32 as loaded.  The Euler updates stay in fp32 either way (autocast
    leaves elementwise arithmetic on fp32 tensors alone), so a stored teacher step is an fp32 step."""
    if torch.device(device).type != "cuda":
        yield
        return
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def enable_activation_checkpointing(*models: nn.Module) -> int:
    """diffusers' block-level activation checkpointing on every transformer inside ``models`` (through
    expert / PEFT / DDP wrappers); it acts only on forwards with grad enabled.  Returns how many it set."""
    from diffusers import ModelMixin

    count, seen = 0, set()
    for model in models:
        for module in model.modules():
            if (isinstance(module, ModelMixin) and id(module) not in seen
                    and module._supports_gradient_checkpointing):
                seen.add(id(module))
                module.enable_gradient_checkpointing()
                count += 1
    return count


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of every diffusers transformer inside ``model`` (its ``_no_split_modules``
    classes, outermost only), in module order."""
    from diffusers import ModelMixin

    blocks: list[nn.Module] = []
    taken: set[int] = set()
    for module in model.modules():
        if not isinstance(module, ModelMixin):
            continue
        names = set(getattr(type(module), "_no_split_modules", None) or ())
        for sub in module.modules():
            if type(sub).__name__ in names and id(sub) not in taken:
                blocks.append(sub)
                taken.update(id(m) for m in sub.modules())
    return blocks


def unwrap(model: nn.Module) -> nn.Module:
    """The diffusers transformer (a ``ModelMixin``) under expert / PEFT / DDP / FSDP wrappers."""
    from diffusers import ModelMixin

    seen = 0
    while not isinstance(model, ModelMixin) and seen < 8:
        # a two-expert module unwraps to its first expert (the experts share one configuration)
        for attr in ("seme_transformer", "high", "module", "base_model", "model"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module) and inner is not model:
                model = inner
                break
        else:
            break
        seen += 1
    return model
