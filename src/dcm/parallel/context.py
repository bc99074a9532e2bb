"""Context parallelism on the video token axis (Ulysses): the same code on gloo (CPU tests) and NCCL.

diffusers' own ``enable_parallelism`` needs an accelerator (DESIGN.md), so this is a thin layer on
``torch.distributed``'s all-to-all.  With ``P`` ranks in the context-parallel group:

- every rank runs the embeddings (patch, time, text) on the whole input, as a single rank would;
- a forward pre-hook on the first transformer block keeps the rank's contiguous slice of the video
  tokens, ``tokens/P`` of them; every block then works on that slice (norms, modulation, MLPs are
  per token), while the text tokens stay whole and replicated on every rank; a per-token timestep
  (Wan 2.2 TI2V: the blocks' modulation is per token) is sliced the same way before every block;
- around attention an all-to-all turns (tokens/P, all heads) into (all tokens, heads/P), the
  attention kernel (``dispatch_attention_fn``: SDPA, or the backend set with
  ``set_attention_backend``) runs over the whole clip for the rank's heads, and the inverse
  all-to-all restores the layout.  Rotary embeddings are applied after the all-to-all, to the whole
  clip's tokens, so the tables the model builds for the whole clip are used unchanged.  Text tokens
  (HunyuanVideo's dual- and single-stream blocks, CogVideoX's joint attention) join as the rank's
  heads of the replicated text projections, and their attention output is all-gathered over heads
  so every rank again holds the whole text stream.  Wan's cross-attention needs nothing: its
  queries are the rank's video tokens, its keys and values the whole (replicated) text;
- a forward hook on the last block all-gathers the video tokens, so the output head, the
  unpatchify and every loss after the model (the temporal-coherence loss included) see the whole
  clip, as on one rank.  Calling the model is unchanged for the caller.

Gradients.  Every collective is an autograd function whose backward is its adjoint (all-to-all ↔
inverse all-to-all, all-gather ↔ reduce-scatter sum), so each rank's parameter gradients are the
partial derivatives of the sum of the ranks' losses.  When every rank computes the same loss from
the gathered output (as the loop does), the *mean* over the context-parallel ranks of a parameter's
gradient equals the single-rank gradient: exactly what FSDP2 / DDP do when the context-parallel
ranks are part of the group they average gradients over (torchtitan's ``dp_shard_cp`` mesh).  Without
such a wrapper, ``average_gradients`` does it.  The ranks of one context-parallel group must see the
same batch (same latents, noise and timesteps).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dcm.config import ConfigError

KEY = "training.parallel.context_parallel"
FAMILIES = ("wan", "hunyuan", "hunyuan15", "cogvideox")
_CLASS_FAMILY = {"WanTransformer3DModel": "wan", "HunyuanVideoTransformer3DModel": "hunyuan",
                 "HunyuanVideo15Transformer3DModel": "hunyuan15",
                 "CogVideoXTransformer3DModel": "cogvideox"}
_FAMILY_ALIASES = {"toy": "wan"}  # the toy teacher is a WanTransformer3DModel


# ============================================================================ the checks, before any work

def allowed_degrees(tokens: int, heads: int) -> list[int]:
    """Context-parallel degrees that split ``tokens`` video tokens and ``heads`` heads evenly."""
    return [d for d in range(1, math.gcd(int(tokens), int(heads)) + 1) if tokens % d == 0 and heads % d == 0]


def check_context_parallel(degree: Any, *, tokens: int, heads: int, world_size: int | None = None,
                           key: str = KEY) -> int:
    """Raise ``ConfigError`` (key, value, what is allowed) unless ``degree`` divides the video token
    count and the head count (and, when given, the world size); returns the degree."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ConfigError(key, degree, "must be a positive integer (1 = no context parallelism)")
    allowed = allowed_degrees(tokens, heads)
    if tokens % degree or heads % degree:
        raise ConfigError(key, degree, f"must divide the video token count {tokens} (latent frames × "
                                       f"height × width / patch) and the attention head count {heads}: "
                                       f"allowed {allowed}")
    if world_size is not None and world_size % degree:
        ok = [d for d in allowed if world_size % d == 0]
        raise ConfigError(key, degree, f"must divide the world size {world_size} (the ranks are grouped into "
                                       f"context-parallel groups of this size): allowed {ok}")
    return degree


def _family_of(module: nn.Module) -> str | None:
    """The family of a diffusers transformer (also under FSDP2, which subclasses it), else None."""
    for cls in type(module).__mro__:
        if cls.__name__ in _CLASS_FAMILY and cls.__module__.startswith("diffusers."):
            return _CLASS_FAMILY[cls.__name__]
    return None


def transformer_family(model: nn.Module) -> str:
    """'wan', 'hunyuan', 'hunyuan15' or 'cogvideox' from the diffusers transformer's class."""
    family = _family_of(model)
    if family is None:
        raise TypeError(f"context parallelism supports {sorted(_CLASS_FAMILY)}, got {type(model).__name__}")
    return family


def video_tokens(config: Any, latent_thw: Iterable[int], family: str | None = None) -> int:
    """The transformer's video token count for latents of (frames, height, width), from its config
    (a diffusers config or a dict); ``family`` is inferred from the config's keys when not given."""
    cfg = dict(config)
    t, h, w = (int(v) for v in latent_thw)
    if family is None:
        family = ("hunyuan" if "num_single_layers" in cfg else "hunyuan15" if "text_embed_2_dim" in cfg
                  else "cogvideox" if "max_text_seq_length" in cfg else "wan")
    family = _FAMILY_ALIASES.get(family, family)
    if family == "wan":
        pt, ph, pw = (int(p) for p in cfg.get("patch_size", (1, 2, 2)))
    elif family == "hunyuan":
        pt, ph, pw = (int(cfg.get("patch_size_t", 1)), int(cfg.get("patch_size", 2)),
                      int(cfg.get("patch_size", 2)))
    elif family == "hunyuan15":
        pt, ph, pw = (int(cfg.get("patch_size_t", 1)), int(cfg.get("patch_size", 1)),
                      int(cfg.get("patch_size", 1)))
    elif family == "cogvideox":
        pt, ph = int(cfg.get("patch_size_t") or 1), int(cfg.get("patch_size", 2))
        pw, t = ph, t + (-t) % pt  # CogVideoX 1.5 pads the frames to the temporal patch
    else:
        raise ValueError(f"family must be one of {FAMILIES} (or 'toy'), got {family!r}")
    return (t // pt) * (h // ph) * (w // pw)


def validate_context_parallel(model: nn.Module, degree: Any, latent_thw: Iterable[int],
                              world_size: int | None = None) -> int:
    """``check_context_parallel`` for every transformer in ``model`` at latents (T, H, W): call it
    when the run is set up, before any work."""
    for transformer in _transformers(model):
        check_context_parallel(degree, tokens=video_tokens(transformer.config, latent_thw,
                                                           transformer_family(transformer)),
                               heads=int(transformer.config.num_attention_heads), world_size=world_size)
    return degree


# ============================================================================ autograd-aware collectives

def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    send = torch.stack(x.chunk(world, dim=scatter_dim)).contiguous()  # chunk j goes to rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)  # rank j's chunk lands j-th along gather_dim


class _AllToAll(torch.autograd.Function):
    """Split ``scatter_dim`` over the ranks, concatenate what arrives along ``gather_dim``; the
    backward is the inverse all-to-all."""

    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad.contiguous(), gather_dim, scatter_dim, ctx.group), None, None, None


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's equal-sized tensor along ``dim``; the backward is a reduce-scatter
    (sum), written as an all-to-all because gloo has no reduce-scatter."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        send = torch.stack(grad.chunk(world, dim=ctx.dim)).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=ctx.group)
        return recv.sum(0), None, None


def seq_to_heads(x: torch.Tensor, group, token_dim: int = 1, head_dim: int = 2) -> torch.Tensor:
    """(…, tokens/P, heads, …) on each rank → (…, tokens, heads/P, …)."""
    return _AllToAll.apply(x, head_dim, token_dim, group)


def heads_to_seq(x: torch.Tensor, group, token_dim: int = 1, head_dim: int = 2) -> torch.Tensor:
    """(…, tokens, heads/P, …) → (…, tokens/P, heads, …): the inverse of ``seq_to_heads``."""
    return _AllToAll.apply(x, token_dim, head_dim, group)


def all_gather(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Every rank's slice concatenated along ``dim`` in rank order (gradient: reduce-scatter sum)."""
    return _AllGather.apply(x, dim, group)


def _rank_heads(x: torch.Tensor, group, head_dim: int = 2) -> torch.Tensor:
    """This rank's contiguous block of heads of a replicated tensor (its gradient is zero elsewhere)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    per = x.shape[head_dim] // world
    return x.narrow(head_dim, rank * per, per)


# ============================================================================ attention processors

class _UlyssesProcessor:
    """Shared parts; ``_attention_backend`` is what diffusers' ``set_attention_backend`` sets (None:
    diffusers' active backend).  Under ``training.compile`` a block's compiled forward runs the processors
    eagerly (``torch.compiler.disable``): the all-to-alls are not traced into its graph."""

    _attention_backend = None
    _parallel_config = None  # diffusers' own CP stays off: these processors do the all-to-all

    def __init__(self, group):
        self.group = group

    def attend(self, query, key, value, attention_mask=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                     is_causal=False, backend=self._attention_backend)

    def joint_attention(self, image_qkv, text_qkv, attention_mask, rotary, text_first: bool):
        """Video q/k/v (3, B, tokens/P, H, D) of the rank's tokens and text q/k/v (3, B, L, H, D),
        replicated: attention over the whole clip and the text for the rank's heads.  Returns the
        video output (B, tokens/P, H·D) and the text output (B, L, H·D), the same on every rank."""
        image_qkv = seq_to_heads(image_qkv, self.group, token_dim=2, head_dim=3)  # (3, B, tokens, H/P, D)
        text_qkv = _rank_heads(text_qkv, self.group, head_dim=3)
        q, k, v = image_qkv.unbind(0)
        if rotary is not None:
            q, k = rotary(q), rotary(k)
        tokens, text_tokens = q.shape[1], text_qkv.shape[2]
        parts = [(q, k, v), text_qkv.unbind(0)]
        if text_first:
            parts.reverse()
        q, k, v = (torch.cat(p, dim=1) for p in zip(*parts))
        out = self.attend(q, k, v, attention_mask)
        image_out, text_out = ((out[:, text_tokens:], out[:, :text_tokens]) if text_first
                               else (out[:, :tokens], out[:, tokens:]))
        image_out = heads_to_seq(image_out, self.group).flatten(2, 3)
        text_out = all_gather(text_out, self.group, dim=2).flatten(2, 3)
        return image_out, text_out


class WanContextParallelAttnProcessor(_UlyssesProcessor):
    """Wan's self-attention (``attn1``) under context parallelism; cross-attention keeps diffusers'
    processor (its queries are the rank's tokens, its keys the whole text)."""

    @torch.compiler.disable
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None:
            raise ValueError("WanContextParallelAttnProcessor is for self-attention (attn1) only")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # RMS norm across heads: per token, before the split
        query, key = attn.norm_q(query), attn.norm_k(key)
        qkv = torch.stack([t.unflatten(2, (attn.heads, -1)) for t in (query, key, value)])
        q, k, v = seq_to_heads(qkv, self.group, token_dim=2, head_dim=3).unbind(0)  # (B, tokens, H/P, D)
        if rotary_emb is not None:
            q, k = _wan_rotary(q, *rotary_emb), _wan_rotary(k, *rotary_emb)
        out = self.attend(q, k, v, attention_mask)
        out = heads_to_seq(out, self.group).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """WanAttnProcessor's rotary embedding (interleaved pairs), on (B, tokens, heads, D)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class HunyuanVideoContextParallelAttnProcessor(_UlyssesProcessor):
    """HunyuanVideo's dual-stream (separate text projections) and single-stream (shared projections)
    joint attention: [video; text], text padding masked by ``attention_mask`` (B, 1, 1, tokens + L)."""

    @torch.compiler.disable
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        if encoder_hidden_states is None:
            raise ValueError("HunyuanVideoContextParallelAttnProcessor is for the joint (video + text) "
                             "attention")
        text_tokens, dual = encoder_hidden_states.shape[1], attn.add_q_proj is not None
        x = hidden_states if dual else torch.cat([hidden_states, encoder_hidden_states], dim=1)
        qkv = [proj(x).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v)]
        if attn.norm_q is not None:
            qkv[0] = attn.norm_q(qkv[0])
        if attn.norm_k is not None:
            qkv[1] = attn.norm_k(qkv[1])
        if dual:
            text = [proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                    for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
            if attn.norm_added_q is not None:
                text[0] = attn.norm_added_q(text[0])
            if attn.norm_added_k is not None:
                text[1] = attn.norm_added_k(text[1])
            image_qkv, text_qkv = torch.stack(qkv), torch.stack(text)
        else:
            stacked = torch.stack(qkv)
            image_qkv, text_qkv = stacked[:, :, :-text_tokens], stacked[:, :, -text_tokens:]
        rotary = None
        if image_rotary_emb is not None:
            def rotary(t):
                return apply_rotary_emb(t, image_rotary_emb, sequence_dim=1)
        image_out, text_out = self.joint_attention(image_qkv, text_qkv, attention_mask, rotary,
                                                   text_first=False)
        image_out, text_out = image_out.to(qkv[0].dtype), text_out.to(qkv[0].dtype)
        if getattr(attn, "to_out", None) is not None:
            image_out = attn.to_out[1](attn.to_out[0](image_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return image_out, text_out


class HunyuanVideo15ContextParallelAttnProcessor(HunyuanVideoContextParallelAttnProcessor):
    """HunyuanVideo 1.5's dual-stream joint attention over [video; text]: ``HunyuanVideo15AttnProcessor2_0``
    gets the text mask (B, L), pads it with True for the video tokens and attends with the query-and-key
    mask m_i & m_j (padded text tokens neither attend nor are attended to).  Here the same mask is built for
    the whole clip (the rank's tokens × the group size), then the dual-stream path above runs."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        tokens = hidden_states.shape[1] * dist.get_world_size(self.group)
        keep = torch.nn.functional.pad(attention_mask.bool(), (tokens, 0), value=True)  # (B, tokens + L)
        mask = keep[:, None, :, None] & keep[:, None, None, :]  # (B, 1, S, S)
        return super().__call__(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)


class CogVideoXContextParallelAttnProcessor(_UlyssesProcessor):
    """CogVideoX's joint attention over [text; video] with shared projections; RoPE (5B, 1.5) on the
    video tokens after the all-to-all."""

    @torch.compiler.disable
    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None,
                 image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError("CogVideoX under context parallelism: attention_mask must be None (its pipeline "
                             "passes none; a mask is not split across the ranks)")
        text_tokens = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        qkv = [proj(x).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v)]
        if attn.norm_q is not None:
            qkv[0] = attn.norm_q(qkv[0])
        if attn.norm_k is not None:
            qkv[1] = attn.norm_k(qkv[1])
        stacked = torch.stack(qkv)
        text_qkv, image_qkv = stacked[:, :, :text_tokens], stacked[:, :, text_tokens:]
        rotary = None
        if image_rotary_emb is not None:
            def rotary(t):
                return apply_rotary_emb(t, image_rotary_emb, sequence_dim=1)
        image_out, text_out = self.joint_attention(image_qkv, text_qkv, None, rotary, text_first=True)
        out = attn.to_out[1](attn.to_out[0](torch.cat([text_out, image_out], dim=1)))
        text_out, image_out = out.split([text_tokens, image_out.shape[1]], dim=1)
        return image_out, text_out


_PROCESSORS = {"wan": WanContextParallelAttnProcessor, "hunyuan": HunyuanVideoContextParallelAttnProcessor,
               "hunyuan15": HunyuanVideo15ContextParallelAttnProcessor,
               "cogvideox": CogVideoXContextParallelAttnProcessor}


# ============================================================================ installing it on a model

def _transformers(model: nn.Module) -> list[nn.Module]:
    """The diffusers video transformers inside ``model`` (through expert / PEFT / DDP / FSDP wrappers)."""
    found = transformers_in(model)
    if not found:
        raise TypeError(f"no diffusers transformer of {sorted(_CLASS_FAMILY)} inside {type(model).__name__}")
    return found


def transformers_in(model: nn.Module) -> list[nn.Module]:
    """The diffusers video transformers inside ``model``, possibly none."""
    return [m for m in model.modules() if _family_of(m) is not None]


def _blocks(model: nn.Module, family: str) -> list[nn.Module]:
    if family == "wan":
        return list(model.blocks)
    if family == "hunyuan":
        return list(model.transformer_blocks) + list(model.single_transformer_blocks)
    return list(model.transformer_blocks)


def _attention_modules(model: nn.Module, family: str) -> list[nn.Module]:
    """The attention modules whose processor does the all-to-all (Wan: self-attention only; HunyuanVideo:
    the dual- and single-stream blocks' joint attention, not the text-only token refiner)."""
    if family in ("hunyuan", "hunyuan15"):
        return [block.attn for block in _blocks(model, family)]
    return [block.attn1 for block in _blocks(model, family)]


def _group_and_degree(group) -> tuple[Any, int, int]:
    if group is not None and hasattr(group, "get_group"):  # a 1-D DeviceMesh
        group = group.get_group()
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallelism needs an initialised torch.distributed process group")
    return group, dist.get_world_size(group), dist.get_rank(group)


@dataclass
class ContextParallel:
    """What ``enable_context_parallel`` installed: the group, its size and this rank's place in it,
    and the hooks and processors to take back with ``remove``."""

    group: Any
    degree: int
    rank: int
    transformers: list[nn.Module] = field(default_factory=list)
    local_tokens: int | None = None  # this rank's video tokens in the latest forward
    _handles: list[Any] = field(default_factory=list, repr=False)
    _processors: list[tuple[nn.Module, Any]] = field(default_factory=list, repr=False)

    def gather_tokens(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """A (B, tokens, …) tensor of the latest forward whole on every rank: block outputs seen by
        hooks (the discriminator's feature taps) are the rank's slice; the last block's output is
        already whole and comes back unchanged."""
        if self.degree == 1 or self.local_tokens is None or x.shape[dim] == self.local_tokens * self.degree:
            return x
        if x.shape[dim] != self.local_tokens:
            raise ValueError(f"expected {self.local_tokens} (this rank's) or "
                             f"{self.local_tokens * self.degree} tokens along dim {dim}, got {x.shape[dim]}")
        return all_gather(x, self.group, dim=dim)

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Mean of each gradient over the context-parallel group: the single-rank gradient (see the
        module docstring).  FSDP2 / DDP over a group containing the context-parallel ranks do this
        themselves; call it only without such a wrapper."""
        average_gradients(parameters, self.group)

    def remove(self) -> None:
        """Take the hooks and processors back: the model runs on one rank again."""
        for handle in self._handles:
            handle.remove()
        for module, processor in self._processors:
            module.set_processor(processor)
        for transformer in self.transformers:
            transformer._dcm_context_parallel = None
        self._handles, self._processors, self.transformers = [], [], []


def average_gradients(parameters: Iterable[torch.nn.Parameter], group) -> None:
    """All-reduce each gradient over ``group`` and divide by its size (for tests, runs without an FSDP/DDP
    wrapper, and FSDP sharded over the data-parallel ranks only, where the context-parallel ranks hold the
    same shards: their local gradient shards are averaged here)."""
    world = dist.get_world_size(group)
    for p in parameters:
        if p.grad is not None:
            # a DTensor: this rank's shard
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            dist.all_reduce(grad, group=group)
            grad.div_(world)


def enable_context_parallel(model: nn.Module, family: Any = None, group=None) -> ContextParallel:
    """Split the video tokens of every diffusers transformer inside ``model`` over ``group`` (a process
    group or a 1-D DeviceMesh; None: the default group).  ``family`` ('wan' | 'toy' | 'hunyuan' |
    'hunyuan15' | 'cogvideox', or a backbone with a ``family``) is checked against the transformer's class.

    Installs the Ulysses attention processors, a pre-hook on the first block that keeps the rank's
    slice of the tokens and a hook on the last block that gathers them; the call signature and the
    output of the model are unchanged.  Every rank must hold the same weights and get the same inputs.
    Fails with ``ConfigError`` when the group size does not divide the head count (here) or the token
    count (at the first forward; ``validate_context_parallel`` checks it before any work)."""
    group, degree, rank = _group_and_degree(group)
    expected = getattr(family, "family", family)
    expected = _FAMILY_ALIASES.get(expected, expected)
    if expected is not None and expected not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} (or 'toy'), got {expected!r}")
    cp = ContextParallel(group=group, degree=degree, rank=rank)
    for transformer in _transformers(model):
        fam = transformer_family(transformer)
        if expected is not None and fam != expected:
            raise ValueError(f"family {expected!r} does not match the transformer's class "
                             f"{type(transformer).__name__}")
        _install(cp, transformer)
    return cp


def enable_context_parallel_on(models: Iterable[nn.Module | None], group=None) -> ContextParallel:
    """``enable_context_parallel`` for every distinct diffusers transformer inside ``models`` (None and
    modules holding none are skipped; a transformer reached twice, e.g. a student that an objective also
    holds, is set up once), all sharing one ``ContextParallel``: what the training loop calls on the
    student, its EMA copy, the frozen teacher and the objectives' networks.  ``remove`` takes it all back."""
    group, degree, rank = _group_and_degree(group)
    cp = ContextParallel(group=group, degree=degree, rank=rank)
    for model in models:
        for transformer in transformers_in(model) if model is not None else []:
            if getattr(transformer, "_dcm_context_parallel", None) is not cp:
                _install(cp, transformer)
    return cp


def context_parallel_of(model: nn.Module) -> ContextParallel | None:
    """The ``ContextParallel`` enabled on the transformer inside ``model`` (None: none, or no transformer)."""
    for transformer in transformers_in(model):
        cp = getattr(transformer, "_dcm_context_parallel", None)
        if cp is not None:
            return cp
    return None


def gather_taps(model: nn.Module, taps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Block outputs (B, tokens, dim) taken by hooks during the latest forward of ``model``, each whole on
    every rank (the rank's slice all-gathered; gradient: reduce-scatter) when context parallelism is on
    for it; unchanged otherwise.  DetE's discriminator heads and feature matching need the whole grid."""
    cp = context_parallel_of(model)
    if cp is None or cp.degree == 1:
        return taps
    return [cp.gather_tokens(tap) for tap in taps]


def _install(cp: ContextParallel, transformer: nn.Module) -> None:
    """The Ulysses processors and the split / gather hooks on one transformer (checked first)."""
    fam, degree = transformer_family(transformer), cp.degree
    if getattr(transformer, "_dcm_context_parallel", None) is not None:
        raise RuntimeError(f"context parallelism is already enabled on this {type(transformer).__name__}")
    heads = int(transformer.config.num_attention_heads)
    if heads % degree:
        raise ConfigError(KEY, degree, f"must divide the attention head count {heads}: allowed "
                                       f"{[d for d in range(1, heads + 1) if heads % d == 0]}")
    if fam == "hunyuan" and transformer.config.get("image_condition_type") == "token_replace":
        raise ConfigError(KEY, degree, "1 for a HunyuanVideo transformer with image_condition_type "
                                       "'token_replace' (its first-frame modulation is not split across "
                                       "ranks)")
    transformer._dcm_context_parallel = cp
    cp.transformers.append(transformer)
    if degree == 1:
        return
    for attn in _attention_modules(transformer, fam):
        cp._processors.append((attn, attn.processor))
        processor = _PROCESSORS[fam](cp.group)
        # the kernel backbone.attention_backend set on the processor it replaces (None: the active one)
        processor._attention_backend = getattr(attn.processor, "_attention_backend", None)
        attn.set_processor(processor)
    blocks = _blocks(transformer, fam)
    cp._handles.append(blocks[0].register_forward_pre_hook(_split_hook(cp), with_kwargs=True))
    cp._handles.append(blocks[-1].register_forward_hook(_gather_hook(cp)))
    if fam == "wan":
        cp._handles += [block.register_forward_pre_hook(_token_timestep_hook(cp), with_kwargs=True)
                        for block in blocks]


def _token_timestep_hook(cp: ContextParallel):
    """Wan 2.2 TI2V's per-token timestep: ``WanTransformer3DModel.forward`` hands every block the whole
    clip's timestep projection (B, tokens, 6, dim); each block keeps the rank's contiguous tokens of it, the
    slice the split hook keeps of the hidden states.  The output head modulates the gathered tokens with the
    whole temb (B, tokens, dim), which the condition embedder made on every rank."""
    def hook(_module, args, kwargs):
        positional = len(args) > 2
        temb = args[2] if positional else kwargs.get("temb")
        if temb is None or temb.ndim != 4:  # (B, 6, dim): one timestep per sample, nothing to split
            return None
        local = temb.shape[1] // cp.degree
        temb = temb.narrow(1, cp.rank * local, local)
        if positional:
            return (*args[:2], temb, *args[3:]), kwargs
        return args, {**kwargs, "temb": temb}
    return hook


def _split_hook(cp: ContextParallel):
    def hook(_module, args, kwargs):
        positional = len(args) > 0
        x = args[0] if positional else kwargs["hidden_states"]
        tokens = x.shape[1]
        if tokens % cp.degree:
            heads = int(cp.transformers[0].config.num_attention_heads)
            check_context_parallel(cp.degree, tokens=tokens, heads=heads)
        local = tokens // cp.degree
        cp.local_tokens = local
        x = x.narrow(1, cp.rank * local, local)
        if positional:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}
    return hook


def _gather_hook(cp: ContextParallel):
    def hook(_module, _args, output):
        if isinstance(output, tuple):
            return (all_gather(output[0], cp.group, dim=1), *output[1:])
        return all_gather(output, cp.group, dim=1)
    return hook
