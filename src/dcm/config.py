"""Typed experiment parameters: ``params.yaml`` validated by pydantic into dataclasses before any work.

Every error names the key path, the offending value and what is allowed (:class:`ConfigError`; pydantic's
errors are translated to that form).  The JSON schema in ``workflow/schemas/params.schema.json``
(Snakemake's ``validate``) is pydantic's schema of the same dataclasses (``dcm schema``), so the two
contracts cannot drift apart.  Checks that need more than one key live in :func:`validate`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from dcm import schedule

PRESETS_DIR = Path(__file__).parent / "presets"
PRESET_ENV = "DCM_PRESET"  # the old way to choose a preset: refused (DVC cannot see it)


class ConfigError(ValueError):
    """A bad parameter: names the key path, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"params: {key} = {value!r} is invalid: {allowed}")


# YAML types, strictly: no "2" for 2, no 2.0 for an integer, no 1 for true; an integer is accepted as a
# number.  Numbers must be finite (no .nan / .inf), unknown keys are errors.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]
SECTION = ConfigDict(extra="forbid", allow_inf_nan=False)


def positive(default: Any = ...) -> Any:
    return Field(default, gt=0)


def at_least(minimum: float, default: Any = ...) -> Any:
    return Field(default, ge=minimum)


def between(minimum: float, maximum: float, default: Any = ..., exclusive_max: bool = False) -> Any:
    return Field(default, ge=minimum, **({"lt": maximum} if exclusive_max else {"le": maximum}))


# --------------------------------------------------------------------------------------- sections


@dataclass(config=SECTION)
class ToyBackboneConfig:
    """Tiny diffusers WanTransformer3DModel + pixel-unshuffle codec + learned prompt encoder."""

    num_layers: Int = at_least(1)
    num_attention_heads: Int = at_least(1)
    attention_head_dim: Int = at_least(8)
    ffn_dim: Int = at_least(1)
    text_dim: Int = at_least(8)
    freq_dim: Int = at_least(8)
    codec_factor: Int = at_least(1)  # pixel-unshuffle factor: latent channels = 3·f²
    patch_size: list[Int] = Field(default_factory=lambda: [1, 2, 2])


@dataclass(config=SECTION)
class RealBackboneConfig:
    """Real teachers (wan, hunyuan, hunyuan15, cogvideox): the video size and how the frozen parts run."""

    height: Int = at_least(16)  # pixels, a multiple of 16 (VAE ×8 · patch 2; 32 with Wan 2.2's ×16 VAE)
    width: Int = at_least(16)
    frames: Int = at_least(1)  # pixel frames, 4k+1 (the VAEs compress time 4×)
    max_sequence_length: Int | None = at_least(1, None)  # text tokens; null: the family's own
    text_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # frozen text encoders
    vae_dtype: Literal["bf16", "fp16", "fp32"] = "fp32"
    vae_tiling: Bool = False
    vae_slicing: Bool = False
    negative_prompt: Str = ""  # the unconditional prompt of CFG (wan, hunyuan15, cogvideox)
    # a two-expert Wan 2.2 folder (transformer_2): the low-noise expert's CFG scale (WanPipeline's
    # guidance_scale_2); null: backbone.guidance_scale for both experts, as the pipeline does
    guidance_scale_2: Float | None = at_least(0, None)


# diffusers' attention backends a run may name (what each is: dcm.backbones.kernels): PyTorch's SDPA and the
# flash-attn packages' kernels; not the Hub-downloaded ones (stages never reach the network)
AttentionBackend = Literal["native", "_native_math", "_native_flash", "_native_efficient", "_native_cudnn",
                           "flash", "flash_varlen", "_flash_3", "_flash_varlen_3"]
ATTENTION_BACKENDS = typing.get_args(AttentionBackend)
CUDA_ATTENTION = ATTENTION_BACKENDS[3:]  # GPU only: the CPU runs SDPA's native, math and flash kernels
# no attention mask (HunyuanVideo masks its prompts' padding; the *_varlen kernels take it as key lengths)
MASKLESS_ATTENTION = ("_native_flash", "flash", "_flash_3")
# SDPA's kernels that take a full (B, 1, S, S) mask (HunyuanVideo 1.5's attention processor builds one)
SQUARE_MASK_ATTENTION = ("native", "_native_math", "_native_efficient", "_native_cudnn")


@dataclass(config=SECTION)
class BackboneConfig:
    family: Literal["toy", "wan", "hunyuan", "hunyuan15", "cogvideox"]
    path: Str | None  # local diffusers folder for real backbones (never a hub id)
    guidance_scale: Float = at_least(0)  # CFG scale (embedded guidance for hunyuan)
    toy: ToyBackboneConfig | None = None
    real: RealBackboneConfig | None = None  # video size etc. for wan, hunyuan, hunyuan15, cogvideox
    # the attention kernel of every stage's transformers, by diffusers' backend name (ATTENTION_BACKENDS)
    attention_backend: AttentionBackend = "native"
    # the released configuration `dcm plan` sizes when backbone.path holds no transformer/config.json
    # (dcm.plan.memory.VARIANTS, e.g. wan: 1.3B, 14B, A14B); null: the family's default
    variant: Str | None = None


@dataclass(config=SECTION)
class DataConfig:
    """The real teachers' data (families wan, hunyuan, cogvideox): local files only, never a hub id.  The
    shapes world has its own prompt splits (``dcm.data.prompts``) and takes none of these.

    ``dcm run preprocess`` makes every clip ``backbone.real`` frames × height × width in [-1, 1], then VAE
    latents (the posterior's mode).  The family's official policy (docs/scaling-and-slurm.md, "Real data"):
    - Wan (the DCM code's own Wan dataset): ``frame_sampling: stride``, frames evenly strided over the whole
      clip (stride ⌊n / frames⌋ from frame 0, the first ``frames`` kept); ``resize: cover_crop``, resized
      (bicubic) to cover height × width with its aspect kept, then centre-cropped.
    - HunyuanVideo (FastVideo's preprocessing, which the DCM code's HunyuanVideo runs read):
      ``frame_sampling: fps``, resampled to ``fps`` (24) from frame 0, then a ``frames``-long window at a
      random start (seeded here by ``seed`` and the row); ``resize: crop_resize``, centre-cropped to the
      target aspect, then resized (bilinear).
    Both leave out clips shorter than ``frames``; here they are bad rows, reported before any GPU work.
    """

    # training prompts: one a line (.txt), or .jsonl / .csv with a `prompt` column (and an optional `id`);
    # null: the captions of `videos`
    prompts: Str | None = None
    # captioned videos (training.source: online): a folder (captions.jsonl or captions.csv inside, or a
    # <name>.txt caption beside each <name>.mp4) or a .jsonl / .csv of `video, caption` rows (optional
    # `id`) whose video paths lie under the file's folder; DVC tracks that folder
    videos: Str | None = None
    frame_sampling: Literal["stride", "fps"] = "stride"
    fps: Float = positive(16.0)  # frame_sampling fps: the frame rate clips are resampled to
    resize: Literal["cover_crop", "crop_resize"] = "cover_crop"
    shard_size: Int = at_least(1, 64)  # prompts (or videos) per shard of data/preprocessed
    batch_size: Int = at_least(1, 1)  # videos per VAE call (batches never span shards)


@dataclass(config=SECTION)
class WorldConfig:
    name: Literal["shapes"]
    size: Int = at_least(16)
    frames: Int = at_least(2)
    quality: Literal["clean", "low"] = "clean"  # the teacher's training videos ("low" is MCM's setting)
    # start centres within ± this many px (at the 32 px reference) of the centred track; null: anywhere
    position_jitter: Float | None = at_least(0, None)
    eval_prompts: Int = at_least(1, 16)
    eval_seeds: Int = at_least(1, 2)
    # opt-in multimodal prompts (docs/shapes-world.md, "Open captions"): the share of the world's captions
    # (the teacher's training captions, the train rows) that leave attributes open, drawn uniformly per seed
    open_share: Float = between(0, 1, 0.0)
    # the attributes an open caption may leave open: each leaves a non-empty set of them (never texture alone)
    open_attributes: list[Literal["shape", "colour", "texture", "direction", "speed"]] = Field(
        default_factory=lambda: ["shape", "colour", "texture", "direction", "speed"])
    # open-caption prompts added to the eval and validation rows (eval_seeds seeds each): coverage's rows
    eval_open_prompts: Int = at_least(0, 0)

    @field_validator("open_attributes")
    @classmethod
    def _open_attributes_form_open_sets(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value) or value == ["texture"]:
            raise ValueError("distinct attribute names, at least one, and not texture alone (a caption "
                             "naming all but the texture is the full caption of the plain texture)")
        return value


@dataclass(config=SECTION)
class GridConfig:
    steps: Int = at_least(2)
    shift: Float = positive()
    num_train_timesteps: Int = at_least(2, 1000)
    kappa: Int = at_least(0, 37)


@dataclass(config=SECTION)
class TeacherConfig:
    train_steps: Int = at_least(1)
    batch_size: Int = at_least(1)
    lr: Float = positive()
    weight_decay: Float = at_least(0, 0.0)
    warmup_steps: Int = at_least(0, 0)
    cfg_dropout: Float = between(0, 1, 0.1, exclusive_max=True)
    log_every: Int = at_least(1, 10)


@dataclass(config=SECTION)
class TrajectoryConfig:
    num_trajectories: Int = at_least(1)
    batch_size: Int = at_least(1)
    shard_size: Int = at_least(1)
    # fp32: the teacher step x_n − x_{n−1} is exact (METHODS.md, Precision); bf16/fp16 round every point
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"


@dataclass(config=SECTION)
class ParallelConfig:
    """How a multi-rank training stage spreads the models over its ranks (PyTorch's engines, dcm.parallel).

    ddp: every rank holds the whole model (``replicate``); fsdp: FSDP2 ``fully_shard`` on every
    transformer block and the root over all ranks; hsdp: sharded within groups of ``shard_group_size``
    ranks, replicated across the groups.  One rank (or world size 1) wraps nothing.
    """

    strategy: Literal["ddp", "fsdp", "hsdp"] = "ddp"
    shard_group_size: Int | None = at_least(1, None)  # hsdp: ranks per shard group (null: LOCAL_WORLD_SIZE)
    # ranks splitting one sample's video tokens (divides the world size)
    context_parallel: Int = at_least(1, 1)
    # fsdp/hsdp: bf16 gathered weights and compute, fp32 grad reduce
    mixed_precision: Literal["none", "bf16"] = "none"
    # fsdp/hsdp: sharded parameters, gradients and optimizer state live in CPU memory
    cpu_offload: Bool = False
    # fsdp/hsdp: free gathered block weights after forward (re-gather in backward)
    reshard_after_forward: Bool = True
    shard_teacher: Bool = False  # fsdp/hsdp: shard the frozen teacher too (default: every rank holds a copy)


SHARDED = ("fsdp", "hsdp")


def _check_global_batch(t: TrainingConfig) -> None:
    """A global batch that no rank count can give, or given twice; the rank count is checked when a stage
    starts (``accumulation``)."""
    if t.global_batch_size is None:
        return
    if t.global_batch_size % t.batch_size:
        raise ConfigError("training.global_batch_size", t.global_batch_size,
                          f"a multiple of training.batch_size ({t.batch_size}, the samples of one rank's "
                          "micro-batch)")
    if t.grad_accum != 1:
        raise ConfigError("training.grad_accum", t.grad_accum,
                          f"1 (left out) with training.global_batch_size {t.global_batch_size}: the number "
                          "of micro-batches is then derived from the global batch and the ranks")


def _check_parallel(p: ParallelConfig) -> None:
    """Combinations of ``training.parallel`` that are wrong at any world size."""
    key = "training.parallel"
    if p.strategy not in SHARDED:
        for name, value, default in (("cpu_offload", p.cpu_offload, False),
                                     ("mixed_precision", p.mixed_precision, "none"),
                                     ("shard_teacher", p.shard_teacher, False)):
            if value != default:
                raise ConfigError(f"{key}.{name}", value, f"{default!r} with strategy {p.strategy!r} "
                                  f"(only fsdp or hsdp shard parameters; set training.parallel.strategy)")
    if p.shard_group_size is not None and p.strategy != "hsdp":
        raise ConfigError(f"{key}.shard_group_size", p.shard_group_size,
                          f"null with strategy {p.strategy!r} (the shard group size is for hsdp only)")


@dataclass(config=SECTION)
class TrainingConfig:
    """Settings every distillation stage shares (one training loop for all methods)."""

    source: Literal["cached", "online"]  # cached teacher trajectories, or the official noised-data mode
    batch_size: Int = at_least(1)  # per data-parallel rank, per micro-batch
    grad_accum: Int = at_least(1, 1)
    # samples per optimizer step over all ranks; null: batch_size × data-parallel ranks × grad_accum, which
    # grows with the GPUs.  Set, grad_accum is derived when the stage starts: global / (batch_size ×
    # data-parallel ranks), a whole number or a ConfigError before any model loads (the paper's global
    # batch at whatever rank count the launcher gives; :func:`accumulation`)
    global_batch_size: Int | None = at_least(1, None)
    huber_c: Float = positive(0.001)
    weight_decay: Float = at_least(0, 1e-3)
    max_grad_norm: Float = positive(1.0)
    ema_decay: Float = between(0, 1, 0.95)
    checkpoint_every: Int = at_least(1, 100)
    log_every: Int = at_least(1, 10)
    # recompute each transformer block's activations in backward (student, and the frozen teacher where a
    # loss backpropagates through it: DetE's fake features, MCM's frame features); needed for real
    # backbones at full resolution on 80 GB GPUs
    gradient_checkpointing: Bool = False
    # share of training prompts replaced by the empty prompt's embedding, for every method whose kind drops
    # prompts (methods.<m>.prompt_dropout overrides it; DMD2 never drops); a dropped row's teacher step is the
    # one under the empty prompt (official Wan recipe: 0.1; HunyuanVideo: 0, its guidance is embedded)
    prompt_dropout: Float = between(0, 1, 0.0, exclusive_max=True)
    # each loss term's gradient norm on logging steps (grad_norm/<term> in history.jsonl, read by
    # benchmarks/grad_norms.py): one autograd.grad pass per term in one process, one more backward per term
    # in a multi-rank run (docs/scaling-and-slurm.md); false: neither, the step's own total norm stays logged
    term_grad_norms: Bool = True
    # regional torch.compile (inductor) of every transformer block a training stage runs (student, EMA,
    # teacher, an objective's): the first steps compile; hooks, checkpointing and FSDP2 stay outside the
    # compiled code (dcm.backbones.kernels)
    compile: Bool = False
    # multi-rank layout (ddp | fsdp | hsdp, context parallel, mixed precision, offload); batch_size is per
    # data-parallel rank, so the global batch is batch_size × world size / context_parallel × grad_accum
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)

    def accumulation(self, data_ranks: int, world: int | None = None, cp: int = 1) -> int:
        """Micro-batches per optimizer step at ``data_ranks`` data-parallel ranks (``world`` ranks over
        context-parallel groups of ``cp``): ``grad_accum``, or derived from ``global_batch_size``."""
        return accumulation(self.global_batch_size, self.batch_size, self.grad_accum, data_ranks, world, cp)


def accumulation(global_batch: int | None, batch_size: int, grad_accum: int, data_ranks: int,
                 world: int | None = None, cp: int = 1) -> int:
    """Micro-batches per optimizer step: ``grad_accum`` when no global batch is set, else global /
    (batch_size × data_ranks), which must be a whole number; the ConfigError names the rank layout and the
    rank counts that give the global batch."""
    if global_batch is None:
        return grad_accum
    per_micro = batch_size * data_ranks  # one micro-batch over all data-parallel ranks
    if global_batch % per_micro == 0:
        return global_batch // per_micro
    layout = f" ({world} ranks / context_parallel {cp})" if world is not None else ""
    fits = [d * cp for d in range(1, global_batch // batch_size + 1) if global_batch % (batch_size * d) == 0]
    raise ConfigError("training.global_batch_size", global_batch,
                      f"a multiple of training.batch_size × data-parallel ranks ({batch_size} per rank × "
                      f"{data_ranks}{layout} = {per_micro} per micro-batch): at batch_size {batch_size} and "
                      f"context_parallel {cp} the rank counts that give it are {fits}; launch on one of "
                      "those (launcher local: DCM_LOCAL_RANKS; SLURM: the stage's row) or change batch_size")


@dataclass(config=SECTION)
class ExpertConfig:
    """What both experts of a dcm method share: their own optimisation budget."""

    train_steps: Int = at_least(1)
    lr: Float = positive()
    # share of this expert's training prompts replaced by the empty prompt; null: training.prompt_dropout
    # (a dcm row sets it per expert: the expert stages track their own section)
    prompt_dropout: Float | None = between(0, 1, None, exclusive_max=True)


@dataclass(config=SECTION)
class SemeConfig(ExpertConfig):
    """SemE: full-parameter expert on the high-noise range, with the temporal coherence loss."""

    tc_weight: Float = at_least(0, 0.0)  # temporal coherence loss weight (paper: 1)
    tc_offset: Int = at_least(1, 3)  # frame offset l, in latent frames (paper: 3)


@dataclass(config=SECTION)
class DeteConfig(ExpertConfig):
    """DetE: LoRA + copied timestep layers on the low-noise range, GAN and feature matching (paper
    defaults)."""

    lora_rank: Int = at_least(0, 128)  # 0 = full fine-tune (the +OD ablation)
    lora_alpha: Float = at_least(0, 256.0)
    gan_weight: Float = at_least(0, 1.0)  # scales the generator's hinge term (0 = no discriminator)
    fm_weight: Float = at_least(0, 1.0)  # λ_fm, feature matching on frozen-teacher features (0 = off)
    disc_lr: Float = positive(1e-5)
    # adversarial variants (the defaults are the paper's / official code's; dcm.distill.discriminator):
    disc_warmup: Int = at_least(0, 0)  # first steps in which only D trains (G's hinge off; FM as configured)
    disc_steps: Int = at_least(1, 1)  # D optimizer steps per G step (official 1:1)
    # G's hinge switches on (and stays on) once D's margin, the running mean of D(real) − D(fake), exceeds
    # this; null: on from the start
    hinge_margin: Float | None = None
    # the adversarial "real": target = the consistency target x̂_tgt (paper); ema = the endpoint of an EMA
    # copy of DetE (decay training.ema_decay); trajectory = the cached teacher trajectory's point at σ_end
    # (training.source: cached only)
    real: Literal["target", "ema", "trajectory"] = "target"


@dataclass(config=SECTION)
class McmConfig:
    """MCM (Motion Consistency Model): motion-space consistency, image discriminator, mixed trajectories."""

    # motion representation the consistency loss compares
    cd_target: Literal["raw", "diff", "learn"] = "learn"
    head_ema_decay: Float = between(0, 1, 0.95)  # EMA of the learn head on the target side
    video_quality: Literal["clean", "low"] = "low"  # the distillation videos (MCM: low-quality video data)
    mix_portion: Float = between(0, 1, 0.5)  # share of samples started from the student's own x0
    disc_weight: Float = at_least(0, 1.0)  # image discriminator (0 = off)
    disc_lr: Float = positive(5e-5)
    disc_r1: Float = at_least(0, 1e-5)  # R1 penalty on the real images' features
    disc_frames: Int = at_least(1, 2)  # single frames scored per video
    # heads conditioned on the frame's prompt (MCM's: projection style); false: unconditioned heads, as
    # this code had them before (issue 31's one-change rows on MCM's imaging quality)
    disc_text: bool = True
    disc_sigma: Float = between(0, 1, 0.1, exclusive_max=True)  # noise of the frozen-teacher backbone
    hq_images: Int = at_least(1, 512)  # size of the high-quality still-image set


@dataclass(config=SECTION)
class Dmd2Config:
    """DMD2 (Yin et al., arXiv 2405.14867): distribution matching against the guided teacher with an online
    fake score, optional GAN classifier on the fake score's features.  Defaults: the official 4-step SDXL
    recipe."""

    # fake-score updates per generator update (two time-scale rule; official 5)
    fake_steps: Int = at_least(1, 5)
    # fake score's AdamW lr; null: methods.<m>.lr (official: equal lrs)
    fake_lr: Float | None = positive(None)
    dm_weight: Float = at_least(0, 1.0)  # distribution-matching loss weight (official dm_loss_weight 1)
    # generator's GAN term (official SDXL 5e-3, ImageNet 3e-3); 0 = no classifier
    gan_weight: Float = at_least(0, 5e-3)
    cls_weight: Float = at_least(0, 1e-2)  # classifier loss in the fake score's update (official 1e-2)
    # the DM loss's σ_t: a training sigma (uniform on the unshifted scale) clamped to [t_min, t_max] after
    # the shift (FastVideo's DMD; DMD2 unshifted: min/max_step_percent 0.02 / 0.98)
    t_min: Float = between(0, 1, 0.02)
    t_max: Float = between(0, 1, 0.98)
    # real score's guidance (CFG w, or HunyuanVideo's embedded scale); null: backbone.guidance_scale, the
    # teacher every other method distils (official SDXL: 8)
    guidance: Float | None = positive(None)


# ------------------------------------------------------------------------------------ method kinds


def _check_teacher(key: str, m: MethodConfig, params: Params) -> None:
    if m.sample_steps > params.grid.steps:
        raise ConfigError(f"{key}.sample_steps", m.sample_steps, f"<= grid.steps ({params.grid.steps})")


def _check_consistency(key: str, m: MethodConfig, params: Params) -> None:
    """LCM (1 phase), PCM (K phases) and MCM: phases of the teacher grid, trained unless the weights are
    reused."""
    if m.phases > params.grid.steps:
        raise ConfigError(f"{key}.phases", m.phases, f"must be <= grid.steps ({params.grid.steps})")
    if m.train_steps < 1 and m.checkpoint_from is None:
        raise ConfigError(f"{key}.train_steps", m.train_steps, f">= 1 for a {m.kind} method")


def _check_mcm(key: str, m: MethodConfig, params: Params) -> None:
    _check_consistency(key, m, params)
    if m.mcm.disc_frames > params.world.frames:
        raise ConfigError(f"{key}.mcm.disc_frames", m.mcm.disc_frames,
                          f"<= world.frames ({params.world.frames}): frames are sampled per video")


def _check_dmd2(key: str, m: MethodConfig, params: Params) -> None:
    """A dmd2 row: its generator is trained on its own x0-then-re-noise samples at the sampling steps."""
    if m.train_steps < 1 and m.checkpoint_from is None:
        raise ConfigError(f"{key}.train_steps", m.train_steps, ">= 1 generator steps for a dmd2 method")
    if m.sample_steps > params.grid.steps:
        raise ConfigError(f"{key}.sample_steps", m.sample_steps,
                          f"<= grid.steps ({params.grid.steps}): one grid point per step")
    if m.dmd2.t_min >= m.dmd2.t_max:
        raise ConfigError(f"{key}.dmd2.t_min", m.dmd2.t_min, f"< {key}.dmd2.t_max ({m.dmd2.t_max})")


def _check_dcm(key: str, m: MethodConfig, params: Params) -> None:
    """Both experts get at least one sampling step and one grid point per step on their side of κ."""
    g = params.grid
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


def _check_data(params: Params) -> None:
    """The data keys belong to the real families; the shapes world keeps its own prompt splits."""
    if params.backbone.family != "toy":
        return
    for key, value in (("data.prompts", params.data.prompts), ("data.videos", params.data.videos),
                       ("evaluation.prompts", params.evaluation.prompts)):
        if value is not None:
            raise ConfigError(key, value, "null for backbone.family 'toy': the shapes world has its own "
                              "prompt splits (world.eval_prompts, world.eval_seeds, "
                              "trajectories.num_trajectories)")


@dataclasses.dataclass(frozen=True)
class MethodKind:
    """A kind of method (``methods.<m>.kind``), declared once: its config and checks, the stages that train
    it, what its sampling reads, and the module of ``dcm.methods`` that implements it (its schedule, its
    velocity functions and what each training stage hands the loop).  The stage table, the sample stage
    and the reports read this declaration; nothing branches on the kind's name."""

    name: str
    module: str  # dcm.methods.<module>
    # its own sections of methods.<m>: the section's type, filled with defaults when omitted, or None when
    # the section is required (unless the method samples another's weights: checkpoint_from)
    sections: dict[str, type | None] = dataclasses.field(default_factory=dict)
    experts: tuple[str, ...] = ("student",)  # the expert names a sampling schedule may give its steps
    samplers: tuple[str, ...] = ("euler",)  # methods.<m>.sampler values it supports
    trains: tuple[str, ...] = ()  # the stages that train it, in order (none: it samples the teacher)
    weights: tuple[str, ...] = ()  # sub-folders of checkpoints/<m> its sampling reads (none: the folder)
    # the batch source it trains on whatever training.source says (None: training.source)
    source: Literal["online", "generated"] | None = None
    # whether its training may replace prompts by the empty one (training.prompt_dropout); DMD2 may not: its
    # real score is the teacher guided by the prompt, and an empty prompt's guided score is another target
    prompt_dropout: bool = True
    # what it needs of the shapes world beyond a teacher and its data (MCM: the stills its image discriminator
    # trains on); a real family cannot train it (the pre-flight check says so)
    needs_shapes_world: str | None = None
    check: typing.Callable[[str, MethodConfig, Params], None] | None = None


METHOD_KINDS: dict[str, MethodKind] = {k.name: k for k in (
    MethodKind("teacher", "teacher", experts=("teacher",), check=_check_teacher),
    MethodKind("consistency", "consistency", samplers=("euler", "lcm"), trains=("train_baseline",),
               check=_check_consistency),
    MethodKind("dcm", "dual_expert", sections={"seme": None, "dete": None}, experts=("seme", "dete"),
               trains=("train_seme", "train_dete"), weights=("seme", "dete"), check=_check_dcm),
    MethodKind("mcm", "mcm", sections={"mcm": McmConfig}, samplers=("euler", "lcm"),
               trains=("train_baseline",),
               source="online", needs_shapes_world="high-quality stills (its image discriminator's real set)",
               check=_check_mcm),
    MethodKind("dmd2", "dmd2", sections={"dmd2": Dmd2Config}, samplers=("lcm",), trains=("train_baseline",),
               source="generated", prompt_dropout=False, check=_check_dmd2),
)}
METHOD_SECTIONS = tuple(dict.fromkeys(s for k in METHOD_KINDS.values() for s in k.sections))
KIND_NAMES = tuple(METHOD_KINDS)


@dataclass(config=SECTION)
class MethodConfig:
    """One row of the comparison: how it is trained (if at all) and sampled."""

    kind: Literal[KIND_NAMES]
    sample_steps: Int = at_least(1)
    # the row's name in tables, figures and claims beside its key (e.g. "DMD2 (no GAN)": a row that departs
    # from its method's recipe says so wherever it is shown); null: the key alone
    label: Str | None = None
    train_steps: Int = at_least(0, 0)  # consistency methods: optimisation steps
    lr: Float = positive(1e-4)
    phases: Int = at_least(1, 1)  # consistency: 1 = LCM, K = PCM
    target: Literal["online", "ema"] = "online"
    seme: SemeConfig | None = None
    dete: DeteConfig | None = None
    mcm: McmConfig | None = None  # kind mcm (defaults when omitted)
    dmd2: Dmd2Config | None = None  # kind dmd2 (defaults when omitted)
    checkpoint_from: Str | None = None  # reuse another method's trained weights (e.g. dcm8 from dcm)
    # dcm sampling: each expert as a plain transformer (DetE's LoRA merged into a copy: 2x weights in
    # memory, no adapter toggling per forward); false: the routed SemE+DetE wrapper (one set of weights)
    merge_experts: Bool = True
    # explicit sampling schedule: [t, expert] per step, t = teacher timestep (1000·σ) strictly decreasing,
    # the last step goes to 0; null: derived from the grid (and κ for dcm)
    schedule: list[tuple[Float, Str]] | None = None
    # euler: deterministic Euler through the steps (PCM, DCM, the teacher); lcm: LCM's multistep sampler
    # (predict x0, re-noise to the next σ with fresh noise; consistency and mcm kinds; required for dmd2)
    sampler: Literal["euler", "lcm"] = "euler"
    # share of this row's training prompts replaced by the empty prompt; null: training.prompt_dropout (for
    # a kind that drops prompts; dmd2 rows keep every prompt)
    prompt_dropout: Float | None = between(0, 1, None, exclusive_max=True)
    ablation: Bool = False  # opt-in rows: not part of the default DAG
    # opt-in rows of the quality-against-NFE curves (`make paper`): outside the default DAG and, unlike
    # `ablation`, outside the ablation report (a step count of a method is not an ablation of it)
    nfe_curve: Bool = False
    # both set by the loader on the rows `paper.seeds` adds, never by hand: <row>_s<k> is <row> with
    # train_seed k, added to `seed` in its training stages (data order, noise draws, head init); evaluation
    # rows and sampling noise are shared by every row whatever the training seed
    train_seed: Int = at_least(0, 0)
    replicate_of: Str | None = None

    def __post_init__(self) -> None:
        # the kind's optional sections with their defaults (what an omitted `mcm:` or `dmd2:` means)
        for section, default in METHOD_KINDS[self.kind].sections.items():
            if getattr(self, section) is None and default is not None:
                setattr(self, section, default())


@dataclass(config=SECTION)
class PaperConfig:
    """`make paper` (report_paper): which rows its claims need and how many training runs each gets."""

    # training seeds per row of `rows`, its own included: seeds k = 1 … seeds−1 add rows <row>_s<k>
    # (the row trained with seed + k, sampled and evaluated like it), pooled by the report's hierarchical
    # bootstrap
    seeds: Int = at_least(1, 1)
    # the rows the paper report compares besides the default DAG's (its claims' ablation rows) and whose
    # training seeds it pools; the NFE-curve rows come in through their own flag (methods.<m>.nfe_curve)
    rows: list[Str] = Field(default_factory=list)
    # teachers the claims pool, the main one included: k = 1 … teachers−1 train another teacher with seed + k
    # (stage `teachers`, in teachers/s<k>/: the claims' rows distilled from it with the main seeds, sampled
    # and scored on the same evaluation rows); the claims then pool over teachers (verdicts.
    # teacher_pooled_difference).  The shapes world only: a real teacher is given, not trained
    teachers: Int = at_least(1, 1)


@dataclass(config=SECTION)
class VBenchConfig:
    """The real VBench backend (dcm.evaluation.vbench): its own venv, weights from a local directory."""

    venv: Str = ".venv-vbench"  # created by `dcm vbench setup`
    weights_dir: Str | None = None  # VBench's VBENCH_CACHE_DIR layout; nothing is downloaded
    mode: Literal["custom_input", "standard"] = "custom_input"  # standard = the 946-prompt suite
    # standard mode: the evaluation rows are VBench's own prompts (read from the venv's vbench package),
    # 5 videos each; subset N: N prompts balanced over the dimensions (reports mark the run a subset)
    subset: Int | None = at_least(1, None)
    dimensions: list[Str] = Field(default_factory=list)  # empty: every dimension the mode supports
    ngpus: Int = at_least(1, 1)


@dataclass(config=SECTION)
class EvaluationConfig:
    backend: Literal["shapes-bench", "vbench"] = "shapes-bench"
    bootstrap: Int = at_least(10, 1000)
    latency_repeats: Int = at_least(1, 3)
    vbench: VBenchConfig = Field(default_factory=VBenchConfig)
    # real families: the evaluation prompts (a local file: one a line, or .jsonl / .csv with a `prompt`
    # column), each sampled videos_per_prompt times with seeds no training row uses; the shapes world: null
    prompts: Str | None = None
    videos_per_prompt: Int = at_least(1, 5)  # VBench's protocol samples 5 videos per prompt


@dataclass(config=SECTION)
class AnalysisConfig:
    """The ``analyze`` stage: whole-range students (one model each over the whole range), probed per grid
    index."""

    train_steps: Int = at_least(1, 150)
    lr: Float = positive(1e-4)
    target: Literal["online", "ema"] = "online"
    probe_batch: Int = at_least(1, 8)  # trajectories per grid index for loss / grad norm
    # whole-range students (training seeds seed + k) whose geometric-mean curves propose κ; each alone gives
    # the proposal's spread over training seeds
    seeds: Int = at_least(1, 3)


@dataclass(config=SECTION)
class PipelineConfig:
    """What dvc.yaml and the Snakefile hold beyond the default experiment.  Both groups are off by default,
    so a bare ``dvc repro`` builds the default experiment only; ``dcm params --enable <group> -o
    params.yaml`` switches one on and rewrites dvc.yaml (``make ablations``, ``make paper`` do)."""

    # the ablation rows (methods.<m>.ablation) and report_ablations
    ablations: Bool = False
    # the paper report's rows (methods.<m>.nfe_curve, paper.rows and their paper.seeds training seeds),
    # mcm_setting and report_paper
    paper: Bool = False


PIPELINE_GROUPS = tuple(f.name for f in dataclasses.fields(PipelineConfig))  # the opt-in groups


@dataclass(config=SECTION)
class DistributedConfig:
    """The process group of a multi-rank stage (``dcm.distributed.process_group``)."""

    # how long a rank waits in one collective before the job fails (NCCL's own default is 10 min): the other
    # ranks wait at a barrier while rank 0 writes a checkpoint or the final weights
    timeout_min: Float = positive(60.0)


@dataclass(config=SECTION)
class TrackingConfig:
    uri: Str = "sqlite:///mlflow.db"
    experiment: Str = "dcm"


@functools.lru_cache(maxsize=8)
def _teacher_grid(steps: int, shift: float, num_train_timesteps: int) -> schedule.TeacherGrid:
    return schedule.teacher_grid(steps, shift, num_train_timesteps)


@dataclass(config=SECTION, kw_only=True)  # keyword-only: required sections follow the ranged seed
class Params:
    """The whole experiment: one ``params.yaml`` (optionally with a preset overlay)."""

    experiment: Str
    seed: Int = at_least(0)
    backbone: BackboneConfig
    world: WorldConfig
    grid: GridConfig
    teacher: TeacherConfig
    trajectories: TrajectoryConfig
    training: TrainingConfig
    methods: dict[Str, MethodConfig] = Field(min_length=1)
    evaluation: EvaluationConfig
    launcher: Literal["local", "slurm", "debug"] = "local"
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    paper: PaperConfig = Field(default_factory=PaperConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    data: DataConfig = Field(default_factory=DataConfig)  # the real families' prompts and videos

    @field_validator("methods", mode="before")
    @classmethod
    def _method_names_are_strings(cls, value: Any) -> Any:
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value

    def method(self, name: str) -> MethodConfig:
        if name not in self.methods:
            raise ConfigError("methods", name, f"one of {sorted(self.methods)}")
        return self.methods[name]

    @property
    def default_methods(self) -> list[str]:
        return [m for m, c in self.methods.items() if not (c.ablation or c.nfe_curve or c.replicate_of)]

    def params_row(self, name: str) -> str:
        """The params.yaml row that defines ``name``: a replicate row's own row (DVC tracks that key)."""
        return self.method(name).replicate_of or name

    def replicates(self, name: str) -> list[str]:
        """``name`` and the rows `paper.seeds` added for it (its other training seeds), in seed order."""
        return [name, *(m for m, c in self.methods.items() if c.replicate_of == name)]

    def training_seed(self, name: str) -> int:
        """The seed a training stage of row ``name`` runs with: ``seed`` + ``methods.<name>.train_seed``."""
        return self.seed + self.method(name).train_seed

    def prompt_dropout(self, name: str, expert: str | None = None) -> float:
        """The share of row ``name``'s (or its ``expert``'s: seme, dete) training prompts replaced by the
        empty prompt: its own ``prompt_dropout``, else ``training.prompt_dropout``; 0 for a kind that keeps
        every prompt (dmd2)."""
        m = self.method(name)
        if not METHOD_KINDS[m.kind].prompt_dropout:
            return 0.0
        own = getattr(m, expert).prompt_dropout if expert else m.prompt_dropout
        return self.training.prompt_dropout if own is None else own

    def with_seed(self, seed: int) -> Params:
        """These params with ``seed`` replaced (another training run of the same settings); ``self`` when
        equal."""
        if seed == self.seed:
            return self
        out = copy.copy(self)
        out.seed = seed
        return out

    def teacher_grid(self) -> schedule.TeacherGrid:
        """The teacher grid of ``grid`` (steps, shift, num_train_timesteps), computed once per setting."""
        g = self.grid
        return _teacher_grid(g.steps, g.shift, g.num_train_timesteps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PARAMS = TypeAdapter(Params)


# ------------------------------------------------------------------- pydantic errors as ConfigError


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        if typing.get_origin(inner) is tuple:
            return "a list of [t, expert] pairs"
        return f"a list of {_type_name(inner)}"
    if origin is tuple:
        return PAIR
    if origin is dict:
        return f"a mapping of names to {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


PAIR = "a [t, expert] pair: t a finite number, expert a name"


def _non_null(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


@dataclasses.dataclass
class _Where:
    """What a pydantic error location points at: key path, annotation, and the section field it belongs to."""

    key: str = ""
    tp: Any = Params
    owner: type | None = None  # the section (dataclass) and field name, when the location is a field
    name: str | None = None
    depth: int = 0  # how many location parts the key covers (a [t, expert] pair's members are not split)


def _locate(loc: tuple) -> _Where:
    w = _Where()
    for part in loc:
        tp = _non_null(w.tp)
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            w.owner, w.name = tp, str(part)
            w.key = f"{w.key}.{part}" if w.key else str(part)
            w.tp = typing.get_type_hints(tp).get(str(part))
        elif origin is dict and part != "[key]":
            w.owner = w.name = None
            w.key, w.tp = f"{w.key}.{part}", typing.get_args(tp)[1]
        elif origin is list and isinstance(part, int):
            w.owner = w.name = None
            w.key, w.tp = f"{w.key}[{part}]", typing.get_args(tp)[0]
        else:  # a pair's member, or a mapping's key: report the whole item
            break
        w.depth += 1
    return w


def _item(raw: Any, loc: tuple) -> Any:
    for part in loc:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return None
    return raw


def _bounds(owner: type | None, name: str | None) -> dict:
    """The field's range constraints: {'>=': 0, '<': 1, …}."""
    if owner is None or name not in getattr(owner, "__pydantic_fields__", {}):
        return {}
    out = {}
    for meta in owner.__pydantic_fields__[name].metadata:
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(meta, attr, None) is not None:
                out[op] = getattr(meta, attr)
    return out


def _range_text(bounds: dict, first: str | None = None) -> str:
    """'>= 0 and < 1'; ``first``: '<' or '>' puts the violated side first."""
    lower = [f"{op} {v}" for op, v in bounds.items() if op.startswith(">")]
    upper = [f"{op} {v}" for op, v in bounds.items() if op.startswith("<")]
    return " and ".join(upper + lower if first == "<" else lower + upper)


def _unknown_key(w: _Where) -> str:
    allowed = f"allowed keys here: {', '.join(f.name for f in dataclasses.fields(w.owner))}"
    for this, other, label, section in ((SemeConfig, DeteConfig, "SemE", "dete"),
                                        (DeteConfig, SemeConfig, "DetE", "seme")):
        if w.owner is this and w.name in {f.name for f in dataclasses.fields(other)}:
            there = f"{w.key.rsplit('.', 2)[0]}.{section}.{w.name}"
            expert = "DetE" if section == "dete" else "SemE"
            return f"a {expert} key, not a {label} one (set {there}); {allowed}"
    return f"unknown key; {allowed}"


def _translate(exc: ValidationError, raw: Any) -> ConfigError:
    errors = exc.errors(include_url=False)
    unknown = [e for e in errors if e["type"] in ("unexpected_keyword_argument", "extra_forbidden")]
    err = (unknown or errors)[0]
    kind, loc = err["type"], tuple(err["loc"])
    w = _locate(loc)
    key = w.key or "<top level>"
    value = err.get("input")
    if w.depth < len(loc):  # inside a [t, expert] pair: name the pair
        value = _item(raw, loc[: w.depth])
        if isinstance(value, tuple):
            value = list(value)
        return ConfigError(key, value, PAIR)
    tp = _non_null(w.tp)
    if typing.get_origin(tp) is tuple:
        return ConfigError(key, value, PAIR)
    bounds = _bounds(w.owner, w.name)
    if kind in ("unexpected_keyword_argument", "extra_forbidden") and w.owner is not None:
        return ConfigError(key, value, _unknown_key(w))
    if kind == "missing":
        return ConfigError(key, None, f"missing required key ({_type_name(w.tp)})")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return ConfigError(key, value,
                           f"must be {_range_text(bounds, '<' if kind.startswith('less') else '>')}")
    if kind == "finite_number":
        return ConfigError(key, value, " ".join(["a finite number", _range_text(bounds)]).strip())
    if kind.startswith(("int_", "float_", "bool_", "string_")) or kind == "literal_error":
        return ConfigError(key, value, " ".join([_type_name(tp), _range_text(bounds)]).strip())
    if kind == "too_short" and typing.get_origin(tp) is dict:
        return ConfigError(key, value, f"{_type_name(tp)} (at least one)")
    if kind in ("dict_type", "dataclass_type", "model_type", "list_type", "tuple_type"):
        return ConfigError(key, value,
                           _type_name(tp) + (" (at least one)" if typing.get_origin(tp) is dict else ""))
    return ConfigError(key, value, err["msg"])


# ------------------------------------------------------------------------ cross-field validation


def _check_schedule(key: str, m: MethodConfig, g: GridConfig) -> None:
    if m.schedule is None:
        return
    pairs = [list(p) for p in m.schedule]
    if len(pairs) != m.sample_steps:
        raise ConfigError(f"{key}.schedule", pairs, f"{m.sample_steps} [t, expert] pairs, one per sampling "
                          f"step ({key}.sample_steps = {m.sample_steps})")
    experts = METHOD_KINDS[m.kind].experts
    for i, (t, expert) in enumerate(pairs):
        where = f"{key}.schedule[{i}]"
        if not 0 < t <= g.num_train_timesteps:
            raise ConfigError(where, pairs[i], "t (a teacher timestep) must be > 0 and <= "
                              f"grid.num_train_timesteps ({g.num_train_timesteps})")
        if expert not in experts:
            raise ConfigError(where, pairs[i], f"the expert must be {' or '.join(map(repr, experts))} for a "
                              f"{m.kind} method")
        if i and t >= pairs[i - 1][0]:
            raise ConfigError(where, pairs[i],
                              f"t must decrease strictly: < {pairs[i - 1][0]} (the step before)")
        if i and experts.index(expert) < experts.index(pairs[i - 1][1]):
            raise ConfigError(where, pairs[i],
                              f"every {expert} step comes before every {pairs[i - 1][1]} step "
                              f"(the experts take the steps in the order {list(experts)}, from high noise)")
    if {e for _, e in pairs} != set(experts):
        raise ConfigError(f"{key}.schedule", pairs, f"at least one {' and one '.join(experts)} step")


def _check_attention_backend(bb: BackboneConfig) -> None:
    """The attention kernels a family's attention processors can use (dcm.backbones.kernels)."""
    key, backend = "backbone.attention_backend", bb.attention_backend
    if bb.family == "cogvideox" and backend != "native":
        raise ConfigError(key, backend, "'native' for family 'cogvideox': its attention processor calls "
                                        "PyTorch's SDPA itself (which picks flash, efficient or cuDNN)")
    if bb.family == "hunyuan15" and backend not in SQUARE_MASK_ATTENTION:
        raise ConfigError(key, backend, f"one of {list(SQUARE_MASK_ATTENTION)} for family 'hunyuan15': its "
                                        "attention processor passes a (B, 1, S, S) query-and-key mask, which "
                                        "only SDPA's mask-taking kernels take (the flash-attn packages' are "
                                        "maskless or read key lengths)")
    if bb.family == "hunyuan" and backend in MASKLESS_ATTENTION:
        takes_mask = [b for b in ATTENTION_BACKENDS if b not in MASKLESS_ATTENTION]
        raise ConfigError(key, backend, f"one that takes HunyuanVideo's text mask: {takes_mask} "
                                        "(flash_varlen, _flash_varlen_3: flash-attn's kernels with the mask "
                                        "as key lengths)")


def folder_vae_config(path: str | os.PathLike | None) -> dict:
    """The pipeline folder's vae/config.json ({} where there is none): the VAE's latent channels (z_dim) and
    compression (the Wan VAEs' scale_factor_spatial / _temporal), read without loading it."""
    file = Path(os.path.expanduser(str(path or ""))) / "vae" / "config.json"
    return json.loads(file.read_text()) if path and file.is_file() else {}


def vae_spatial_compression(family: str, path: str | os.PathLike | None) -> int:
    """The VAE's spatial compression: the folder's config (the Wan VAEs' ``scale_factor_spatial``, the
    HunyuanVideo VAEs' ``spatial_compression_ratio``; CogVideoX's names neither: one ÷2 per down block
    after the first, 2^(len(block_out_channels) − 1), as its pipeline computes it), else the family's
    released VAE (16 for HunyuanVideo 1.5's, 8 for the others)."""
    cfg = folder_vae_config(path)
    ratio = cfg.get("scale_factor_spatial") or cfg.get("spatial_compression_ratio")
    if not ratio and family == "cogvideox" and cfg.get("block_out_channels"):
        ratio = 2 ** (len(cfg["block_out_channels"]) - 1)
    return int(ratio or (16 if family == "hunyuan15" else 8))


def folder_transformer_config(path: str | os.PathLike | None) -> dict:
    """The pipeline folder's transformer/config.json ({} where there is none), read without loading it."""
    file = Path(os.path.expanduser(str(path or ""))) / "transformer" / "config.json"
    return json.loads(file.read_text()) if path and file.is_file() else {}


def transformer_patch(family: str, path: str | os.PathLike | None) -> tuple[int, int, int]:
    """The transformer's (t, h, w) patch from its config: Wan's ``patch_size`` tuple, else ``patch_size_t``
    (absent: 1) and the int ``patch_size`` (absent: the family's, 1 for HunyuanVideo 1.5, else 2)."""
    cfg = folder_transformer_config(path)
    patch = cfg.get("patch_size")
    if isinstance(patch, (list, tuple)):
        return tuple(int(p) for p in patch)
    spatial = int(patch or (1 if family == "hunyuan15" else 2))
    return int(cfg.get("patch_size_t") or 1), spatial, spatial


def spatial_patch(family: str, path: str | os.PathLike | None) -> int:
    """The transformer's spatial patch (``transformer_patch``'s h)."""
    return transformer_patch(family, path)[1]


def token_pixels(family: str, path: str | os.PathLike | None) -> int:
    """Pixels per token side: the VAE's spatial compression × the transformer's spatial patch.  Frame
    heights and widths must be multiples of it."""
    return vae_spatial_compression(family, path) * spatial_patch(family, path)


def _check_backbone(params: Params) -> None:
    bb = params.backbone
    _check_attention_backend(bb)
    if bb.family == "toy":
        if bb.toy is None:
            raise ConfigError("backbone.toy", None, "required when backbone.family is 'toy'")
        unit = bb.toy.codec_factor * bb.toy.patch_size[-1]
        if params.world.size % unit:
            raise ConfigError("world.size", params.world.size,
                              f"must be a multiple of codec_factor·patch ({unit}) for the toy backbone")
        if len(bb.toy.patch_size) != 3 or min(bb.toy.patch_size) < 1:
            raise ConfigError("backbone.toy.patch_size", bb.toy.patch_size,
                              "three positive integers (t, h, w)")
        if params.world.frames % bb.toy.patch_size[0]:
            raise ConfigError("world.frames", params.world.frames, "must be a multiple of "
                              f"backbone.toy.patch_size[0] ({bb.toy.patch_size[0]}) for the toy backbone")
        return
    if not bb.path:
        raise ConfigError("backbone.path", bb.path,
                          f"a local diffusers folder is required for family '{bb.family}'")
    if not Path(os.path.expanduser(bb.path)).is_dir():
        raise ConfigError("backbone.path", bb.path, "an existing local directory with the pipeline's weights")
    if bb.real is None:
        raise ConfigError("backbone.real", None, f"required when backbone.family is {bb.family!r} "
                          "(height, width, frames of the videos)")
    if bb.real.frames % 4 != 1:
        raise ConfigError("backbone.real.frames", bb.real.frames, "4k+1 frames (the VAEs compress time 4x)")
    spatial, patch = vae_spatial_compression(bb.family, bb.path), spatial_patch(bb.family, bb.path)
    for key in ("height", "width"):  # multiples of token_pixels, each config read once
        if getattr(bb.real, key) % (spatial * patch):
            raise ConfigError(f"backbone.real.{key}", getattr(bb.real, key),
                              f"a multiple of {spatial * patch} (VAE {spatial}x, patch {patch})")


def _check_method(name: str, m: MethodConfig, params: Params) -> None:
    """One row of ``methods``: what every row needs, then its kind's own checks (``MethodKind.check``)."""
    key, kind = f"methods.{name}", METHOD_KINDS[m.kind]
    if m.checkpoint_from is not None and m.checkpoint_from not in params.methods:
        raise ConfigError(f"{key}.checkpoint_from", m.checkpoint_from, f"one of {sorted(params.methods)}")
    for field, unset in (("replicate_of", None), ("train_seed", 0)):
        if getattr(m, field) != unset:
            raise ConfigError(f"{key}.{field}", getattr(m, field), "unset: the loader sets it on the rows "
                              "paper.seeds adds (<row>_s<k>); more training seeds of a row: paper.seeds")
    if m.ablation and m.nfe_curve:
        raise ConfigError(f"{key}.nfe_curve", m.nfe_curve, f"false when {key}.ablation is true (a row is "
                          "in one opt-in group: the ablation report's or the NFE curves')")
    for section in METHOD_SECTIONS:
        value = getattr(m, section)
        if value is not None and section not in kind.sections:
            owners = [k.name for k in METHOD_KINDS.values() if section in k.sections]
            raise ConfigError(f"{key}.{section}", dataclasses.asdict(value),
                              f"only for kind {' or '.join(map(repr, owners))} (this method is kind "
                              f"{m.kind!r})")
        if value is None and section in kind.sections and m.checkpoint_from is None:
            raise ConfigError(f"{key}.{section}", None, f"required for a {m.kind} method")
    if m.sampler not in kind.samplers:
        users = [k.name for k in METHOD_KINDS.values() if m.sampler in k.samplers]
        raise ConfigError(f"{key}.sampler", m.sampler, f"{' or '.join(map(repr, kind.samplers))} for kind "
                          f"{m.kind!r} ({m.sampler}: {', '.join(users)} only)")
    if m.prompt_dropout and not kind.prompt_dropout:
        raise ConfigError(f"{key}.prompt_dropout", m.prompt_dropout,
                          f"0 or null for kind {m.kind!r}: its training keeps every prompt")
    experts = [e for e in kind.experts if e in kind.sections]  # dcm: seme, dete
    if m.prompt_dropout is not None and experts:
        per_expert = ", ".join(f"{key}.{e}.prompt_dropout" for e in experts)
        raise ConfigError(f"{key}.prompt_dropout", m.prompt_dropout, f"null for kind {m.kind!r}: set it per "
                          f"expert ({per_expert}), the sections its training stages track")
    if kind.check is not None:
        kind.check(key, m, params)
    _check_schedule(key, m, params.grid)


def check_teachers(params: Params) -> None:
    """``paper.teachers`` > 1 trains more teachers: the shapes world with the toy backbone only."""
    if params.paper.teachers > 1 and (params.world.name != "shapes" or params.backbone.family != "toy"):
        raise ConfigError("paper.teachers", params.paper.teachers, "1 unless the shapes world with the toy "
                          "backbone: a real teacher is given, not trained")


def _check_paper(params: Params) -> None:
    """``paper.rows``: trained rows, each once, with the rows whose weights they sample; the names
    ``<row>_s<k>`` free for the training seeds ``paper.seeds`` adds."""
    p = params.paper
    for i, row in enumerate(p.rows):
        key = f"paper.rows[{i}]"
        if row not in params.methods:
            raise ConfigError(key, row, f"one of {sorted(params.methods)}")
        m = params.methods[row]
        if not METHOD_KINDS[m.kind].trains:
            raise ConfigError(key, row, f"a trained row: a {m.kind} row has no training seed (it samples the "
                              "teacher)")
        if m.checkpoint_from is not None and m.checkpoint_from not in p.rows:
            raise ConfigError(key, row,
                              f"listed together with {m.checkpoint_from!r}, whose weights it samples")
    if len(set(p.rows)) != len(p.rows):
        raise ConfigError("paper.rows", p.rows, "each row once")
    check_teachers(params)
    for k in range(1, p.seeds):
        for row in p.rows:
            if f"{row}_s{k}" in params.methods:
                raise ConfigError(f"methods.{row}_s{k}", f"{row}_s{k}", f"a name of its own: paper.seeds "
                                  f"({p.seeds}) adds {row}_s{k} as {row}'s training seed {k}")


def validate(params: Params) -> None:
    """Checks that need more than one key (κ inside the grid, paths for real backbones, each method's
    kind, …); raises :class:`ConfigError` and changes nothing."""
    g = params.grid
    _check_parallel(params.training.parallel)
    _check_global_batch(params.training)
    if g.num_train_timesteps % g.steps:
        raise ConfigError("grid.steps", g.steps,
                          f"must divide grid.num_train_timesteps ({g.num_train_timesteps})")
    if not 0 <= g.kappa <= g.steps - 2:
        raise ConfigError("grid.kappa", g.kappa,
                          f"must lie inside the teacher grid: 0 <= kappa <= {g.steps - 2}")
    _check_backbone(params)
    _check_data(params)
    for name, m in params.methods.items():
        _check_method(name, m, params)
    _check_paper(params)


def with_replicates(params: Params) -> Params:
    """These params with the rows of `paper.seeds`: for each row r of `paper.rows` and k = 1 … seeds−1,
    ``r_s<k>`` = r at train_seed k (a row that reuses weights, checkpoint_from c, reuses c_s<k>'s)."""
    added = {}
    for k in range(1, params.paper.seeds):
        for row in params.paper.rows:
            m = copy.deepcopy(params.methods[row])
            m.train_seed, m.replicate_of = k, row
            m.checkpoint_from = m.checkpoint_from and f"{m.checkpoint_from}_s{k}"
            added[f"{row}_s{k}"] = m
    if not added:
        return params
    out = copy.copy(params)
    out.methods = {**params.methods, **added}
    return out


# ------------------------------------------------------------------------------- entry points


def deep_merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in overlay.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k),
            dict) else copy.deepcopy(v)
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
        raise ConfigError("params file", str(path),
                          "an existing YAML file (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError("params file", str(path), f"valid YAML ({e})") from None
    if PRESET_ENV in os.environ:  # DVC hashes params.yaml, never the environment: a preset goes in the file
        raise ConfigError(PRESET_ENV, os.environ[PRESET_ENV],
                          "unset: a preset chosen in the environment is invisible to DVC; write it into "
                          "the params file instead: `dcm params --preset <name> -o params.yaml` (it also "
                          "rewrites dvc.yaml), or pass --preset to `dcm run`/`dcm launch` for a one-off run")
    if preset and preset != "shapes":
        raw = deep_merge(raw, preset_overlay(preset))
    return raw


def with_pipeline_switches(text: str, switches: dict[str, bool]) -> str:
    """A params file's text with ``pipeline.<group>`` set for each of ``switches`` and every other byte as
    written (comments, alignment): the value on the group's line under a block ``pipeline:`` is replaced, a
    missing line or section added.  The result is checked to differ from ``text`` in those switches only."""
    import re

    for group in switches:
        if group not in PIPELINE_GROUPS:
            raise ConfigError("pipeline", group, f"one of {list(PIPELINE_GROUPS)}")
    refused = ConfigError("pipeline", switches, "a block mapping in the params file (`pipeline:` on its own "
                          "line, one `<group>: true|false` line per group below it): edit it by hand, then "
                          "regenerate dvc.yaml with `python -m dcm.pipeline.dag`")
    before = yaml.safe_load(text) or {}
    if not isinstance(before, dict):
        raise refused
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"pipeline:\s*(#.*)?$", line)), None)
    if start is None:
        if "pipeline" in before:  # written some other way (a flow mapping)
            raise refused
        lines += ([] if not lines or lines[-1].endswith("\n") else ["\n"]) + ["pipeline:\n"]
        start = len(lines) - 1
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"[^\s#]", lines[i])), len(lines))
    indent = next((re.match(r"\s*", line).group() for line in lines[start + 1:end]
                   if line.strip() and not line.lstrip().startswith("#")), "  ")
    for group, on in switches.items():
        value = "true" if on else "false"
        for i in range(start + 1, end):
            m = re.match(rf"(\s+{group}:\s*)(true|false)([ \t]*)(#.*)?(\n?)$", lines[i])
            if m:  # keep the comment in its column: the padding absorbs the value's change in length
                pad = m.group(3) if not m.group(4) else " " * max(len(m.group(3)) + len(m.group(2))
                                                                 - len(value), 1)
                lines[i] = f"{m.group(1)}{value}{pad}{m.group(4) or ''}{m.group(5)}"
                break
        else:
            lines.insert(start + 1, f"{indent}{group}: {value}\n")
            end += 1
    out = "".join(lines)
    after = yaml.safe_load(out) or {}
    if after.get("pipeline") != {**(before.get("pipeline") or {}), **switches} \
            or {k: v for k, v in after.items() if k != "pipeline"} \
            != {k: v for k, v in before.items() if k != "pipeline"}:
        raise refused
    return out


def parse(raw: dict) -> Params:
    """Validate a raw mapping (``params.yaml`` as loaded) into :class:`Params` (checked by :func:`validate`,
    then the derived rows added: :func:`with_replicates`); raises :class:`ConfigError`."""
    try:
        params = PARAMS.validate_python(raw)
    except ValidationError as e:
        raise _translate(e, raw) from None
    validate(params)
    return with_replicates(params)


def load(path: str | os.PathLike = "params.yaml", preset: str | None = None) -> Params:
    """Load and validate ``params.yaml`` (optionally with a preset overlay: ``smoke``)."""
    return parse(load_raw(path, preset))


# -------------------------------------------------------------------------------- JSON schema


def _tidy(schema: Any) -> Any:
    """pydantic's schema without titles and defaults: Snakemake's ``validate`` would write defaults into its
    config, so the Snakefile sees params.yaml as written (DVC does)."""
    if isinstance(schema, list):
        return [_tidy(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in ("title", "default"):
            continue
        out[k] = {name: _tidy(s) for name, s in v.items()} if k in ("properties", "$defs") else _tidy(v)
    return out


def json_schema() -> dict:
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "dcm params.yaml",
            **_tidy(PARAMS.json_schema())}


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"
