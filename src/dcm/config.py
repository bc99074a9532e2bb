"""Typed experiment parameters: ``params.yaml`` loaded into dataclasses and validated before any work.

Every error names the key path, the offending value and what is allowed.  The JSON schema in
``workflow/schemas/params.schema.json`` (Snakemake's ``validate``) is generated from the same
dataclasses (``dcm schema``), so the two contracts cannot drift apart.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

PRESETS_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A bad parameter: names the key path, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"params: {key} = {value!r} is invalid: {allowed}")


def _range(minimum: float | None = None, maximum: float | None = None, exclusive_min: bool = False,
           exclusive_max: bool = False) -> dict:
    return {"minimum": minimum, "maximum": maximum, "exclusive_min": exclusive_min, "exclusive_max": exclusive_max}


def positive() -> dict:
    return {"metadata": _range(0, exclusive_min=True)}


def at_least(minimum: float) -> dict:
    return {"metadata": _range(minimum)}


def between(minimum: float, maximum: float, exclusive_max: bool = False) -> dict:
    return {"metadata": _range(minimum, maximum, exclusive_max=exclusive_max)}


# --------------------------------------------------------------------------------------- sections


@dataclass
class ToyBackboneConfig:
    """Tiny diffusers WanTransformer3DModel + pixel-unshuffle codec + learned prompt encoder."""

    num_layers: int = field(**at_least(1))
    num_attention_heads: int = field(**at_least(1))
    attention_head_dim: int = field(**at_least(8))
    ffn_dim: int = field(**at_least(1))
    text_dim: int = field(**at_least(8))
    freq_dim: int = field(**at_least(8))
    codec_factor: int = field(**at_least(1))  # pixel-unshuffle factor: latent channels = 3·f²
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])


@dataclass
class RealBackboneConfig:
    """Real teachers (wan, hunyuan, cogvideox): the video size and how the frozen parts run."""

    height: int = field(**at_least(16))  # pixels, a multiple of 16 (VAE ×8 · patch 2)
    width: int = field(**at_least(16))
    frames: int = field(**at_least(1))  # pixel frames, 4k+1 (the VAEs compress time 4×)
    max_sequence_length: int | None = field(default=None, **at_least(1))  # text tokens; null: the family's own
    text_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # frozen text encoders
    vae_dtype: Literal["bf16", "fp16", "fp32"] = "fp32"
    vae_tiling: bool = False
    vae_slicing: bool = False
    negative_prompt: str = ""  # the unconditional prompt of CFG (wan, cogvideox)


@dataclass
class BackboneConfig:
    family: Literal["toy", "wan", "hunyuan", "cogvideox"]
    path: str | None  # local diffusers folder for real backbones (never a hub id)
    guidance_scale: float = field(**at_least(0))  # CFG scale (embedded guidance for hunyuan)
    toy: ToyBackboneConfig | None = None
    real: RealBackboneConfig | None = None  # video size etc. for wan, hunyuan, cogvideox


@dataclass
class WorldConfig:
    name: Literal["shapes"]
    size: int = field(**at_least(16))
    frames: int = field(**at_least(2))
    quality: Literal["clean", "low"] = "clean"  # the teacher's training videos ("low" is MCM's setting)
    # start centres within ± this many px (at the 32 px reference) of the centred track; null: anywhere
    position_jitter: float | None = field(default=None, **at_least(0))
    eval_prompts: int = field(default=16, **at_least(1))
    eval_seeds: int = field(default=2, **at_least(1))


@dataclass
class GridConfig:
    steps: int = field(**at_least(2))
    shift: float = field(**positive())
    num_train_timesteps: int = field(default=1000, **at_least(2))
    kappa: int = field(default=37, **at_least(0))


@dataclass
class TeacherConfig:
    train_steps: int = field(**at_least(1))
    batch_size: int = field(**at_least(1))
    lr: float = field(**positive())
    weight_decay: float = field(default=0.0, **at_least(0))
    warmup_steps: int = field(default=0, **at_least(0))
    cfg_dropout: float = field(default=0.1, **between(0, 1, exclusive_max=True))
    log_every: int = field(default=10, **at_least(1))


@dataclass
class TrajectoryConfig:
    num_trajectories: int = field(**at_least(1))
    batch_size: int = field(**at_least(1))
    shard_size: int = field(**at_least(1))
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"


@dataclass
class TrainingConfig:
    """Settings every distillation stage shares (one training loop for all methods)."""

    source: Literal["cached", "online"]  # cached teacher trajectories, or the official noised-data mode
    batch_size: int = field(**at_least(1))
    grad_accum: int = field(default=1, **at_least(1))
    huber_c: float = field(default=0.001, **positive())
    weight_decay: float = field(default=1e-3, **at_least(0))
    max_grad_norm: float = field(default=1.0, **positive())
    ema_decay: float = field(default=0.95, **between(0, 1))
    checkpoint_every: int = field(default=100, **at_least(1))
    log_every: int = field(default=10, **at_least(1))
    # recompute each transformer block's activations in backward (student, and the frozen teacher where a
    # loss backpropagates through it: DetE's fake features, MCM's frame features); needed for real
    # backbones at full resolution on 80 GB GPUs
    gradient_checkpointing: bool = False


@dataclass
class ExpertConfig:
    train_steps: int = field(**at_least(1))
    lr: float = field(**positive())
    tc_weight: float = field(default=0.0, **at_least(0))  # temporal coherence loss weight (SemE)
    tc_offset: int = field(default=3, **at_least(1))  # frame offset l, in latent frames
    lora_rank: int = field(default=0, **at_least(0))  # 0 = full fine-tune (the +OD ablation)
    lora_alpha: float = field(default=0.0, **at_least(0))
    gan_weight: float = field(default=0.0, **at_least(0))  # GAN + feature matching on DetE
    fm_weight: float = field(default=1.0, **at_least(0))
    disc_lr: float = field(default=1e-5, **positive())


@dataclass
class McmConfig:
    """MCM (Motion Consistency Model): motion-space consistency, image discriminator, mixed trajectories."""

    cd_target: Literal["raw", "diff", "learn"] = "learn"  # motion representation the consistency loss compares
    head_ema_decay: float = field(default=0.95, **between(0, 1))  # EMA of the learn head on the target side
    video_quality: Literal["clean", "low"] = "low"  # the distillation videos (MCM: low-quality video data)
    mix_portion: float = field(default=0.5, **between(0, 1))  # share of samples started from the student's own x0
    disc_weight: float = field(default=1.0, **at_least(0))  # image discriminator (0 = off)
    disc_lr: float = field(default=5e-5, **positive())
    disc_r1: float = field(default=1e-5, **at_least(0))  # R1 penalty on the real images' features
    disc_frames: int = field(default=2, **at_least(1))  # single frames scored per video
    disc_sigma: float = field(default=0.1, **between(0, 1, exclusive_max=True))  # noise of the frozen-teacher backbone
    hq_images: int = field(default=512, **at_least(1))  # size of the high-quality still-image set


@dataclass
class MethodConfig:
    """One row of the comparison: how it is trained (if at all) and sampled."""

    kind: Literal["teacher", "consistency", "dcm", "mcm"]
    sample_steps: int = field(**at_least(1))
    train_steps: int = field(default=0, **at_least(0))  # consistency methods: optimisation steps
    lr: float = field(default=1e-4, **positive())
    phases: int = field(default=1, **at_least(1))  # consistency: 1 = LCM, K = PCM
    target: Literal["online", "ema"] = "online"
    seme: ExpertConfig | None = None
    dete: ExpertConfig | None = None
    mcm: McmConfig | None = None  # kind mcm (defaults when omitted)
    checkpoint_from: str | None = None  # reuse another method's trained weights (e.g. dcm8 from dcm)
    # dcm sampling: each expert as a plain transformer (DetE's LoRA merged into a copy: 2x weights in
    # memory, no adapter toggling per forward); false: the routed SemE+DetE wrapper (one set of weights)
    merge_experts: bool = True
    ablation: bool = False  # opt-in rows: not part of the default DAG


@dataclass
class VBenchConfig:
    """The real VBench backend (dcm.evaluation.vbench): its own venv, weights from a local directory."""

    venv: str = ".venv-vbench"  # created by `dcm vbench setup`
    weights_dir: str | None = None  # VBench's VBENCH_CACHE_DIR layout; nothing is downloaded
    mode: Literal["custom_input", "standard"] = "custom_input"  # standard = the 946-prompt suite
    dimensions: list[str] = field(default_factory=list)  # empty: every dimension the mode supports
    ngpus: int = field(default=1, **at_least(1))


@dataclass
class EvaluationConfig:
    backend: Literal["shapes-bench", "vbench"] = "shapes-bench"
    bootstrap: int = field(default=1000, **at_least(10))
    latency_repeats: int = field(default=3, **at_least(1))
    vbench: VBenchConfig = field(default_factory=VBenchConfig)


@dataclass
class AnalysisConfig:
    """The ``analyze`` stage: one model distilled over the whole range, probed per grid index."""

    train_steps: int = field(default=150, **at_least(1))
    lr: float = field(default=1e-4, **positive())
    target: Literal["online", "ema"] = "online"
    probe_batch: int = field(default=8, **at_least(1))  # trajectories per grid index for loss / grad norm


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "dcm"


@dataclass
class Params:
    experiment: str
    seed: int = field(**at_least(0))
    backbone: BackboneConfig
    world: WorldConfig
    grid: GridConfig
    teacher: TeacherConfig
    trajectories: TrajectoryConfig
    training: TrainingConfig
    methods: dict[str, MethodConfig]
    evaluation: EvaluationConfig
    launcher: Literal["local", "slurm", "debug"] = "local"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    def method(self, name: str) -> MethodConfig:
        if name not in self.methods:
            raise ConfigError("methods", name, f"one of {sorted(self.methods)}")
        return self.methods[name]

    @property
    def default_methods(self) -> list[str]:
        return [m for m, c in self.methods.items() if not c.ablation]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------ generic typed loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of names to {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _check_range(key: str, value: float, meta: dict) -> None:
    lo, hi = meta.get("minimum"), meta.get("maximum")
    if lo is not None and (value <= lo if meta.get("exclusive_min") else value < lo):
        raise ConfigError(key, value, f"must be {'>' if meta.get('exclusive_min') else '>='} {lo}"
                          + (f" and {'<' if meta.get('exclusive_max') else '<='} {hi}" if hi is not None else ""))
    if hi is not None and (value >= hi if meta.get("exclusive_max") else value > hi):
        raise ConfigError(key, value, f"must be {'<' if meta.get('exclusive_max') else '<='} {hi}"
                          + (f" and >= {lo}" if lo is not None else ""))


def _convert(tp: Any, value: Any, key: str, meta: dict | None = None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key, meta)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(key, value, _type_name(tp))
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, value, _type_name(tp))
        (inner,) = typing.get_args(tp)
        return [_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not value:
            raise ConfigError(key, value, _type_name(tp) + " (at least one)")
        _, inner = typing.get_args(tp)
        return {str(k): _convert(inner, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "an integer" + _range_text(meta))
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "a number" + _range_text(meta))
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "a string")
    if meta:
        _check_range(key, value, meta)
    return value


def _range_text(meta: dict | None) -> str:
    if not meta:
        return ""
    parts = []
    if meta.get("minimum") is not None:
        parts.append(f"{'>' if meta.get('exclusive_min') else '>='} {meta['minimum']}")
    if meta.get("maximum") is not None:
        parts.append(f"{'<' if meta.get('exclusive_max') else '<='} {meta['maximum']}")
    return " " + " and ".join(parts) if parts else ""


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping: unknown keys, missing keys, wrong types and ranges fail."""
    where = prefix or "<top level>"
    if not isinstance(data, dict):
        raise ConfigError(where, data, "a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(key, data[unknown[0]], f"unknown key; allowed keys here: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(key, None, f"missing required key ({_type_name(hints[name])})")
            continue
        kwargs[name] = _convert(hints[name], data[name], key, dict(f.metadata) or None)
    return cls(**kwargs)


# ------------------------------------------------------------------------ cross-field validation


def validate(params: Params) -> Params:
    """Checks that need more than one key (κ inside the grid, paths for real backbones, …)."""
    g = params.grid
    if g.num_train_timesteps % g.steps:
        raise ConfigError("grid.steps", g.steps, f"must divide grid.num_train_timesteps ({g.num_train_timesteps})")
    if not 0 <= g.kappa <= g.steps - 2:
        raise ConfigError("grid.kappa", g.kappa, f"must lie inside the teacher grid: 0 <= kappa <= {g.steps - 2}")
    bb = params.backbone
    if bb.family == "toy":
        if bb.toy is None:
            raise ConfigError("backbone.toy", None, "required when backbone.family is 'toy'")
        unit = bb.toy.codec_factor * bb.toy.patch_size[-1]
        if params.world.size % unit:
            raise ConfigError("world.size", params.world.size,
                              f"must be a multiple of codec_factor·patch ({unit}) for the toy backbone")
        if len(bb.toy.patch_size) != 3 or min(bb.toy.patch_size) < 1:
            raise ConfigError("backbone.toy.patch_size", bb.toy.patch_size, "three positive integers (t, h, w)")
        if params.world.frames % bb.toy.patch_size[0]:
            raise ConfigError("world.frames", params.world.frames,
                              f"must be a multiple of backbone.toy.patch_size[0] ({bb.toy.patch_size[0]}) for the toy backbone")
    else:
        if not bb.path:
            raise ConfigError("backbone.path", bb.path, f"a local diffusers folder is required for family '{bb.family}'")
        if not Path(os.path.expanduser(bb.path)).is_dir():
            raise ConfigError("backbone.path", bb.path, "an existing local directory with the pipeline's weights")
        if bb.real is None:
            raise ConfigError("backbone.real", None, f"required when backbone.family is {bb.family!r} "
                              "(height, width, frames of the videos)")
        if bb.real.frames % 4 != 1:
            raise ConfigError("backbone.real.frames", bb.real.frames, "4k+1 frames (the VAEs compress time 4x)")
        for key in ("height", "width"):
            if getattr(bb.real, key) % 16:
                raise ConfigError(f"backbone.real.{key}", getattr(bb.real, key), "a multiple of 16 (VAE 8x, patch 2)")
    for name, m in params.methods.items():
        key = f"methods.{name}"
        if m.checkpoint_from is not None and m.checkpoint_from not in params.methods:
            raise ConfigError(f"{key}.checkpoint_from", m.checkpoint_from, f"one of {sorted(params.methods)}")
        if m.mcm is not None and m.kind != "mcm":
            raise ConfigError(f"{key}.mcm", dataclasses.asdict(m.mcm),
                              f"only for kind 'mcm' (this method is kind {m.kind!r})")
        if m.kind == "mcm":
            m.mcm = m.mcm or McmConfig()
            if m.mcm.disc_frames > params.world.frames:
                raise ConfigError(f"{key}.mcm.disc_frames", m.mcm.disc_frames,
                                  f"<= world.frames ({params.world.frames}): frames are sampled per video")
        if m.kind in ("consistency", "mcm"):
            if m.phases > g.steps:
                raise ConfigError(f"{key}.phases", m.phases, f"must be <= grid.steps ({g.steps})")
            if m.train_steps < 1 and m.checkpoint_from is None:
                raise ConfigError(f"{key}.train_steps", m.train_steps, f">= 1 for a {m.kind} method")
        if m.kind == "dcm":
            if m.checkpoint_from is None:
                for expert in ("seme", "dete"):
                    if getattr(m, expert) is None:
                        raise ConfigError(f"{key}.{expert}", None, "required for a dcm method")
            if m.sample_steps < 2:
                raise ConfigError(f"{key}.sample_steps", m.sample_steps, ">= 2 (at least one step per expert)")
            n_seme = (m.sample_steps + 1) // 2
            if n_seme > g.steps - 1 - g.kappa or m.sample_steps - n_seme > g.kappa + 1:
                raise ConfigError(f"{key}.sample_steps", m.sample_steps,
                                  f"at most {2 * min(g.steps - 1 - g.kappa, g.kappa + 1)} here: each expert needs "
                                  f"one grid point per step (SemE has {g.steps - 1 - g.kappa}, DetE {g.kappa + 1} "
                                  f"with grid.steps={g.steps}, kappa={g.kappa})")
            if m.dete is not None and m.dete.lora_rank > 0 and m.dete.lora_alpha <= 0:
                raise ConfigError(f"{key}.dete.lora_alpha", m.dete.lora_alpha, "> 0 when lora_rank > 0")
        if m.kind == "teacher" and m.sample_steps > g.steps:
            raise ConfigError(f"{key}.sample_steps", m.sample_steps, f"<= grid.steps ({g.steps})")
    return params


# ------------------------------------------------------------------------------- entry points


def deep_merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in overlay.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def preset_overlay(name: str) -> dict:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError("preset", name, f"one of {['shapes', *available]}")
    return yaml.safe_load(path.read_text()) or {}


def load_raw(path: str | os.PathLike = "params.yaml", preset: str | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("params file", str(path), "an existing YAML file (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError("params file", str(path), f"valid YAML ({e})") from None
    preset = preset or os.environ.get("DCM_PRESET") or None
    if preset and preset != "shapes":
        raw = deep_merge(raw, preset_overlay(preset))
    return raw


def parse(raw: dict) -> Params:
    return validate(from_dict(Params, raw))


def load(path: str | os.PathLike = "params.yaml", preset: str | None = None) -> Params:
    """Load and validate ``params.yaml`` (optionally with a preset overlay: ``smoke``)."""
    return parse(load_raw(path, preset))


# -------------------------------------------------------------------------------- JSON schema


def _schema(tp: Any, meta: dict | None = None) -> dict:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return {"anyOf": [_schema(a, meta) for a in typing.get_args(tp)]}
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin is list:
        return {"type": "array", "items": _schema(typing.get_args(tp)[0])}
    if origin is dict:
        return {"type": "object", "minProperties": 1, "additionalProperties": _schema(typing.get_args(tp)[1])}
    if dataclasses.is_dataclass(tp):
        return dataclass_schema(tp)
    if tp is type(None):
        return {"type": "null"}
    out: dict = {"type": {int: "integer", float: "number", str: "string", bool: "boolean"}[tp]}
    if meta and tp in (int, float):
        if meta.get("minimum") is not None:
            out["exclusiveMinimum" if meta.get("exclusive_min") else "minimum"] = meta["minimum"]
        if meta.get("maximum") is not None:
            out["exclusiveMaximum" if meta.get("exclusive_max") else "maximum"] = meta["maximum"]
    return out


def dataclass_schema(cls: type) -> dict:
    hints = typing.get_type_hints(cls)
    props, required = {}, []
    for f in dataclasses.fields(cls):
        props[f.name] = _schema(hints[f.name], dict(f.metadata) or None)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
    schema = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = required
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
        schema["description"] = cls.__doc__.strip().splitlines()[0]
    return schema


def json_schema() -> dict:
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "dcm params.yaml",
            **dataclass_schema(Params)}


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"
