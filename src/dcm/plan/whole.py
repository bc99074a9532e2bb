"""The plan of a whole run before it is queued: for every stage run of the DAG of a params file, its work in
FLOPs and GPU-hours, its wall time on its SLURM row against the row's time limit, its peak memory per GPU
against the row's GPUs, and the bytes it writes.

    dcm plan --dag [--params params.yaml] [--resources slurm/resources-wan.yaml] [--mfu 0.35] [--json]

``dcm launch`` (``launcher: slurm``, a real family) plans the one run it is about to submit the same way and
refuses it, naming the numbers, when the plan says it cannot fit its row (``--no-plan-check`` or
``DCM_NO_PLAN_CHECK=1`` to submit anyway).  Nothing here needs a GPU or weights.

Work, counted on meta tensors: ``torch.utils.flop_counter.FlopCounterMode`` over one forward, and its
backward, of the family's real transformer (``backbone.path``'s ``transformer/config.json`` when the folder
has one, else the released config, ``dcm.plan.memory.CONFIGS``) on one sample at the params' latent size.
Attention goes through SDPA's math kernel so that its two matmuls are counted (4·B·H·S_q·S_k·d forward,
twice that backward: model FLOPs, not a flash kernel's recomputation).  The passes:

    F    one forward                               S_b  its backward, every weight trained
    D_f  DetE's forward (LoRA on SemE + copies)    D_b  its backward, only the adapters and copies trained
    T_b  the frozen teacher's backward to its input only (DetE's GAN/FM pass, DMD2's classifier path)

Per stage run, with g the forwards of one guided teacher step (2 with CFG, 1 with HunyuanVideo's embedded
guidance) and B the samples of one optimizer step (training.batch_size × ranks / context parallel ×
grad_accum, derived from training.global_batch_size where that is set: the loop's global batch):

    trajectories    N × grid.steps × g × F                         (``dcm.data.trajectories.solve``)
    sample[m]       rows × NFE_m × F + rows × one VAE decode (counted on meta too)
    train_seme, train_baseline (LCM, PCM)    steps × B × (F + S_b + F)    student fwd + bwd, target fwd
    train_dete      steps × B × (D_f + D_b + D_f + GAN/FM: F + F + T_b + (disc_steps − 1)·2F
                    [+ D_f with real: ema])
    train_baseline  MCM: the consistency step + mix·F (own x0) + g·F (online teacher step) + the frame
                    discriminator on the teacher, ≈ (2F + T_b)·frames / latent frames (linear in tokens: high)
                    DMD2 (at K steps; benchmarks/gpu_train_step.py's count, in expectation over k):
                    (K−1)/2·F + F + S_b + F + g·F + F + fake_steps·(F + S_b) + (fake_steps − 1)·(K+1)/2·F
                    [+ T_b with the GAN classifier]
    analyze         seeds × (train_steps × B₁ + grid.steps × probe_batch) × (F + S_b + F)  (one rank)
    preprocess      prompts × 2·P_text·text tokens: the text encoders (2 FLOPs per parameter per token,
                    Kaplan et al. 2020), P_text their released size (TEXT_ENCODER_PARAMS), not counted;
                    + clips × one VAE encode (counted on meta) with data.videos
    teacher, prepare, report    no GPU work (a real teacher's folder is checked and recorded)
    evaluate        VBench's own networks: an assumed GPU time per video (``--vbench-s-per-video``)

GPU-hours = FLOPs / (MFU × peak).  The MFU is model FLOPs over time, as ``benchmarks/gpu_train_step.py``
measures it: activation checkpointing's recomputation is not counted, so it lowers the MFU a run reaches
(that benchmark: about 0.31 for Wan 1.3B SemE on an H200).  Wall time: the GPU-hours over the ranks that
work: a training stage's all of them, an inference stage's as many as there are shards (trajectories) or
batches of ``SAMPLE_BATCH`` rows (sample), whole shards or batches each; a rank-0 stage's one.  A run fits
its row's time when its wall time is at most ``time_min``, or, for a resumable stage (it resumes from its own
shards or checkpoints), at most ``time_min`` × (1 + the timeouts submitit requeues a job after).

Memory per GPU, GiB, against the row's GPU less ``--reserve-gb`` (CUDA context, NCCL, allocator slack):
the training stages' from ``dcm.plan.memory.plan`` at the params' ``training.parallel`` over the row's ranks
(the LCM / MCM rows with their EMA target; MCM's motion head and frame discriminator not counted); analyze
the larger of its training (one rank, nothing sharded) and its fp32 probe at ``analysis.probe_batch``; the
inference stages the transformers they hold in fp32 as ``dcm.backbones.real`` loads them (sample: the
teacher beside the students; DCM's merged experts at load: the teacher, the loaded dual expert, SemE's and
DetE's copies), the VAE, and the larger of the transformer's activations without grad at the batch (bf16,
as autocast computes, attention as a fused kernel holds it) and one VAE decode, both measured on meta by
the live tensor bytes.  The text encoders' weights (and the VAE) for ``preprocess``; VBench's networks are
not planned.

Disk written: the trajectory store (``bytes_per_trajectory`` × N), each training stage's export and resume
state (``dcm.plan.memory.disk``), the samples' latents (fp32) and decoded videos (fp16; the mp4s, a few MB
each, not counted), preprocess's prompt embeddings (and video latents, fp32), analyze's students' resume
states.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dcm.config import METHOD_KINDS, SHARDED, ConfigError, Params, folder_vae_config
from dcm.plan import memory

GiB = memory.GiB
# bf16 dense peak (TFLOP/s) and memory (GiB, as nvidia-smi reports it) of the GPU types a row's gpu_type may
# name (NVIDIA's datasheets: A100 SXM 80GB 312 TFLOP/s; H100 SXM 989; H200 989 at 141 GB)
GPUS = {"a100": (312.0, 80.0), "h100": (989.0, 80.0), "h200": (989.0, 140.0)}
SAMPLE_BATCH = 8  # dcm.methods.BATCH: rows per sampler call (dcm.plan sits beside dcm.methods)
# VBench's standard suite (VBench_full_info.json): 946 prompts, 5 videos each
VBENCH_SUITE_PROMPTS = 946
VBENCH_SUITE_VIDEOS = 5
# the released text encoders, parameters: Wan 2.1's umT5-XXL encoder (its 11.4 GB bf16 checkpoint);
# HunyuanVideo's LLaVA-Llama-3-8B language model without its head (7.5 B) + CLIP-L's text tower (0.12 B);
# CogVideoX's T5-v1.1-XXL encoder; HunyuanVideo 1.5's Qwen2.5-VL-7B language model without its head and
# vision tower (7.07 B: 28 layers of Qwen2.5-7B + its 152k × 3584 embedding) + ByT5-small's encoder (0.22 B)
TEXT_ENCODER_PARAMS = {"wan": 5.7e9, "hunyuan": 7.62e9, "hunyuan15": 7.29e9, "cogvideox": 4.76e9}
INFERENCE_WEIGHT_BYTES = 4  # dcm.backbones.real loads the transformer in fp32; autocast computes in bf16
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NOT_PLANNED = ("mcm_setting",)  # the shapes world's own pipeline (the mcm preset), never a real family's


# ----------------------------------------------------------------------------- what is planned

@dataclass(frozen=True)
class Row:
    """A stage's SLURM row as the plan reads it (``dcm.pipeline.dag.Resources``)."""

    source: str  # "<resources file>:<stage>", the key path messages name
    gpus: int  # per node
    nodes: int
    ranks: int  # torch.distributed ranks in all: nodes × tasks per node
    gpu_type: str
    time_min: int

    @property
    def total_gpus(self) -> int:
        return self.gpus * self.nodes


@dataclass(frozen=True)
class StageRun:
    """One run of the DAG (a stage, for one method where it runs per method) on its row."""

    stage: str
    method: str | None
    row: Row
    data_parallel: bool  # the stage's work is spread over its ranks (else rank 0 works alone)
    resumable: bool  # it resumes from its own shards / checkpoints after a requeue
    requeues: int = 0  # timeouts a job is requeued after

    @property
    def label(self) -> str:
        return f"{self.stage}[{self.method}]" if self.method else self.stage


@dataclass
class Options:
    mfu: float = 0.35
    peak_tflops: float | None = None  # None: the row's GPU type's (GPUS)
    gpu_mem_gb: float | None = None  # None: the row's GPU type's
    reserve_gb: float = 2.0
    vbench_s_per_video: float = 30.0
    eval_prompts: int | None = None  # None: from the params (evaluation.prompts, VBench's standard suite)
    variant: str | None = None  # a released config instead of the folder's (memory.VARIANTS)


@dataclass
class StagePlan:
    label: str
    stage: str
    method: str | None
    gpus: int  # the row's GPUs
    working: int  # the ranks that do the work
    flops: float
    gpu_hours: float  # the work at the MFU (or assumed), on one GPU
    wall_h: float
    limit_h: float
    jobs: int  # jobs of time_min it takes (1 + requeues after a timeout)
    fits_time: bool
    peak_bytes: int | None = None  # None: not planned
    usable_bytes: int | None = None
    disk_bytes: int = 0
    memory_parts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # why it cannot run on its row at all

    @property
    def fits_memory(self) -> bool | None:
        if self.peak_bytes is None or self.usable_bytes is None:
            return None
        return self.peak_bytes <= self.usable_bytes

    @property
    def fits(self) -> bool:
        return self.error is None and self.fits_time and self.fits_memory is not False


@dataclass
class _Estimate:
    """What one stage estimator finds; the planner turns it into hours and verdicts."""

    flops: float = 0.0
    assumed_gpu_s: float = 0.0  # work given as GPU time instead of FLOPs (VBench)
    units: int | None = None  # whole pieces the work splits into over the ranks (shards, batches)
    working: int | None = None  # ranks that work (default: all for a data-parallel stage, else one)
    peak_bytes: int | None = None
    memory_parts: dict[str, int] = field(default_factory=dict)
    disk_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    error: str | None = None


# ----------------------------------------------------------------------------- counted on meta

@dataclass(frozen=True)
class PassFlops:
    """FLOPs of the transformer's passes on one sample (module docstring: F, S_b, D_f, D_b, T_b)."""

    forward: float
    seme_backward: float
    dete_forward: float
    dete_backward: float
    teacher_backward: float


def pass_flops(work: memory.Workload, role: str) -> tuple[int, int]:
    """(forward, backward) FLOPs of one sample through the transformer as ``role`` runs it (``seme``: every
    weight trains; ``dete``: the LoRA-wrapped SemE, only its adapters and copied layers train; ``teacher``:
    frozen, the gradient to its input only), counted by ``FlopCounterMode`` on meta tensors, attention by
    SDPA's math kernel (its matmuls counted)."""
    one = dataclasses.replace(work, batch=1)
    model = memory.build(one)
    inputs = memory.model_inputs(one, torch.float32)
    dual = memory.make_dete_meta(model, one) if role == "dete" else None
    if role == "teacher":
        model.requires_grad_(False)
        inputs["hidden_states"].requires_grad_(True)

    def run():
        return (dual.run_expert("dete", **inputs) if dual is not None
                else model(**inputs, return_dict=False)[0])

    return counted(run)


def counted(run: Callable[[], torch.Tensor], backward: bool = True) -> tuple[int, int]:
    """(forward, backward) FLOPs of ``run()`` and of the backward of its output's sum, by
    ``FlopCounterMode`` with SDPA on its math kernel (on meta and CPU tensors alike)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel([SDPBackend.MATH]), counter:
        out = run()
        forward = counter.get_total_flops()
        if backward:
            out.float().sum().backward()
    return forward, counter.get_total_flops() - forward


class _LiveBytes:
    """The peak of the live tensor storage bytes made inside it (meta tensors included): each op's outputs
    are held by weak reference to their storage and dropped once freed."""

    def __init__(self):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for key, (ref, nbytes) in list(tracker.live.items()):
                    if ref.expired():
                        del tracker.live[key]
                        tracker.current -= nbytes
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        storage = t.untyped_storage()
                        ref = StorageWeakRef(storage)
                        if ref.cdata not in tracker.live:
                            tracker.live[ref.cdata] = (ref, storage.nbytes())
                            tracker.current += storage.nbytes()
                tracker.peak = max(tracker.peak, tracker.current)
                return out

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def inference_activation_bytes(work: memory.Workload, batch: int) -> int:
    """Peak bytes of one transformer forward without grad at ``batch`` on meta, in bf16 (autocast's compute
    dtype), the inputs included, attention held as a fused kernel holds it (q, k, v, out)."""
    b = dataclasses.replace(work, batch=batch)
    model = memory.build(b, torch.bfloat16)
    inputs = memory.model_inputs(b, torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))
    with torch.no_grad(), memory.fused_attention_accounting(), _LiveBytes() as live:
        model(**inputs, return_dict=False)
    return held + live.peak


def vae_pass(family: str, latent: tuple[int, int, int, int], dtype: str, tiling: bool,
             frames_hw: tuple[int, int, int], encode: bool = False,
             vae_config: dict | None = None) -> tuple[int, int]:
    """(FLOPs, peak live bytes, its input included) of decoding one video's latents, or with ``encode``
    encoding its frames (``frames_hw``: frames, height, width), with the family's released VAE on meta
    (``vae_config``: another one, Wan 2.2's)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = memory.vae_class(family)(**(vae_config or {})).to(DTYPES[dtype]).eval()
    if tiling:
        vae.enable_tiling()
    x = torch.empty(1, 3, *frames_hw, device="meta", dtype=DTYPES[dtype]) if encode else \
        torch.empty(1, *latent, device="meta", dtype=DTYPES[dtype])
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, _LiveBytes() as live:
        vae.encode(x) if encode else vae.decode(x)
    return counter.get_total_flops(), x.numel() * x.element_size() + live.peak


class Measurements:
    """What the plan counts on meta for one workload, each piece once, when first asked for."""

    def __init__(self, work: memory.Workload, frames_hw: tuple[int, int, int]):
        self.work, self.frames = work, frames_hw  # the videos' pixel frames, height, width
        self._cache: dict = {}

    def _once(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def passes(self, role: str, lora_rank: int | None = None) -> tuple[int, int]:
        """(forward, backward) FLOPs of one sample as ``role`` runs it (``pass_flops``)."""
        work = self.work if lora_rank is None else dataclasses.replace(self.work, lora_rank=lora_rank)
        return self._once(("passes", role, lora_rank), lambda: pass_flops(work, role))

    def forward(self) -> int:
        return self.passes("seme")[0]

    def flops(self, lora_rank: int) -> PassFlops:
        forward, seme_b = self.passes("seme")
        dete_f, dete_b = self.passes("dete", lora_rank)
        return PassFlops(forward, seme_b, dete_f, dete_b, self.passes("teacher")[1])

    def parameters(self) -> int:
        def make():
            return sum(p.numel() for p in memory.build(self.work).parameters())

        return self._once("parameters", make)

    def structure(self, work: memory.Workload, cp: int, compute: str) -> memory.Structure:
        key = ("structure", work.batch, work.lora_rank, work.gan, work.fm, work.dmd2_gan, work.grad_accum,
               work.disc_steps, cp, compute)
        return self._once(key, lambda: memory.structure(work, DTYPES[compute], cps=(cp,)))

    def profile(self, batch: int, compute: str) -> memory.ActivationProfile:
        """SemE's activation profile (one rank, nothing sharded) at ``batch`` (analyze's probe)."""
        work = dataclasses.replace(self.work, batch=batch)
        return self._once(("profile", batch, compute),
                          lambda: memory.activation_profile(work, 1, DTYPES[compute], "seme"))

    def inference(self, batch: int) -> int:
        return self._once(("inference", batch), lambda: inference_activation_bytes(self.work, batch))

    def vae_decode(self, dtype: str, tiling: bool) -> tuple[int, int]:
        return self._once(("decode", dtype, tiling),
                          lambda: vae_pass(self.work.family, self.work.latent, dtype, tiling, self.frames,
                                           vae_config=self.work.vae_config))

    def vae_encode(self, dtype: str, tiling: bool) -> tuple[int, int]:
        return self._once(("encode", dtype, tiling),
                          lambda: vae_pass(self.work.family, self.work.latent, dtype, tiling, self.frames,
                                           encode=True, vae_config=self.work.vae_config))


# ----------------------------------------------------------------------------- the params' workload

def transformer_config(params: Params, variant: str | None = None) -> tuple[dict, str, int]:
    """The transformer config the plan builds on meta, its name and the teacher's transformer count:
    ``backbone.path``'s ``transformer/config.json`` when the folder has one (and no ``variant`` is asked for;
    2 transformers where it also has ``transformer_2/``), else the released config of ``variant``, else of
    ``backbone.variant`` (a preset's), else of the family's default variant."""
    family = params.backbone.family
    if family not in memory.VARIANTS:
        raise ConfigError("backbone.family", family, f"one of {sorted(memory.VARIANTS)}: the shapes world's "
                          "toy teacher runs on a CPU and needs no plan")
    root = Path(params.backbone.path or "").expanduser()
    folder = root / "transformer" / "config.json"
    if variant is None and params.backbone.path and folder.is_file():
        accepted = inspect.signature(memory.transformer_class(family).__init__).parameters
        cfg = {k: v for k, v in json.loads(folder.read_text()).items() if k in accepted}
        return cfg, str(folder.parent), 2 if (root / "transformer_2" / "config.json").is_file() else 1
    key = "--variant" if variant else "backbone.variant"
    variant = variant or params.backbone.variant or memory.DEFAULT_VARIANT[family]
    if variant not in memory.VARIANTS[family]:
        raise ConfigError(key, variant, f"one of {list(memory.VARIANTS[family])} for family {family!r}")
    return memory.CONFIGS[(family, variant)], variant, memory.EXPERTS.get((family, variant), 1)


def pipeline_extras(params: Params, name: str) -> dict:
    """What the pipeline adds to the transformer config ``name`` (``memory.raw_workload``'s ``vae_config``,
    ``per_token_timestep``): read from ``backbone.path`` when the folder has them (vae/config.json,
    model_index.json's ``expand_timesteps``), else the released variant's (``memory.PIPELINE_EXTRAS``)."""
    family = params.backbone.family
    if name in memory.VARIANTS[family]:  # a released config: its pipeline's
        return dict(memory.PIPELINE_EXTRAS.get((family, name), {}))
    folder = Path(params.backbone.path or "").expanduser()
    extras: dict = {}
    if (folder / "model_index.json").is_file() \
            and json.loads((folder / "model_index.json").read_text()).get("expand_timesteps"):
        extras["per_token_timestep"] = True
    accepted = inspect.signature(memory.vae_class(family).__init__).parameters
    vae = {k: v for k, v in folder_vae_config(folder).items() if k in accepted}
    if vae:
        extras["vae_config"] = vae
    return extras


def guided_forwards(params: Params) -> int:
    """Forwards of one guided teacher step (``dcm.methods.guidance_forwards``): 2 with CFG, 1 embedded."""
    from dcm.backbones import adapter_class

    cfg = adapter_class(params.backbone.family).guidance_mode == "cfg"
    return 2 if cfg and params.backbone.guidance_scale != 1.0 else 1


class Planner:
    """The plan of any stage run of one params file (``plan``), its meta measurements shared by all."""

    def __init__(self, params: Params, options: Options | None = None):
        self.params, self.options = params, options or Options()
        cfg, name, experts = transformer_config(params, self.options.variant)
        work = memory.raw_workload(params.to_dict(), params.backbone.family, cfg, name,
                                   **pipeline_extras(params, name))
        self.work = dataclasses.replace(work, experts=experts)
        real = params.backbone.real
        self.measure = Measurements(self.work, (real.frames, real.height, real.width))
        self.g = guided_forwards(params)

    # ------------------------------------------------------------------ the common parts

    def gpu(self, row: Row) -> tuple[float, float]:
        """(peak TFLOP/s, GiB) of one of the row's GPUs: the options', else its GPU type's."""
        known = next((v for k, v in GPUS.items() if k in row.gpu_type.lower()), (None, None))
        peak, mem = self.options.peak_tflops or known[0], self.options.gpu_mem_gb or known[1]
        if peak is None or mem is None:
            raise ConfigError(f"{row.source}.gpu_type", row.gpu_type,
                              f"a GPU type the plan knows ({sorted(GPUS)}), or --peak-tflops and "
                              "--gpu-mem-gb")
        return peak, mem

    def eval_rows(self) -> tuple[int, str]:
        """The evaluation rows every sample run draws, and where the count comes from."""
        ev = self.params.evaluation
        if self.options.eval_prompts is not None:
            return self.options.eval_prompts * ev.videos_per_prompt, (
                f"{self.options.eval_prompts} prompts (--eval-prompts) × {ev.videos_per_prompt}")
        if ev.backend == "vbench" and ev.vbench.mode == "standard":
            prompts = ev.vbench.subset or VBENCH_SUITE_PROMPTS
            return prompts * VBENCH_SUITE_VIDEOS, f"VBench's standard suite, {prompts} prompts × 5"
        if ev.prompts is not None and Path(ev.prompts).expanduser().is_file():
            from dcm.data import dataset

            prompts = len(dataset.read_prompts("evaluation.prompts", ev.prompts))
            return prompts * ev.videos_per_prompt, f"{ev.prompts}: {prompts} prompts × {ev.videos_per_prompt}"
        return VBENCH_SUITE_PROMPTS * ev.videos_per_prompt, (
            f"assumed: VBench's {VBENCH_SUITE_PROMPTS} prompts × {ev.videos_per_prompt} (evaluation.prompts "
            "unset or missing; --eval-prompts N)")

    def video_rows(self) -> tuple[int, str]:
        """The clips ``preprocess`` encodes (``data.videos``' rows), and where the count comes from."""
        videos = self.params.data.videos
        if not videos:
            return 0, "none (data.videos unset)"
        from dcm.data import dataset

        try:
            return len(dataset.read_videos("data.videos", videos)), str(videos)
        except ConfigError:
            return 0, f"{videos} not readable here"

    def video_bytes(self) -> int:
        """One sample's files: its latents (fp32) and decoded video (fp16), as ``sample`` writes them."""
        real = self.params.backbone.real
        return math.prod(self.work.latent) * 4 + 3 * real.frames * real.height * real.width * 2

    def training_setting(self, run: StageRun, ema: bool) -> memory.Setting:
        par = self.params.training.parallel
        shard = {"ddp": 1, "fsdp": None,
                 "hsdp": par.shard_group_size or run.row.ranks // run.row.nodes}[par.strategy]
        # the gathered blocks in fp32 under FSDP without mixed precision (activations: autocast's bf16,
        # over-counted there as fp32)
        compute = "fp32" if par.strategy in SHARDED and par.mixed_precision == "none" else "bf16"
        return memory.Setting(run.row.ranks, par.context_parallel, shard,
                              par.shard_teacher and par.strategy in SHARDED, ema, compute)

    # ------------------------------------------------------------------ the plan of one run

    def plan(self, run: StageRun) -> StagePlan:
        estimate = ESTIMATES.get(run.stage, _not_planned)(self, run)
        row, opt = run.row, self.options
        gpu_work = estimate.flops > 0 or estimate.assumed_gpu_s > 0
        if gpu_work and row.total_gpus == 0:
            estimate.error = estimate.error or f"{row.source}.gpus = 0: no GPU for this stage's work"
        peak_tflops, gpu_gib = self.gpu(row) if row.total_gpus else (None, None)
        seconds = estimate.assumed_gpu_s + (estimate.flops / (opt.mfu * peak_tflops * 1e12)
                                            if peak_tflops else 0.0)
        if estimate.working is not None:
            working = estimate.working
        elif row.total_gpus == 0:  # a CPU row
            working = 0
        else:
            working = max(1, row.ranks if run.data_parallel else 1)
        if estimate.units and working:
            working = min(working, estimate.units)
            wall = math.ceil(estimate.units / working) * seconds / estimate.units
        else:
            wall = seconds / max(working, 1)
        limit = row.time_min * 60
        jobs = max(1, math.ceil(wall / limit))
        fits_time = jobs == 1 or (run.resumable and jobs <= 1 + run.requeues)
        plan = StagePlan(run.label, run.stage, run.method, row.total_gpus, working, estimate.flops,
                         seconds / 3600, wall / 3600, limit / 3600, jobs, fits_time,
                         disk_bytes=estimate.disk_bytes, memory_parts=estimate.memory_parts,
                         notes=estimate.notes, error=estimate.error)
        if estimate.peak_bytes is not None and gpu_gib is not None:
            plan.peak_bytes = estimate.peak_bytes
            plan.usable_bytes = int((gpu_gib - opt.reserve_gb) * GiB)
        return plan


# ----------------------------------------------------------------------------- the stages

def _not_planned(planner: Planner, run: StageRun) -> _Estimate:
    why = ("the shapes world's pipeline" if run.stage in NOT_PLANNED
           else "no estimator for this stage (dcm.plan.whole.ESTIMATES)")
    return _Estimate(notes=[f"not planned: {why}"])


def _cpu(planner: Planner, run: StageRun) -> _Estimate:
    """prepare, the reports: files in, files out, no transformer."""
    return _Estimate(notes=["no GPU work (prompt files in, JSON / reports out: small)"])


def _teacher(planner: Planner, run: StageRun) -> _Estimate:
    """A real family's teacher is not trained: the folder is checked and recorded."""
    return _Estimate(notes=["no GPU work: backbone.path checked and recorded (models/teacher)"])


def _preprocess(planner: Planner, run: StageRun) -> _Estimate:
    """Every prompt through the text encoders once (``dcm.data.preprocess.prompt_list``: the train and eval
    rows' prompts, counted here per row, an upper bound) and, with ``data.videos``, every clip through the
    VAE's encoder (counted on meta), shard by shard over the ranks."""
    p, work, m = planner.params, planner.work, planner.measure
    real = p.backbone.real
    eval_rows, _ = planner.eval_rows()
    prompts = p.trajectories.num_trajectories + eval_rows + 2  # + the negative and the empty prompt
    videos, where = planner.video_rows()
    prompts += videos  # their captions
    text_params = TEXT_ENCODER_PARAMS[work.family]
    text_bytes = memory.DTYPE_BYTES[real.text_dtype]
    text_dim = work.config.get("text_dim") or work.config["text_embed_dim"]
    parts = {f"text encoders ({real.text_dtype})": int(text_params * text_bytes)}
    flops = prompts * 2 * text_params * work.text_tokens
    notes = [f"{prompts} prompts through text encoders of {text_params / 1e9:.2f} B parameters (released "
             "sizes, 2 FLOP per parameter per token; not counted on meta)"]
    if videos:
        encode_flops, encode_bytes = m.vae_encode(real.vae_dtype, real.vae_tiling)
        flops += videos * encode_flops
        parts[f"VAE ({real.vae_dtype})"] = work.vae_params * work.vae_bytes
        parts["VAE encode (one clip)"] = encode_bytes * (1 if real.vae_slicing else p.data.batch_size)
        notes.append(f"{videos} videos ({where}): VAE encode {encode_flops / 1e12:.0f} TFLOP per clip")
    elif p.data.videos:
        notes.append(f"data.videos: {where}; no video encode planned")
    shards = math.ceil(prompts / p.data.shard_size) + math.ceil(videos / p.data.shard_size)
    return _Estimate(flops=flops, units=shards, peak_bytes=sum(parts.values()), memory_parts=parts,
                     disk_bytes=prompts * work.text_tokens * text_dim * text_bytes
                     + videos * math.prod(work.latent) * 4, notes=notes)


def _trajectories(planner: Planner, run: StageRun) -> _Estimate:
    from dcm.data.trajectories import bytes_per_trajectory

    p, work, m = planner.params, planner.work, planner.measure
    count, steps = p.trajectories.num_trajectories, p.grid.steps
    forward = m.forward()
    batch = p.trajectories.batch_size
    weights = INFERENCE_WEIGHT_BYTES * m.parameters() * work.experts
    activations = m.inference(batch * planner.g)
    # the solver keeps every grid point of its batch in fp32 until the shard is written
    points = batch * (steps + 1) * math.prod(work.latent) * 4
    teacher = f"{work.experts} transformers (fp32)" if work.experts > 1 else "transformer (fp32)"
    parts = {teacher: weights, "activations (bf16, no grad)": activations, "trajectory points (fp32)": points}
    return _Estimate(flops=count * steps * planner.g * forward,
                     units=math.ceil(count / p.trajectories.shard_size),
                     peak_bytes=sum(parts.values()), memory_parts=parts,
                     disk_bytes=count * bytes_per_trajectory(work.latent, steps, p.trajectories.dtype),
                     notes=[f"{count} trajectories × {steps} steps × {planner.g} forward(s)"])


def _resident_transformers(params: Params, method: str, experts: int = 1) -> tuple[int, str]:
    """Transformers ``sample`` holds on the GPU at once, and which (``load_teacher`` puts the teacher
    there); ``experts``: the teacher's transformers (2: Wan 2.2 A14B, whose copies have both, and whose
    DetE's LoRA sits on a copy of the low-noise expert)."""
    m = params.method(method)
    kind = METHOD_KINDS[m.kind]
    if not kind.trains:
        return experts, "the teacher"
    if len(kind.experts) > 1:
        dual = 1 + (experts > 1)
        if m.merge_experts:  # a dual expert sampled as merged copies
            return experts + dual + 2, ("the teacher, the loaded dual expert, SemE's and DetE's merged "
                                        "copies (at load)")
        return experts + dual, "the teacher and the dual expert"
    return 2 * experts, "the teacher and the student"


def _sample(planner: Planner, run: StageRun) -> _Estimate:
    p, work, m = planner.params, planner.work, planner.measure
    method = p.method(run.method)
    rows, where = planner.eval_rows()
    steps = len(method.schedule) if method.schedule is not None else method.sample_steps
    per_step = 1 if METHOD_KINDS[method.kind].trains else planner.g  # the teacher: guided, g forwards
    real = p.backbone.real
    decode_flops, decode_bytes = m.vae_decode(real.vae_dtype, real.vae_tiling)
    decode_peak = decode_bytes if real.vae_slicing else decode_bytes * SAMPLE_BATCH
    count, which = _resident_transformers(p, run.method, work.experts)
    parts = {f"{count} transformer(s) (fp32): {which}": count * INFERENCE_WEIGHT_BYTES * m.parameters(),
             f"VAE ({real.vae_dtype})": work.vae_params * work.vae_bytes,
             "activations: transformer (bf16, no grad) or VAE decode":
                 max(m.inference(SAMPLE_BATCH * per_step), decode_peak)}
    return _Estimate(flops=rows * (steps * per_step * m.forward() + decode_flops),
                     units=math.ceil(rows / SAMPLE_BATCH), peak_bytes=sum(parts.values()), memory_parts=parts,
                     disk_bytes=rows * planner.video_bytes(),
                     notes=[f"{rows} rows ({where}), NFE {steps * per_step}; VAE decode "
                            f"{decode_flops / 1e12:.0f} TFLOP per video (the mp4s not counted on disk)"])


def _evaluate(planner: Planner, run: StageRun) -> _Estimate:
    ev = planner.params.evaluation
    rows, where = planner.eval_rows()
    return _Estimate(assumed_gpu_s=rows * planner.options.vbench_s_per_video,
                     working=max(1, min(ev.vbench.ngpus, run.row.total_gpus)),
                     notes=[f"VBench: {rows} videos ({where}) × {planner.options.vbench_s_per_video:g} GPU-s "
                            "assumed per video (--vbench-s-per-video; not counted); memory not planned"])


def training_step_flops(planner: Planner, stage: str, method: str) -> tuple[float, int]:
    """(FLOPs of one sample of one optimizer step, optimizer steps) of a training stage (module docstring)."""
    p, work, g = planner.params, planner.work, planner.g
    m = p.method(method)
    f = planner.measure.flops(m.dete.lora_rank if m.dete is not None else work.lora_rank)
    student = f.forward + f.seme_backward
    if stage == "train_seme":
        return student + f.forward, m.seme.train_steps
    if stage == "train_dete":
        d = m.dete
        step = f.dete_forward + f.dete_backward + f.dete_forward
        if d.gan_weight > 0 or d.fm_weight > 0:
            step += f.forward + f.forward + f.teacher_backward
        if d.gan_weight > 0:
            step += (d.disc_steps - 1) * 2 * f.forward
        if d.real == "ema":
            step += f.dete_forward
        return step, d.train_steps
    if m.dmd2 is not None:
        k, fake = m.sample_steps, m.dmd2.fake_steps
        step = ((k - 1) / 2 * f.forward + student + f.forward + g * f.forward + f.forward
                + fake * (f.forward + f.seme_backward) + (fake - 1) * (k + 1) / 2 * f.forward)
        return step + (f.teacher_backward if m.dmd2.gan_weight > 0 else 0.0), m.train_steps
    step = student + f.forward
    if m.mcm is not None:
        step += m.mcm.mix_portion * f.forward + g * f.forward
        if m.mcm.disc_weight > 0:
            step += (2 * f.forward + f.teacher_backward) * m.mcm.disc_frames / work.latent[1]
    return step, m.train_steps


MEMORY_ROW = {"train_seme": "SemE", "train_dete": "DetE"}


def _train(planner: Planner, run: StageRun) -> _Estimate:
    p, row = planner.params, run.row
    m = p.method(run.method)
    work = planner.work
    if m.dete is not None:
        work = dataclasses.replace(work, lora_rank=m.dete.lora_rank, gan=m.dete.gan_weight > 0,
                                   fm=m.dete.fm_weight > 0, disc_steps=m.dete.disc_steps)
    if m.dmd2 is not None:
        work = dataclasses.replace(work, dmd2_gan=m.dmd2.gan_weight > 0)
    setting = planner.training_setting(run, ema=m.target == "ema" and run.stage == "train_baseline")
    per_sample, steps = training_step_flops(planner, run.stage, run.method)
    data_ranks = max(1, row.ranks // setting.cp)
    try:  # grad_accum at the row's rank count (derived from training.global_batch_size when that is set)
        accum = p.training.accumulation(data_ranks, row.ranks, setting.cp)
    except ConfigError as err:
        return _Estimate(error=str(err))
    work = dataclasses.replace(work, grad_accum=accum)  # DetE's GAN taps of every micro-batch are held
    batch = p.training.batch_size * data_ranks * accum
    out = _Estimate(flops=steps * batch * per_sample,
                    notes=[f"{steps} steps × global batch {batch} ({p.training.batch_size} per rank × "
                           f"{data_ranks} data-parallel rank(s) × grad_accum {accum})"])
    try:
        memory.check_setting(work, setting)
    except ConfigError as err:
        out.error = str(err)
        return out
    st = planner.measure.structure(work, setting.cp, setting.compute)
    key = MEMORY_ROW.get(run.stage, "DMD2" if m.dmd2 is not None else "Baseline")
    mode = "checkpointing" if p.training.gradient_checkpointing else "no checkpointing"
    rows = memory.plan(work, setting, st)[key]
    out.peak_bytes = rows[f"total, {mode}"]
    out.memory_parts = {k: v for k, v in rows.items() if not k.startswith("total")
                        and (not k.startswith("activations") or k.endswith(f", {mode}"))}
    if m.mcm is not None:
        out.notes.append("MCM's motion head and frame discriminator not in its memory")
    out.disk_bytes = training_disk(st, run.stage, m, work)
    return out


def training_disk(st: memory.Structure, stage: str, method, work: memory.Workload) -> int:
    """Bytes a training stage writes: its export (fp32) and resume state (weights, AdamW's moments, an EMA),
    as ``dcm.plan.memory.disk`` counts them."""
    disk = memory.disk(work, st)
    if stage == "train_seme":
        return disk["train_seme (export + resume)"]
    if stage == "train_dete":
        return disk["train_dete (export + resume)"]
    if method.dmd2 is not None:
        return disk["train_baseline dmd2 (export + resume)"]
    return work.experts * (st.total * 4 + st.total * (12 + (4 if method.target == "ema" else 0)))


def _analyze(planner: Planner, run: StageRun) -> _Estimate:
    """``analysis.seeds`` whole-range students on rank 0, each trained ``analysis.train_steps`` steps and
    probed at every grid index with ``analysis.probe_batch`` rows (fp32, one backward per index)."""
    p, m = planner.params, planner.measure
    a, t = p.analysis, p.training
    forward, seme_backward = m.passes("seme")
    per_sample = 2 * forward + seme_backward
    accum = t.accumulation(1)  # one rank: the whole global batch in micro-batches
    samples = a.train_steps * t.batch_size * accum + p.grid.steps * a.probe_batch
    one = Row(run.row.source, 1, 1, 1, run.row.gpu_type, run.row.time_min)
    # one rank: nothing sharded, no context parallelism
    setting = dataclasses.replace(planner.training_setting(dataclasses.replace(run, row=one),
                                                           ema=a.target == "ema"), cp=1)
    work = dataclasses.replace(planner.work, batch=t.batch_size)
    mode = "checkpointing" if t.gradient_checkpointing else "no checkpointing"
    training = memory.plan(work, setting, m.structure(work, 1, setting.compute))["SemE"]
    probe = m.profile(a.probe_batch, "fp32")
    weights = 4 * m.parameters()
    probe_bytes = (3 * weights + work.vae_params * work.vae_bytes
                   + (probe.checkpointing if t.gradient_checkpointing else probe.no_checkpointing))
    probe_key = f"probe (fp32, batch {a.probe_batch}: student, its gradients, teacher, VAE, activations)"
    parts = {"training (one rank, SemE's plan)": training[f"total, {mode}"], probe_key: probe_bytes}
    return _Estimate(flops=a.seeds * samples * per_sample, working=1, peak_bytes=max(parts.values()),
                     memory_parts=parts,
                     disk_bytes=a.seeds * m.parameters() * (12 + (4 if a.target == "ema" else 0)),
                     notes=[f"{a.seeds} students × ({a.train_steps} steps × batch "
                            f"{t.batch_size * accum} + {p.grid.steps} indices × {a.probe_batch} probe "
                            "rows), rank 0 only"])


ESTIMATES: dict[str, Callable[[Planner, StageRun], _Estimate]] = {
    "prepare": _cpu, "report": _cpu, "report_ablations": _cpu, "report_paper": _cpu,
    "teacher": _teacher, "preprocess": _preprocess, "trajectories": _trajectories, "analyze": _analyze,
    "train_baseline": _train, "train_seme": _train, "train_dete": _train,
    "sample": _sample, "evaluate": _evaluate,
}


# ----------------------------------------------------------------------------- verdicts and the table

def refusal(plan: StagePlan, run: StageRun, options: Options) -> ConfigError | None:
    """Why ``dcm launch`` must not submit this run (the key, the value, what would fit), or None."""
    escape = "or `dcm launch --no-plan-check` (DCM_NO_PLAN_CHECK=1) to submit anyway"
    if plan.error is not None:
        return ConfigError(run.row.source, run.label, f"a row it can run on: {plan.error}; {escape}")
    if plan.fits_memory is False:
        return ConfigError(f"{run.row.source}.gpu_type", run.row.gpu_type,
                           f"GPUs with {plan.peak_bytes / GiB + options.reserve_gb:.1f} GiB for "
                           f"{plan.label}: its plan needs {plan.peak_bytes / GiB:.1f} GiB per GPU, the row's "
                           f"GPUs give {plan.usable_bytes / GiB:.1f} GiB ({options.reserve_gb:g} GiB kept "
                           f"back; {_largest(plan.memory_parts)}); more GPUs to shard over, another "
                           f"training.parallel, or GPUs with more memory, {escape}")
    if not plan.fits_time:
        jobs = 1 + (run.requeues if run.resumable else 0)
        needed = math.ceil(plan.wall_h * 60 / jobs)
        return ConfigError(f"{run.row.source}.time_min", run.row.time_min,
                           f">= {needed} (minutes) for {plan.label}: its plan predicts {plan.flops:.3g} FLOP "
                           f"= {plan.gpu_hours:.1f} GPU-h at MFU {options.mfu:g}, {plan.wall_h:.1f} h on "
                           f"{plan.working} GPU(s), against the row's {run.row.time_min} min"
                           + (f" × {jobs} jobs (requeued after a timeout, it resumes)" if jobs > 1 else "")
                           + f"; more GPUs (where the stage spreads over them) or a longer limit, {escape}")
    return None


def _largest(parts: dict[str, int]) -> str:
    top = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
    return ", ".join(f"{k} {v / GiB:.1f}" for k, v in top if v)


def summary(plan: StagePlan) -> str:
    mem = "" if plan.peak_bytes is None else (
        f", {plan.peak_bytes / GiB:.1f} of {plan.usable_bytes / GiB:.1f} GiB per GPU")
    return (f"{plan.gpu_hours:.2f} GPU-h, {plan.wall_h:.2f} h on {plan.working} GPU(s) of "
            f"{plan.limit_h:.2f} h{mem}, {plan.disk_bytes / GiB:.1f} GiB written: "
            + ("fits" if plan.fits else "does NOT fit"))


def _verdict(ok: bool | None, jobs: int = 1) -> str:
    if ok is None:
        return "—"
    return ("yes" if jobs == 1 else f"yes, {jobs} jobs") if ok else "NO"


def table(plans: list[StagePlan], header: list[str]) -> str:
    lines = list(header)
    lines.append(f"{'stage run':24s} {'GPUs':>7s} {'EFLOP':>8s} {'GPU-h':>8s} {'wall h':>7s} {'limit h':>7s} "
                 f"{'time':>11s} {'GiB/GPU':>8s} {'of GiB':>7s} {'memory':>6s} {'disk GiB':>9s}")
    notes: list[str] = []
    for plan in plans:
        marks = []
        for note in plan.notes + ([f"cannot run: {plan.error}"] if plan.error else []):
            if note not in notes:
                notes.append(note)
            marks.append(str(notes.index(note) + 1))
        peak = "—" if plan.peak_bytes is None else f"{plan.peak_bytes / GiB:.1f}"
        usable = "—" if plan.usable_bytes is None else f"{plan.usable_bytes / GiB:.1f}"
        time = "NO" if plan.error else _verdict(plan.fits_time, plan.jobs)
        lines.append(f"{plan.label:24s} {f'{plan.working}/{plan.gpus}':>7s} {plan.flops / 1e18:8.3g} "
                     f"{plan.gpu_hours:8.1f} {plan.wall_h:7.1f} {plan.limit_h:7.1f} {time:>11s} {peak:>8s} "
                     f"{usable:>7s} {_verdict(plan.fits_memory):>6s} {plan.disk_bytes / GiB:9.1f}  "
                     f"[{','.join(marks)}]")
    failing = [p.label for p in plans if not p.fits]
    lines.append("")
    lines.append(f"total: {sum(p.gpu_hours for p in plans):.1f} GPU-h of work, "
                 f"{sum(p.wall_h * p.gpus for p in plans):.1f} GPU-h of the rows' GPUs held, "
                 f"{sum(p.disk_bytes for p in plans) / GiB:.1f} GiB written; "
                 + (f"do not fit their rows: {', '.join(failing)}" if failing else "every run fits its row"))
    lines.append("")
    lines.extend(f"[{i}] {note}" for i, note in enumerate(notes, start=1))
    return "\n".join(lines)


def load_params(path: str, preset: str | None = None) -> tuple[Params, str | None]:
    """The params to plan, validated; a ``backbone.path`` that does not exist yet (no weights here) is
    planned with the released config (the note says so) instead of failing validation."""
    import os

    from dcm import config

    raw = config.load_raw(path, preset)
    folder = (raw.get("backbone") or {}).get("path")
    if folder and not Path(os.path.expanduser(folder)).is_dir():
        raw = config.deep_merge(raw, {"backbone": {"path": "."}})
        return config.parse(raw), (f"backbone.path {folder} does not exist here: planned with the released "
                                   "transformer config")
    return config.parse(raw), None


def quiet_diffusers() -> None:
    """diffusers' notes on the meta builds ("modules ... should be kept in float32") off."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()


def main(argv: list[str] | None, stage_runs: Callable[[Params, str | None], list[StageRun]]) -> int:
    """``dcm plan --dag``: the plan of every run of the DAG of a params file on its SLURM rows; ``stage_runs``
    lists them with their rows (``dcm.pipeline.launch.stage_runs``: the stage table sits above this layer)."""
    quiet_diffusers()
    ap = argparse.ArgumentParser(prog="dcm plan --dag", description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    ap.add_argument("--preset", default=None, help="overlay a preset on it for this plan")
    ap.add_argument("--resources", default=None, help="SLURM rows (default: $DCM_SLURM_RESOURCES, else "
                    "slurm/resources.yaml)")
    ap.add_argument("--variant", default=None, help="plan a released config (1.3B|14B|ti2v-5B, 13B, 2B|5B) "
                    "instead of backbone.path's transformer/config.json")
    ap.add_argument("--mfu", type=float, default=Options.mfu,
                    help=f"model FLOP utilisation assumed (default {Options.mfu})")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"bf16 peak per GPU (default: the row's gpu_type: {GPUS})")
    ap.add_argument("--gpu-mem-gb", type=float, default=None,
                    help="GiB per GPU (default: the row's gpu_type)")
    ap.add_argument("--reserve-gb", type=float, default=Options.reserve_gb,
                    help="GiB per GPU kept for the CUDA context, NCCL and allocator slack (default 2)")
    ap.add_argument("--vbench-s-per-video", type=float, default=Options.vbench_s_per_video,
                    help="GPU-seconds assumed per evaluated video (VBench; default 30)")
    ap.add_argument("--eval-prompts", type=int, default=None, help="evaluation prompts (default: "
                    "evaluation.prompts' count, VBench's standard suite in standard mode, else 946 assumed)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON instead of the table")
    ap.add_argument("--json-out", help="also write the plan as JSON to this file")
    args = ap.parse_args(argv)
    if not 0 < args.mfu <= 1:
        raise ConfigError("--mfu", args.mfu, "a fraction in (0, 1]")
    options = Options(mfu=args.mfu, peak_tflops=args.peak_tflops, gpu_mem_gb=args.gpu_mem_gb,
                      reserve_gb=args.reserve_gb, vbench_s_per_video=args.vbench_s_per_video,
                      eval_prompts=args.eval_prompts, variant=args.variant)
    params, note = load_params(args.params, args.preset)
    runs = stage_runs(params, args.resources)
    planner = Planner(params, options)
    plans = [planner.plan(run) for run in runs]
    sources = sorted({run.row.source.rsplit(":", 1)[0] for run in runs})
    gpus = {run.row.gpu_type: planner.gpu(run.row) for run in runs if run.row.total_gpus}
    peaks = ", ".join(f"{t}: {peak:g} TFLOP/s, {mem:g} GiB" for t, (peak, mem) in sorted(gpus.items()))
    header = [f"whole-DAG plan: {planner.work.name} ({planner.work.tokens} video tokens), {args.params}, "
              f"rows {', '.join(sources)}",
              f"GPU-hours at MFU {options.mfu:g} of the bf16 peak ({peaks}); memory fits = peak per GPU <= "
              f"GPU - {options.reserve_gb:g} GiB; time fits = wall <= limit (a resumable stage: <= "
              f"{1 + max((r.requeues for r in runs), default=0)} jobs)"]
    if note:
        header.append(note)
    header.append("")
    document = json.dumps({"workload": planner.work.name, "params": args.params, "rows": sources,
                           "options": dataclasses.asdict(options), "note": note,
                           "stages": [{**dataclasses.asdict(p), "fits": p.fits, "fits_memory": p.fits_memory}
                                      for p in plans]}, indent=1)
    if args.json_out:
        Path(args.json_out).write_text(document)
    print(document if args.json else table(plans, header))
    return 0
