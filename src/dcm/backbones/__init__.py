"""Teacher families behind one protocol (``Backbone``); ``load_teacher`` picks the adapter from params.

- ``toy``: the shapes-world teacher, pretrained by the ``teacher`` stage and saved to models/teacher.
- ``wan``, ``hunyuan``, ``hunyuan15``, ``cogvideox``: a diffusers pipeline folder at ``backbone.path``; the
  ``teacher`` stage checks it and records it (``record_teacher``), the ``preprocess`` stage encodes
  every prompt once (``data/preprocessed/prompts``), and later stages load the recorded folder without
  its text encoders, the prompts' embeddings from that store (``dcm.backbones.real``).
"""

from __future__ import annotations

from pathlib import Path

from dcm import paths
from dcm.backbones.base import Backbone, PromptEmbeds
from dcm.config import ConfigError, Params

__all__ = ["Backbone", "PromptEmbeds", "load_teacher", "load_encoders", "create_teacher", "record_teacher",
           "adapter_class", "FAMILIES"]

FAMILIES = ("toy", "wan", "hunyuan", "hunyuan15", "cogvideox")
REAL_FAMILIES = FAMILIES[1:]


def adapter_class(family: str):
    """The adapter class of a real family."""
    if family == "wan":
        from dcm.backbones.wan import WanBackbone

        return WanBackbone
    if family == "hunyuan":
        from dcm.backbones.hunyuan import HunyuanBackbone

        return HunyuanBackbone
    if family == "hunyuan15":
        from dcm.backbones.hunyuan15 import Hunyuan15Backbone

        return Hunyuan15Backbone
    if family == "cogvideox":
        from dcm.backbones.cogvideox import CogVideoXBackbone

        return CogVideoXBackbone
    raise ConfigError("backbone.family", family, f"one of {list(REAL_FAMILIES)} (a real teacher family)")


def create_teacher(params: Params) -> Backbone:
    """A freshly initialised toy teacher (pretrained by the ``teacher`` stage); a real family's folder,
    loaded."""
    _check_family(params)
    bb = params.backbone
    if bb.family in REAL_FAMILIES:
        return with_kernels(adapter_class(bb.family).from_folder(bb.path, bb.real, bb.guidance_scale), params)
    from dcm.backbones.toy import ToyBackbone

    world = params.world
    open_world = world is not None and (world.open_share > 0 or world.eval_open_prompts > 0)
    teacher = ToyBackbone.create(bb.toy, bb.guidance_scale, seed=params.seed, open_captions=open_world)
    return with_kernels(teacher, params)


def record_teacher(params: Params, out_dir: str | Path) -> Backbone:
    """A real family's ``teacher`` stage: check ``backbone.path`` and write its record (backbone.json) into
    ``out_dir``; no network and no text encoder is loaded (the ``preprocess`` stage encodes the prompts)."""
    _check_family(params)
    bb = params.backbone
    cls = adapter_class(bb.family)
    cls.check_folder(bb.path)
    backbone = cls.from_folder(bb.path, bb.real, bb.guidance_scale, networks=False)
    backbone.save(out_dir)
    return backbone


def load_teacher(params: Params, path: str | Path, prompt_store: str | Path | None = paths.PROMPT_STORE
                 ) -> Backbone:
    """The teacher of ``path`` (models/teacher): the trained toy, or the recorded real folder, frozen, with
    its prompt table read from ``prompt_store`` (the ``preprocess`` stage's; None: none, the text encoders
    load on demand: only the ``preprocess`` stage itself asks for that)."""
    _check_family(params)
    bb = params.backbone
    if bb.family in REAL_FAMILIES:
        return with_kernels(_load_recorded(params, Path(path), prompt_store), params)
    from dcm.backbones.toy import ToyBackbone

    backbone = ToyBackbone.from_pretrained(path, guidance_scale=bb.guidance_scale)
    backbone.transformer.eval().requires_grad_(False)
    backbone.prompt_encoder.eval().requires_grad_(False)
    return with_kernels(backbone, params)


def with_kernels(backbone: Backbone, params: Params) -> Backbone:
    """The backbone with its transformer on ``backbone.attention_backend``, which also becomes the kernel of
    every transformer the stage loads after it (``dcm.backbones.kernels``)."""
    from dcm.backbones.kernels import set_attention_backend

    set_attention_backend(backbone.transformer, params.backbone.attention_backend)
    return backbone


def load_encoders(params: Params, path: str | Path, vae: bool) -> Backbone:
    """The recorded real folder's frozen encoders only: its text encoders, and its VAE when ``vae``; no
    transformer (what the ``preprocess`` stage runs)."""
    _check_family(params)
    bb = params.backbone
    cls, folder, _ = _recorded(params, Path(path))
    backbone = cls.from_folder(folder, bb.real, bb.guidance_scale, text_encoders=True, networks=False)
    if vae:
        backbone.load_vae()
    return backbone


def _load_recorded(params: Params, path: Path, prompt_store: str | Path | None) -> Backbone:
    bb = params.backbone
    cls, folder, record = _recorded(params, path)
    backbone = cls.from_folder(folder, bb.real, bb.guidance_scale)
    if prompt_store is not None:
        backbone.load_prompt_store(prompt_store, record["config_sha256"])
    return backbone


def _recorded(params: Params, path: Path):
    """(adapter class, folder, record) of the recorded teacher ``path``, checked against the configured
    ``backbone.path`` and the folder's current files."""
    from dcm.backbones.real import folder_config_digest, read_record

    bb = params.backbone
    record = read_record(path)
    cls = adapter_class(bb.family)
    if record.get("family") != bb.family:
        raise ConfigError("backbone.family", bb.family,
                          f"the family recorded in {path} ({record.get('family')!r}): re-run "
                          "`dcm run teacher`")
    folder = cls.check_folder(record["path"], key=f"{path}/backbone.json path")
    configured = cls.check_folder(bb.path)
    if configured != folder:
        raise ConfigError("backbone.path", bb.path,
                          f"the folder recorded in {path} ({folder}): re-run `dcm run teacher`")
    if folder_config_digest(folder) != record["config_sha256"]:
        raise ConfigError("backbone.path", bb.path, f"the folder as recorded in {path} (its config/weight "
                                                    "files changed since): re-run `dcm run teacher`")
    return cls, folder, record


def _check_family(params: Params) -> None:
    if params.backbone.family not in FAMILIES:
        raise ConfigError("backbone.family", params.backbone.family, f"one of {list(FAMILIES)}")
