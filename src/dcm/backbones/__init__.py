"""Teacher families behind one protocol (``Backbone``); ``load_teacher`` picks the adapter from params.

- ``toy``: the shapes-world teacher, pretrained by the ``teacher`` stage and saved to models/teacher.
- ``wan``, ``hunyuan``, ``cogvideox``: a diffusers pipeline folder at ``backbone.path``; the
  ``teacher`` stage checks it and records it (``record_teacher``), later stages load the recorded
  folder (``dcm.backbones.real``).
"""

from __future__ import annotations

from pathlib import Path

from dcm.backbones.base import Backbone, PromptEmbeds
from dcm.config import ConfigError, Params

__all__ = ["Backbone", "PromptEmbeds", "load_teacher", "create_teacher", "record_teacher", "adapter_class",
           "FAMILIES"]

FAMILIES = ("toy", "wan", "hunyuan", "cogvideox")
REAL_FAMILIES = FAMILIES[1:]


def adapter_class(family: str):
    """The adapter class of a real family."""
    if family == "wan":
        from dcm.backbones.wan import WanBackbone

        return WanBackbone
    if family == "hunyuan":
        from dcm.backbones.hunyuan import HunyuanBackbone

        return HunyuanBackbone
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
        return adapter_class(bb.family).from_folder(bb.path, bb.real, bb.guidance_scale)
    from dcm.backbones.toy import ToyBackbone

    return ToyBackbone.create(bb.toy, bb.guidance_scale, seed=params.seed)


def record_teacher(params: Params, prompts: list[str], out_dir: str | Path) -> Backbone:
    """A real family's ``teacher`` stage: check ``backbone.path``, encode ``prompts`` (and the negative
    prompt) with its text encoders, write backbone.json + prompt_embeds.safetensors into ``out_dir``."""
    _check_family(params)
    bb = params.backbone
    cls = adapter_class(bb.family)
    cls.check_folder(bb.path)
    backbone = cls.from_folder(bb.path, bb.real, bb.guidance_scale, text_encoders=True, networks=False)
    wanted = list(dict.fromkeys([*prompts, bb.real.negative_prompt]))
    batch = 16
    for start in range(0, len(wanted), batch):
        backbone.encode_prompts(wanted[start:start + batch])
    backbone.save(out_dir)
    return backbone


def load_teacher(params: Params, path: str | Path) -> Backbone:
    """The teacher of ``path`` (models/teacher): the trained toy, or the recorded real folder, frozen."""
    _check_family(params)
    bb = params.backbone
    if bb.family in REAL_FAMILIES:
        return _load_recorded(params, Path(path))
    from dcm.backbones.toy import ToyBackbone

    backbone = ToyBackbone.from_pretrained(path, guidance_scale=bb.guidance_scale)
    backbone.transformer.eval().requires_grad_(False)
    backbone.prompt_encoder.eval().requires_grad_(False)
    return backbone


def _load_recorded(params: Params, path: Path) -> Backbone:
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
    backbone = cls.from_folder(folder, bb.real, bb.guidance_scale)
    backbone.load_prompt_table(path)
    return backbone


def _check_family(params: Params) -> None:
    if params.backbone.family not in FAMILIES:
        raise ConfigError("backbone.family", params.backbone.family, f"one of {list(FAMILIES)}")
