"""The one distillation loop for every consistency method (LCM, PCM, SemE, DetE, MCM).

What differs between methods is data, not code: a ``DistillSpec`` names the student, its trainable
parameters, the phases n is drawn from, the target network (online student or EMA), lr, steps and
extra ``Objective``s (temporal coherence, GAN + feature matching, …).  Each step, top to bottom:

    draw (trajectory, n) → x_n, x_{n−1}, cond from the source
    x̂     = x_n + (σ_end − σ_n)·v_θ(x_n, t_n)                     student, with grad
    x̂_tgt = x_{n−1} + (σ_end − σ_{n−1})·v_θ⁻(x_{n−1}, t_{n−1})    target, no grad (x_{n−1} at a boundary)
    loss  = pseudo-Huber(M(x̂), M⁻(x̂_tgt)) + Σ objectives
            (M = identity unless a ConsistencySpace is given: MCM)
    backward (× grad_accum) → clip → AdamW → EMA → objectives' own steps → log → checkpoint

Every step goes to ``history.jsonl`` at once and to MLflow in batches of ``training.log_every`` steps (and
at each checkpoint, so a resumed run's MLflow curve has no gap).

Every ``training.log_every`` steps (unless ``training.term_grad_norms`` is off, as in the real presets) the
history also holds each loss term's gradient norm before clipping (``grad_norm/<term>``), from extra
``autograd.grad`` passes that leave ``.grad`` untouched; with grad_accum > 1 it is the mean over
micro-batches (an upper bound of the accumulated term's norm).  In multi-rank runs (sharded or replicated
by ``training.parallel``) they come from one extra backward pass per term after the step's own:
the mean over ranks for FSDP-sharded parameters, this rank's for DDP-replicated ones; every logged
value is the mean over the data-parallel ranks, i.e. the global batch's.

With ``training.parallel.context_parallel`` C > 1 the ranks form groups of C that split each sample's
video tokens (``dcm.parallel.context``, Ulysses): every transformer that runs in a step has its tokens
split inside and gathered at its output, the ranks of a group draw the same samples, noise and
objective draws, and the engines average gradients over the group; a run equals one process with the
same global batch (batch_size × world size / C × grad_accum; with ``training.global_batch_size`` set,
grad_accum is derived from the rank count, and every step draws the same samples at any count).
"""

from __future__ import annotations

import copy
import json
import os
import resource
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dcm import distributed, io
from dcm.backbones.base import Backbone, PromptEmbeds, enable_activation_checkpointing
from dcm.backbones.kernels import compile_blocks
from dcm.config import ConfigError, Params
from dcm.distill import checkpoint, losses
from dcm.distill.optim import adamw
from dcm.parallel import fsdp as parallel
from dcm.schedule import Phase

HISTORY_FILE = "history.jsonl"
SUMMARY_FILE = "train.json"
DISTRIBUTED_FILE = "distributed.json"  # multi-rank runs: every rank's parameter digest after training
ADAM_BETAS = (0.9, 0.999)

# : ``wrap(net, shard=...)``: ``dcm.parallel.fsdp.parallelize`` bound to the run's layout (nothing in one
# process)
Wrap = Callable[..., nn.Module]


@dataclass
class ConsistencyBatch:
    """One optimisation micro-batch, after the student and target forwards."""

    step: int
    n: torch.Tensor  # (B,) grid indices of x_n
    sigma_n: torch.Tensor  # (B,) float32
    sigma_prev: torch.Tensor
    sigma_end: torch.Tensor
    x_n: torch.Tensor  # (B, C, T, H, W): x_{t_n}
    x_prev: torch.Tensor  # the teacher's x_{t_{n−1}}
    cond: PromptEmbeds
    x_end_pred: torch.Tensor  # student endpoint x̂ (with grad)
    x_end_target: torch.Tensor  # target x̂_tgt (no grad); = x_prev where n−1 == end
    # the training forwards' precision context (``autocast_for``): objectives run their teacher passes in it
    autocast: Callable[[], AbstractContextManager] = nullcontext
    # this micro-batch is rows [data_rank·B, (data_rank + 1)·B) of the global batch of data_size·B samples:
    # an objective's own draws come from the global batch's, so they do not depend on the number of ranks
    data_rank: int = 0
    data_size: int = 1


class Objective:
    """Extra loss terms beside the consistency loss.  Subclasses set ``name`` and override what they need."""

    name: str = "objective"
    #: trains under context parallelism (training.parallel.context_parallel > 1): the loop enables it on the
    # : objective's networks; block outputs it takes by hooks are gathered
    # (``dcm.parallel.context.gather_taps``)
    #: and its random draws are the same on every rank of a context-parallel group
    supports_context_parallel: bool = False

    def check_parallel(self, dims: parallel.ParallelDims) -> None:
        """Raise ``ConfigError`` (key, value, what is allowed) for a layout over the ranks
        (``training.parallel`` at this world size) this objective cannot train under; the loop calls it
        before any work."""
        if dims.cp > 1 and not self.supports_context_parallel:
            raise ConfigError("training.parallel.context_parallel", dims.cp,
                              f"1 with the {type(self).__name__} objective ('{self.name}'): it does not "
                              "support context parallelism (its feature taps are not gathered across the "
                              "ranks)")

    def generator_loss(self, batch: ConsistencyBatch) -> dict[str, torch.Tensor]:
        """Weighted scalar terms, summed into the student's loss and logged by key."""
        return {}

    def after_generator_step(self, batch: ConsistencyBatch) -> dict[str, float]:
        """Anything that steps after the student (e.g. a discriminator); returns values to log."""
        return {}

    def grad_networks(self) -> list[nn.Module]:
        """Frozen networks the generator loss backpropagates through (activation checkpointing covers
        them)."""
        return []

    def parallelize(self, wrap: Wrap) -> None:
        """Wrap the objective's trained networks over the ranks, before any step.  Default: each trained
        module replicated (``shard=False``: small heads); one as large as the student passes ``shard=True``
        (and remakes what holds its parameters: FSDP2 replaces them by shards)."""
        for net in _trainable_modules(self):
            wrap(net, shard=False)

    def sharded_parts(self) -> dict:
        """Parts of ``state_dict()`` (same keys) a multi-rank checkpoint writes as DCP ``Stateful`` parts,
        each rank its shards, resharded on load, instead of pickling them from rank 0: a sharded network,
        its optimizer.  ``load_state_dict`` then gets the rest only."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


class TemporalCoherence(Objective):
    """SemE's temporal coherence loss on the endpoints, weight λ_TC, frame offset l (METHODS.md)."""

    name = "tc"
    # on the model's output, which context parallelism gathers: the whole clip
    supports_context_parallel = True

    def __init__(self, weight: float, offset: int):
        self.weight, self.offset = weight, offset

    def generator_loss(self, batch: ConsistencyBatch) -> dict[str, torch.Tensor]:
        tc = losses.temporal_coherence(batch.x_end_pred, batch.x_end_target, self.offset)
        return {"tc": self.weight * tc}


class ConsistencySpace:
    """Where the consistency loss compares the endpoints: pseudo-Huber(M(x̂), M⁻(x̂_tgt)).

    The identity here (LCM, PCM, DCM).  MCM's disentangled motion distillation maps both sides to a
    motion representation; a learnable M trains with the student (``parameters``, same optimiser) and
    its target side M⁻ may be an EMA copy (``after_optimizer_step``); both go into the resume state.
    """

    name: str = "raw"

    def student(self, x_end_pred: torch.Tensor) -> torch.Tensor:
        return x_end_pred

    def target(self, x_end_target: torch.Tensor) -> torch.Tensor:
        return x_end_target

    def parameters(self) -> list[nn.Parameter]:
        return []

    def after_optimizer_step(self) -> None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


@dataclass
class DistillSpec:
    """What differs between distillation methods."""

    name: str
    student: nn.Module  # called through backbone.predict(student, x, sigma, cond)
    trainable: list[nn.Parameter]
    phases: list[Phase]  # n uniform over their union; each n's end from its phase
    target: Literal["online", "ema"]
    lr: float
    train_steps: int
    objectives: list[Objective] = field(default_factory=list)
    save: Callable[[Path], None] | None = None  # writes the final weights into the run's folder
    settings: dict = field(default_factory=dict)  # extra identity a resume must match (method params)
    consistency_space: ConsistencySpace | None = None  # None: the loss compares the raw endpoints
    # share of rows whose prompt is dropped (Params.prompt_dropout of the method or expert; the source gives
    # a dropped row the empty prompt and the teacher step under it); None: training.prompt_dropout
    prompt_dropout: float | None = None


@dataclass
class TrainResult:
    steps: int
    wall_s: float
    resumed_from: int  # step the run continued from (0 = fresh)
    losses: list[float]  # total loss of every step this process ran


class TrainingDiverged(RuntimeError):
    """A non-finite loss: names the step, the loss terms and the last good checkpoint."""


# ------------------------------------------------------------------------------------ helpers


def phase_tables(phases: list[Phase], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The drawable grid indices (sorted union of the phases) and each index's phase end (−1 = σ_min)."""
    end_of = torch.full((steps,), -2, dtype=torch.long)
    for phase in phases:
        if phase.last >= steps:
            raise ValueError(f"phase {phase} reaches beyond the teacher grid (N = {steps})")
        if (end_of[phase.first:phase.last + 1] != -2).any():
            raise ValueError(f"phases overlap: {phases}")
        end_of[phase.first:phase.last + 1] = phase.end
    allowed = torch.nonzero(end_of != -2).flatten()
    return allowed, end_of


def draw_indices(num_rows: int, allowed_n: torch.Tensor, batch_size: int, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's trajectory rows and grid indices n, each uniform (n over the phases' union)."""
    rows = torch.randint(num_rows, (batch_size,), generator=generator)
    n = allowed_n[torch.randint(len(allowed_n), (batch_size,), generator=generator)]
    return rows, n


def named_trainable(model: nn.Module, trainable: list[nn.Parameter]) -> list[str]:
    names = {id(p): name for name, p in model.named_parameters()}
    missing = [i for i, p in enumerate(trainable) if id(p) not in names]
    if missing:
        raise ValueError(f"trainable parameters {missing[:3]} are not parameters of the student")
    return [names[id(p)] for p in trainable]


def resume_settings(spec: DistillSpec, params: Params, data_parallel: int = 1) -> dict:
    """Everything a resumed run must share with the run that wrote the state (train_steps may grow)."""
    # checkpointing changes memory, not the maths: a job may resume with it switched on after running out of
    # memory; so does the layout over ranks (training.parallel) at the same global batch, bf16 compute aside,
    # and compiling the blocks (speed; rounding at most)
    unshared = ("checkpoint_every", "log_every", "gradient_checkpointing", "parallel", "compile")
    training = {k: v for k, v in vars(params.training).items()
                if k not in (*unshared, "grad_accum", "global_batch_size")}
    # the global batch per optimizer step: resumable on another GPU count (its split into ranks and
    # micro-batches changes the per-term gradient norms' log, not the step)
    training["batch_size"] = (params.training.batch_size * data_parallel
                              * params.training.accumulation(data_parallel))
    training["mixed_precision"] = params.training.parallel.mixed_precision
    if spec.prompt_dropout is not None:  # the method's (or expert's) own share replaces the shared one
        training["prompt_dropout"] = spec.prompt_dropout
    return {"name": spec.name, "phases": [(p.first, p.last, p.end) for p in spec.phases],
            "target": spec.target,
            "lr": spec.lr, "seed": params.seed, "training": training, "grid": vars(params.grid),
            "backbone": params.backbone.family, "objectives": [o.name for o in spec.objectives],
            **({"consistency_space": spec.consistency_space.name} if spec.consistency_space else {}),
            **spec.settings}


def _check_grid(source, params: Params) -> np.ndarray:
    if getattr(source, "own_grid", False):  # DMD2's generator: its steps index the training sigmas
        return np.asarray(source.grid_sigmas, dtype=np.float64)
    grid = params.teacher_grid()
    sigmas = np.asarray(source.grid_sigmas, dtype=np.float64)
    if sigmas.shape != grid.extended.shape or not np.allclose(sigmas, grid.extended, rtol=1e-5, atol=1e-6):
        raise ConfigError("grid", {"steps": params.grid.steps, "shift": params.grid.shift},
                          f"the grid the batch source was made with ({len(sigmas) - 1} steps, "
                          f"σ_0 = {sigmas[1] if len(sigmas) > 1 else None}): re-run `dcm run trajectories`")
    return grid.extended


def _truncate_history(path: Path, last_step: int) -> None:
    """Keep the history of the steps the resume state covers (a killed run may have logged more)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < last_step]
    io.write_bytes_atomic(path, "".join(line + "\n" for line in kept).encode())


def _last_logged_loss(path: Path) -> float | None:
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1])["loss"] if lines else None


def _source_counts(path: Path) -> dict:
    """Samples per origin over the whole run (the history spans resumes) and their realised fractions."""
    rows = io.read_jsonl(path)
    counts: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("source/"):
                origin = key.removeprefix("source/")
                counts[origin] = counts.get(origin, 0) + int(value)
    total = sum(counts.values())
    return {"source_counts": counts,
            "source_fractions": {k: v / total for k, v in counts.items()}} if total else {}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def autocast_for(device: torch.device) -> Callable[[], AbstractContextManager]:
    """The training forwards' precision context: bf16 autocast on CUDA (fp32 master weights), none on CPU."""
    return partial(torch.autocast, "cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext


def term_grad_norm(term: torch.Tensor, params: Sequence[nn.Parameter]) -> float:
    """‖∂term/∂θ‖₂ over ``params``, by ``autograd.grad`` with the graph kept: ``.grad`` stays untouched, so
    the step's own backward (and the training result) is the same with or without it."""
    wanted = [p for p in params if p.requires_grad]
    if not term.requires_grad or not wanted:
        return 0.0
    grads = torch.autograd.grad(term, wanted, retain_graph=True, allow_unused=True)
    norms = [torch.linalg.vector_norm(g.float()) for g in grads if g is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def endpoints(backbone: Backbone, student: nn.Module, target_model: nn.Module, data, sigma_n: torch.Tensor,
              sigma_prev: torch.Tensor, sigma_end: torch.Tensor, at_boundary: torch.Tensor,
              autocast=nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂, x̂_tgt): the student's phase endpoint from x_n, with grad, and the target network's from
    x_{n−1}, without grad (x_{n−1} itself where ``at_boundary``)."""
    with autocast():
        v = backbone.predict(student, data.x_n, sigma_n, data.cond)
    x_end_pred = losses.euler_endpoint(data.x_n, v.float(), sigma_n, sigma_end)
    with torch.no_grad(), autocast():
        v_prev = backbone.predict(target_model, data.x_prev, sigma_prev, data.cond)
    x_end_target = losses.consistency_target(data.x_prev, v_prev.float(), sigma_prev, sigma_end, at_boundary)
    return x_end_pred, x_end_target


def term_grad_norms_by_backward(terms: dict[str, torch.Tensor], params: Sequence[nn.Parameter],
                                cp=None, networks: Sequence[nn.Module] = ()) -> dict[str, float]:
    """‖∂term/∂θ‖₂ of each term by one more backward each, after the step's own (``retain_graph``): the
    way for wrapped models, whose engines see gradients only through backward hooks (FSDP2's reduce-
    scatter: the norm of the mean over ranks; DDP syncs once per step: this rank's).  ``.grad`` is put
    back as the step's backward left it.  ``cp`` (a ``ContextParallel``): plain (unsharded) gradients are
    averaged over its group first, a context-parallel rank's own being only its tokens' share.  ``networks``:
    the frozen networks the terms backpropagate through, whose FSDP2 roots are gathered again before each
    backward (``parallel.unshard_roots``)."""
    kept = [p.grad for p in params]
    out: dict[str, float] = {}
    try:
        for i, (key, term) in enumerate(terms.items()):
            for p in params:
                p.grad = None
            if term.requires_grad:
                parallel.unshard_roots(networks)
                term.backward(retain_graph=i < len(terms) - 1)
            if cp is not None and cp.degree > 1:
                cp.average_gradients([p for p in params
                                      if p.grad is not None and not hasattr(p.grad, "to_local")])
            out[key] = float(parallel.grad_norm(params)) if any(p.grad is not None for p in params) else 0.0
    finally:
        for p, g in zip(params, kept, strict=True):
            p.grad = g
    return out


def _modules_of(owner) -> list[nn.Module]:
    """The ``nn.Module`` attributes of an object (a backbone, an objective, a batch source)."""
    return [m for m in vars(owner).values() if isinstance(m, nn.Module)] if hasattr(owner, "__dict__") else []


def _trainable_named_modules(owner) -> dict[str, nn.Module]:
    """The ``nn.Module`` attributes of an objective or consistency space that hold trainable parameters, by
    name."""
    return {name: m for name, m in vars(owner).items()
            if isinstance(m, nn.Module) and any(p.requires_grad for p in m.parameters())}


def _trainable_modules(owner) -> list[nn.Module]:
    return list(_trainable_named_modules(owner).values())


def _optimized_module(student: nn.Module, space: ConsistencySpace) -> nn.Module:
    """One module whose named parameters cover the optimiser's (the resume state keys it by these names)."""
    modules = nn.ModuleDict({"student": student})
    if space.parameters():
        modules["consistency_space"] = nn.ParameterList(space.parameters())
    return modules


def _across_ranks(logged: dict[str, float], record_n: list[list[int]], record_loss: list[list[float]],
                  dims: parallel.ParallelDims) -> tuple[dict[str, float], list[int], list[float]]:
    """One step's log over the data-parallel ranks: the mean of every value (the global batch's loss),
    summed sample counts, and the per-sample records in the order one process would draw them."""
    # cp ranks share samples
    gathered = distributed.gather_objects((logged, record_n, record_loss))[::dims.cp]
    keys = dict.fromkeys(key for g in gathered for key in g[0])
    merged = {key: sum(g[0].get(key, 0.0) for g in gathered)
              / (1 if key.startswith("source/") else len(gathered)) for key in keys}
    micro = range(len(record_n))
    return (merged, [n for m in micro for g in gathered for n in g[1][m]],
            [v for m in micro for g in gathered for v in g[2][m]])


# --------------------------------------------------------------------------------------- loop


def train(spec: DistillSpec, backbone: Backbone, source, params: Params, out_dir: str | Path,
          tracker) -> TrainResult:
    """Distil ``spec.student`` for ``spec.train_steps`` steps into ``out_dir`` (resuming from its
    ``resume/``)."""
    return Trainer(spec, backbone, source, params, Path(out_dir), tracker).run()


@dataclass
class _StepLog:
    """One step's log, summed over its micro-batches: loss terms (already divided by grad_accum), sample
    counts per origin, and per micro-batch the drawn grid indices and per-sample losses."""

    values: dict[str, float] = field(default_factory=dict)
    record_n: list[list[int]] = field(default_factory=list)
    record_loss: list[list[float]] = field(default_factory=list)

    def add(self, key: str, value: float) -> None:
        self.values[key] = self.values.get(key, 0.0) + value


class Trainer:
    """One run of the loop.  ``__init__`` builds it (the layout over the ranks, the target network, the
    optimiser, the resume state), ``step`` is one optimisation step, ``run`` resumes and loops, ``finish``
    gathers the weights and writes the summary."""

    def __init__(self, spec: DistillSpec, backbone: Backbone, source, params: Params, out_dir: Path, tracker):
        self.spec, self.backbone, self.source, self.params = spec, backbone, source, params
        self.tracker = tracker
        self.cfg = cfg = params.training
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        # position n + 1 ↔ grid index n
        self.sigmas_ext = torch.as_tensor(_check_grid(source, params), dtype=torch.float32)
        self.allowed_n, self.end_of = phase_tables(spec.phases, len(self.sigmas_ext) - 1)
        if not spec.trainable:
            raise ValueError(f"{spec.name}: no trainable parameters")
        self.names = named_trainable(spec.student, spec.trainable)
        self.device = spec.trainable[0].device
        self.autocast = autocast_for(self.device)
        self.ranks = distributed.world()
        self.dims = dims = parallel.check_world(params, self.ranks.size)
        # None in one process: nothing is wrapped, the run is what it always was
        self.mesh = dims.build_mesh()
        # each data rank computes its slice of one global batch
        self.data_rank, self.data_size = self.ranks.rank // dims.cp, dims.dp_size
        # micro-batches per step: training.grad_accum, or derived from training.global_batch_size
        self.grad_accum = cfg.accumulation(dims.dp_size, self.ranks.size, dims.cp)
        for obj in spec.objectives:  # layouts an objective cannot train under, before any work
            obj.check_parallel(dims)
        # a source that draws for the global batch (DMD2's backward simulation) runs the student alike on
        # every rank
        self.global_source = getattr(source, "draws_global_batch", False)
        self.dropout = cfg.prompt_dropout if spec.prompt_dropout is None else spec.prompt_dropout
        if self.dropout > 0 and self.global_source:
            raise ConfigError("training.prompt_dropout", self.dropout,
                              f"0 for {spec.name}: its batch source draws its own samples for the global "
                              "batch and keeps every prompt")

        # The target network θ⁻: the student itself without grad (official DCM/PCM) or an EMA copy (LCM).
        ema_model = copy.deepcopy(spec.student).requires_grad_(False) if spec.target == "ema" else None
        if cfg.gradient_checkpointing:
            nets = [spec.student, *(net for obj in spec.objectives for net in obj.grad_networks())]
            if not enable_activation_checkpointing(*nets):
                raise ConfigError("training.gradient_checkpointing", True,
                                  f"false for {spec.name}: its student holds no transformer that supports it")
        self.space = spec.consistency_space or ConsistencySpace()
        # after checkpointing and before the wrappers: torchtitan's order (checkpointing, compile, FSDP)
        if cfg.compile and not compile_blocks(*self._networks(spec.student, ema_model)):
            raise ConfigError("training.compile", True,
                              f"false for {spec.name}: its networks hold no diffusers transformer blocks")
        self.student, self.ema_model = self._wrap(ema_model)
        self.cp = self._context_parallel()

        self.trainable = [dict(self.student.named_parameters())[name] for name in self.names]  # wrapped ones
        self.ema_params = ([dict(self.ema_model.named_parameters())[name] for name in self.names]
                           if self.ema_model is not None else [])
        self.target_model = self.ema_model if self.ema_model is not None else self.student
        self.stepped = [*self.trainable, *self.space.parameters()]  # a learnable M trains with the student
        self.optimizer = adamw(self.stepped, lr=spec.lr, betas=ADAM_BETAS, weight_decay=cfg.weight_decay)
        self.sampler = torch.Generator().manual_seed(params.seed)
        self.resume_state = checkpoint.ResumeState(
            out_dir, checkpoint.fingerprint(resume_settings(spec, params, self.data_size)), names=self.names,
            trainable=self.trainable, ema=self.ema_params, optimizer=self.optimizer,
            optimized=_optimized_module(self.student, self.space), objectives=spec.objectives,
            space=self.space,
            sampler=self.sampler, sharded=self.mesh is not None)
        self.history_path = out_dir / HISTORY_FILE
        self.last_checkpoint: str | None = None

    # ------------------------------------------------------------------------------------- build

    def _wrap(self, ema_model: nn.Module | None) -> tuple[nn.Module, nn.Module | None]:
        """Over the ranks (training.parallel): the student sharded or replicated, the EMA copy like it, the
        teacher sharded on request, small trained heads (discriminators, a learnt motion space) replicated."""
        spec, cfg, mesh = self.spec, self.cfg.parallel, self.mesh
        student = parallel.parallelize(spec.student, cfg, mesh)
        if ema_model is not None:
            parallel.parallelize(ema_model, cfg, mesh)
        if cfg.shard_teacher:  # its blocks: feature matching runs the output head outside the forward
            parallel.parallelize(self.backbone.transformer, cfg, mesh, root=False)
        if (mesh is not None and self.dims.sharded and not self.global_source
                and any(value is spec.student for value in vars(self.source).values())):
            raise ConfigError("training.parallel.strategy", cfg.strategy,
                              f"'ddp' for {spec.name}: its batch source runs the student itself (MCM's mixed "
                              "trajectories) on as many samples as each rank draws, and a sharded student "
                              "needs every rank in each forward")
        # trained heads replicated; a network the student's size (DMD2's fake score) sharded
        for obj in spec.objectives:
            obj.parallelize(partial(parallel.parallelize, cfg=cfg, mesh=mesh))
        for net in _trainable_modules(self.space):
            parallel.parallelize(net, cfg, mesh, shard=False)
        return student, ema_model

    def _networks(self, student: nn.Module, ema_model: nn.Module | None) -> list[nn.Module | None]:
        """Every network that may run in a step: the student, the EMA copy, the backbone's (the teacher),
        the batch source's, the objectives' and the consistency space's."""
        return [student, ema_model, *_modules_of(self.backbone), *_modules_of(self.source),
                *(m for obj in self.spec.objectives for m in _modules_of(obj)), *_modules_of(self.space)]

    def _context_parallel(self):
        """Context parallelism (Ulysses, dcm.parallel.context): every transformer that runs forward in a step
        (the student, the EMA copy, the teacher of an online source and of DetE's GAN features, an
        objective's own, e.g. DMD2's fake score) splits its video tokens over the ranks of one "cp" group,
        which share the samples, noise and draws (``data_rank``; objectives draw from the global batch's).
        Each model's output is gathered, so every loss (TC included) sees the whole clip; FSDP2 (over
        dp_shard_cp) and DDP (over every rank) average the gradients over the group, which makes them the
        one-rank gradient."""
        if self.dims.cp <= 1:
            return None
        from dcm.parallel.context import enable_context_parallel_on

        return enable_context_parallel_on(self._networks(self.student, self.ema_model), self.mesh["cp"])

    def resume(self) -> tuple[int, float]:
        """The step to start from and the wall time spent before it (0, 0.0 for a fresh run); the history
        keeps the steps the resume state covers."""
        start, wall_before = 0, 0.0
        loaded = self.resume_state.load(self.spec.train_steps)
        if loaded is not None:
            start, wall_before, self.last_checkpoint = loaded
            print(f"{self.spec.name}: resuming from step {start} ({self.last_checkpoint})")
        if self.ranks.is_main:
            if start:
                _truncate_history(self.history_path, start)
            else:
                self.history_path.unlink(missing_ok=True)
        return start, wall_before

    # ------------------------------------------------------------------------------------- steps

    def run(self) -> TrainResult:
        start, wall_before = self.resume()
        spec = self.spec
        self.student.train()
        t0 = time.perf_counter()
        step_losses: list[float] = []
        bar = tqdm(range(start, spec.train_steps), desc=spec.name, initial=start, total=spec.train_steps,
                   dynamic_ncols=True, disable=not self.ranks.is_main)
        unsent: list[tuple[int, dict[str, float], float]] = []  # steps not yet sent to MLflow
        with open(self.history_path if self.ranks.is_main else os.devnull, "a") as history:
            for step in bar:
                step_t0 = time.perf_counter()
                logged, samples_n, samples_loss = self.step(step)
                step_losses.append(logged["loss"])
                history.write(json.dumps({"step": step, **logged, "step_s": time.perf_counter() - step_t0,
                                          "n": samples_n, "loss_per_sample": samples_loss}) + "\n")
                history.flush()
                unsent.append((step, logged, time.time()))
                bar.set_postfix(loss=f"{logged['loss']:.4g}", gnorm=f"{logged['grad_norm']:.3g}",
                                refresh=False)
                # a multi-rank job: every rank writes its shards
                done = step + 1
                checkpoint = done % self.cfg.checkpoint_every == 0 or done == spec.train_steps
                if checkpoint or done % self.cfg.log_every == 0:  # every step, in batches
                    self.tracker.metric_steps(unsent)
                    unsent.clear()
                if checkpoint and (self.resume_state.sharded or self.ranks.is_main):
                    self.last_checkpoint = self.resume_state.save(done,
                                                                  wall_before + time.perf_counter() - t0)
        bar.close()
        return self.finish(start, wall_before + time.perf_counter() - t0, time.perf_counter() - t0,
                           step_losses)

    def step(self, step: int) -> tuple[dict[str, float], list[int], list[float]]:
        """One optimisation step over ``self.grad_accum`` micro-batches, then clip, AdamW, EMA and the
        objectives' own steps; returns the logged values (the global batch's in a multi-rank run), the
        drawn grid indices and the per-sample losses in the order one process draws them."""
        self.optimizer.zero_grad(set_to_none=True)
        log = _StepLog()
        # a logging step: each term's gradient norm too, unless training.term_grad_norms is off
        term_norms = self.cfg.term_grad_norms and step % self.cfg.log_every == 0
        # the step's global batch drawn at once; micro-batch m of data rank r is its slice m·D + r (D data
        # ranks), so the same samples make each step whatever the rank count and grad_accum
        self.step_draw = draw_indices(len(self.source), self.allowed_n,
                                      self.cfg.batch_size * self.data_size * self.grad_accum, self.sampler)
        micro_batches = [self._micro_step(step, micro, log, term_norms) for micro in range(self.grad_accum)]

        # gradients are already reduced over the ranks by the engine
        grad_norm = parallel.clip_grad_norm_(self.stepped, self.cfg.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"{self.spec.name}: non-finite gradient norm at step {step} (terms "
                                   f"{log.values}); last good checkpoint: {self._last_good()}")
        self.optimizer.step()
        if self.ema_params:
            with torch.no_grad():
                for p_ema, p in zip(self.ema_params, self.trainable, strict=True):
                    p_ema.lerp_(p.detach(), 1.0 - self.cfg.ema_decay)
        self.space.after_optimizer_step()
        for obj in self.spec.objectives:
            for batch in micro_batches:
                for key, value in obj.after_generator_step(batch).items():
                    log.values[f"{obj.name}/{key}"] = float(value)

        if self.ranks.size > 1:  # rank 0 logs the global batch's values
            logged, samples_n, samples_loss = _across_ranks(log.values, log.record_n, log.record_loss,
                                                            self.dims)
        else:
            logged, samples_n, samples_loss = log.values, sum(log.record_n, []), sum(log.record_loss, [])
        logged["grad_norm"] = float(grad_norm)
        return logged, samples_n, samples_loss

    def _draw(self, step: int, micro: int):
        """This rank's share of one micro-batch of the global batch: the source's data and its grid indices n.
        With prompt dropout the rows to drop are drawn first, from the stream the source draws from, and
        the source gives them the empty prompt and the teacher step under it (``dcm.distill.data``)."""
        cfg, data_rank, data_size = self.cfg, self.data_rank, self.data_size
        width = cfg.batch_size * data_size  # one micro-batch over every data rank, cut from the step's draw
        rows, n = (t[micro * width:(micro + 1) * width] for t in self.step_draw)
        source_rng = self.sampler
        mine = slice(data_rank * cfg.batch_size, (data_rank + 1) * cfg.batch_size)  # this rank's rows
        if self.global_source:  # the global batch's draws from the loop's stream, this rank's rows computed
            data = self.source.batch(rows, n, self.sampler, part=(data_rank, data_size))
            return data, n[mine]
        if data_size > 1:  # this rank's slice; its own noise stream, replayable from the step
            rows, n = rows[mine], n[mine]
            seed = hash((self.params.seed, step, micro, data_rank)) % 2**62
            source_rng = torch.Generator().manual_seed(seed)
        if self.dropout > 0:  # no draw at 0: runs without dropout keep their random stream
            drop = torch.rand(len(rows), generator=source_rng) < self.dropout
            return self.source.batch(rows, n, source_rng, drop=drop), n
        return self.source.batch(rows, n, source_rng), n

    def _micro_step(self, step: int, micro: int, log: _StepLog, term_norms: bool) -> ConsistencyBatch:
        """Draw, the student's and the target's endpoints, the loss terms and the backward of one
        micro-batch (scaled by 1/grad_accum); its values go into ``log``."""
        cfg, device = self.cfg, self.device
        data, n = self._draw(step, micro)
        end = self.end_of[n]
        sigma_n, sigma_prev, sigma_end = (self.sigmas_ext[i + 1].to(device) for i in (n, n - 1, end))
        at_boundary = (n - 1 == end).to(device)
        x_end_pred, x_end_target = endpoints(self.backbone, self.student, self.target_model, data, sigma_n,
                                             sigma_prev, sigma_end, at_boundary, self.autocast)
        batch = ConsistencyBatch(step, n, sigma_n, sigma_prev, sigma_end, data.x_n, data.x_prev, data.cond,
                                 x_end_pred, x_end_target, self.autocast, self.data_rank, self.data_size)
        m_pred = self.space.student(x_end_pred)
        with torch.no_grad():
            m_target = self.space.target(x_end_target)
        terms = {"consistency": losses.pseudo_huber(m_pred, m_target, cfg.huber_c)}
        for obj in self.spec.objectives:
            for key, value in obj.generator_loss(batch).items():
                terms[f"{obj.name}/{key}" if key != obj.name else key] = value
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            values = {k: float(v.detach()) for k, v in terms.items()}
            raise TrainingDiverged(f"{self.spec.name}: non-finite loss at step {step} (terms {values}); "
                                   f"last good checkpoint: {self._last_good()}")
        sharded = self.mesh is not None
        if term_norms and not sharded:  # before the backward frees the graph; the mean over micro-batches
            for k, term in terms.items():
                log.add(f"grad_norm/{k}", term_grad_norm(term, self.stepped) / self.grad_accum)
        (loss / self.grad_accum).backward(retain_graph=term_norms and sharded)
        if term_norms and sharded:
            through = [net for obj in self.spec.objectives for net in obj.grad_networks()]
            for k, norm in term_grad_norms_by_backward(terms, self.stepped, self.cp, through).items():
                log.add(f"grad_norm/{k}", norm / self.grad_accum)
        for k, term in terms.items():
            log.add(k, float(term.detach()) / self.grad_accum)
        log.add("loss", float(loss.detach()) / self.grad_accum)
        log.record_n.append(n.tolist())
        per_sample = losses.pseudo_huber_per_sample(m_pred.detach(), m_target, cfg.huber_c)
        log.record_loss.append(per_sample.tolist())
        for origin, count in data.counts.items():  # where the samples came from (MCM's mixed trajectories)
            log.add(f"source/{origin}", count)
        return batch

    def _last_good(self) -> str:
        return self.last_checkpoint or "none (no checkpoint yet)"

    # ------------------------------------------------------------------------------------ finish

    def finish(self, start: int, wall_s: float, run_s: float, step_losses: list[float]) -> TrainResult:
        """After the last step: the models whole again, the weights saved (rank 0, gathered from every rank's
        shards) and ``train.json``; ``run_s`` is this process's share of ``wall_s``."""
        spec, ranks = self.spec, self.ranks
        local_tokens = self.cp.local_tokens if self.cp is not None else None  # video tokens per rank
        if self.cp is not None:  # whatever follows (saving, a stage's own passes) is one rank's
            self.cp.remove()
        if start >= spec.train_steps and start:
            print(f"{spec.name}: already trained {start} steps (>= {spec.train_steps})")
        result = TrainResult(steps=max(start, spec.train_steps), wall_s=wall_s, resumed_from=start,
                             losses=step_losses)
        if ranks.size > 1:
            self._gather_record(local_tokens)
            if not ranks.is_main:
                distributed.barrier()  # rank 0 writes the outputs
                return result
        if spec.save is not None:
            spec.save(self.out_dir)
        io.write_json_atomic(self.out_dir / SUMMARY_FILE, self._summary(start, wall_s, run_s))
        distributed.barrier()
        return result

    def _gather_record(self, local_tokens) -> None:
        """A multi-rank run: every rank's (consolidated) weights and its shard sizes, for the record
        (``distributed.json``, rank 0); rank 0 gets the full weights for the save."""
        names, trainable, spec, dims = self.names, self.trainable, self.spec, self.dims
        # one full tensor at a time (a generator): never every gathered weight of a large student at once
        digests = distributed.gather_objects(
            distributed.parameter_digest(parallel.full_tensor(p) for p in trainable))
        local = distributed.gather_objects(
            {name: parallel.local_numel(p) for name, p in zip(names, trainable, strict=True)})
        trained = {f"{obj.name}.{attr}": net for obj in spec.objectives
                   for attr, net in _trainable_named_modules(obj).items()}
        objective_local = distributed.gather_objects(  # each rank's share of the objectives' trained networks
            {key: sum(parallel.local_numel(p) for p in net.parameters()) for key, net in trained.items()})
        tokens = distributed.gather_objects(local_tokens)
        parallel.gather_full_weights(self.student)
        if not self.ranks.is_main:
            return
        io.write_json_atomic(self.out_dir / DISTRIBUTED_FILE, {
            "world_size": self.ranks.size, "parallel": vars(dims), "parameter_digests": digests,
            "shapes": {name: list(p.shape) for name, p in zip(names, trainable)}, "local_numel": local,
            **({"objective_numel": {key: sum(p.numel() for p in net.parameters())
                                    for key, net in trained.items()},
                "objective_local_numel": objective_local} if trained else {}),
            **({"context_parallel_tokens": tokens} if self.cp is not None else {})})

    def _summary(self, start: int, wall_s: float, run_s: float) -> dict:
        spec, params = self.spec, self.params
        n_trainable = sum(p.numel() for p in self.trainable)
        n_total = sum(p.numel() for p in self.student.parameters())
        ran = spec.train_steps - start
        return {
            "method": spec.name, "steps": max(start, spec.train_steps), "resumed_from": start,
            "wall_s": round(wall_s, 3), "steps_per_s": round(ran / run_s, 4) if ran > 0 else None,
            "peak_rss_mb": round(peak_rss_mb(), 1), "trainable_params": n_trainable, "total_params": n_total,
            "trainable_fraction": n_trainable / max(n_total, 1), "batch_size": params.training.batch_size,
            "grad_accum": self.grad_accum, "target": spec.target, "lr": spec.lr,
            "seed": params.seed,
            "phases": [[p.first, p.last, p.end] for p in spec.phases], "device": str(self.device),
            "final_loss": _last_logged_loss(self.history_path), **_source_counts(self.history_path),
            "world_size": self.ranks.size,
            "global_batch_size": params.training.batch_size * self.data_size * self.grad_accum,
            "parallel": vars(self.dims)}


def save_transformer(model: nn.Module, folder: str = "transformer") -> Callable[[Path], None]:
    """A ``DistillSpec.save`` for a full-parameter student: diffusers ``save_pretrained`` into
    ``<out>/transformer``."""

    def save(out_dir: Path) -> None:
        with io.atomic_dir(Path(out_dir) / folder) as tmp:
            model.save_pretrained(tmp)

    return save

