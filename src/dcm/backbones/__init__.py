"""Teacher families behind one protocol (``Backbone``); ``load_teacher`` picks the adapter from params."""

from __future__ import annotations

from pathlib import Path

from dcm.backbones.base import Backbone, PromptEmbeds
from dcm.config import ConfigError, Params

__all__ = ["Backbone", "PromptEmbeds", "load_teacher", "create_teacher"]

FAMILIES = ("toy",)  # real families (wan, hunyuan, cogvideox) land with their adapters


def create_teacher(params: Params) -> Backbone:
    """A freshly initialised teacher (the toy family is pretrained by the ``teacher`` stage)."""
    _check_family(params)
    from dcm.backbones.toy import ToyBackbone

    return ToyBackbone.create(params.backbone.toy, params.backbone.guidance_scale, seed=params.seed)


def load_teacher(params: Params, path: str | Path) -> Backbone:
    """The trained teacher, loaded from a local folder through diffusers' ``from_pretrained``."""
    _check_family(params)
    from dcm.backbones.toy import ToyBackbone

    backbone = ToyBackbone.from_pretrained(path, guidance_scale=params.backbone.guidance_scale)
    backbone.transformer.eval().requires_grad_(False)
    backbone.prompt_encoder.eval().requires_grad_(False)
    return backbone


def _check_family(params: Params) -> None:
    if params.backbone.family not in FAMILIES:
        raise ConfigError("backbone.family", params.backbone.family,
                          f"one of {list(FAMILIES)} in this version (real-backbone adapters are not built yet)")
