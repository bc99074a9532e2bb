"""Training dynamics of ONE model distilled over the whole trajectory: the paper's motivating figure.

DCM (arXiv 2506.03123, Fig. 2) observes that a single consistency model trained on every timestep
sees very different loss and gradient magnitudes at high and low noise, and splits the trajectory
at κ into two experts.  Here:

1. distil ``analysis.seeds`` full-parameter students over the whole grid (one phase, n ∈ [0, N−1] →
   σ_min), each for ``analysis.train_steps`` steps with the shared loop (``dcm.distill.train``, the
   VCM setting) and its own training seed (``seed`` + k: data order and noise);
2. per grid index n, on a fixed probe batch (the same rows at every n; the same rows and noise for
   every student) measure the consistency loss and the gradient norm ‖∇_θ L_n‖ of each trained student,
   one backward pass per n; the loop's own per-sample (n, loss) records give the loss seen during
   training beside it;
3. propose κ where the discrepancy splits, on the students' pooled curves (the geometric mean over
   seeds), and report what each student alone would propose: the proposal's spread over training seeds.

The κ rule (documented in dynamics.json too): z-score log10 of the probe loss and of the gradient
norm over n, fit both jointly with a two-segment piecewise-constant model — low-noise indices
[0, s−1] and high-noise [s, N−1] — and take the split s with the least squared error (the largest
change point, binary segmentation's first split), each segment at least 10% of the grid (5 of 50
indices: an expert gets a range, not a point).  κ = s − 1, the last index of the detail range (DetE
trains on [0, κ], SemE on [κ+1, N−1]), so κ ∈ [0, N−2] as grid.kappa requires.

Why the minimum segment: the gradient norm falls towards σ_min by construction (the last step's
target is nearly its input), so its first one or two indices sit far below the rest, and an
unconstrained fit can split there instead of where the loss rises.

Why pooled: one student's per-index curves wobble around a slow rise, so a single change point lands
on whichever wobble is largest and moves with the training seed; the geometric mean over several
students' curves averages the wobbles out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dcm.backbones.base import Backbone
from dcm.config import Params
from dcm.distill import losses
from dcm.distill.loop import HISTORY_FILE, DistillSpec, endpoints, train
from dcm.distributed import seed_everything
from dcm.schedule import pcm_phases, teacher_grid

MIN_SEGMENT = 0.1  # each expert's range: at least this fraction of the grid's indices
KAPPA_RULE = ("two-segment piecewise-constant least-squares fit of z-scored log10 probe loss and log10 "
              "gradient norm over the grid index, both the geometric mean over analysis.seeds students, "
              f"each segment at least {MIN_SEGMENT:.0%} of the indices; kappa = last index of the "
              "low-noise segment")
TRAIN_DIR = "train"  # the first student's loop output; student k ≥ 1 trains into train_s<k>


@dataclass
class Dynamics:
    sigmas: np.ndarray  # (N,) σ_n
    probe_loss: np.ndarray  # (N,) consistency loss on the probe batch: geometric mean over the students
    grad_norm: np.ndarray  # (N,) ‖∇θ L_n‖ on the probe batch: geometric mean over the students
    # (N,) mean per-sample loss recorded in the second half of training (nan: unseen)
    train_loss: np.ndarray
    train_count: np.ndarray  # (N,) samples behind train_loss
    proposed_kappa: int
    configured_kappa: int
    seed_probe_loss: np.ndarray | None = None  # (S, N) each student's probe loss
    seed_grad_norm: np.ndarray | None = None  # (S, N) each student's gradient norm
    seed_kappa: tuple[int, ...] = ()  # what the rule proposes on each student's curves alone

    def to_json(self) -> dict:
        def finite(a):
            return [None if not np.isfinite(v) else float(v) for v in a]

        seeds = {} if self.seed_probe_loss is None else {
            "seeds": len(self.seed_probe_loss), "per_seed_proposed_kappa": list(self.seed_kappa),
            "seed_probe_loss": [finite(a) for a in self.seed_probe_loss],
            "seed_grad_norm": [finite(a) for a in self.seed_grad_norm]}
        return {"rule": KAPPA_RULE, "proposed_kappa": self.proposed_kappa,
                "configured_kappa": self.configured_kappa, **seeds,
                "sigma_proposed": float(self.sigmas[self.proposed_kappa]),
                "sigma_configured": float(self.sigmas[self.configured_kappa]),
                "index": list(range(len(self.sigmas))), "sigma": finite(self.sigmas),
                "probe_loss": finite(self.probe_loss), "grad_norm": finite(self.grad_norm),
                "train_loss": finite(self.train_loss), "train_count": [int(c) for c in self.train_count]}


def whole_range_spec(params: Params, student: nn.Module) -> DistillSpec:
    """One model, one phase over the whole grid (n ∈ [0, N−1] → σ_min): the single-model setting."""
    a = params.analysis
    return DistillSpec(name="analyze", student=student, trainable=list(student.parameters()),
                       phases=pcm_phases(params.grid.steps, 1), target=a.target, lr=a.lr,
                       train_steps=a.train_steps, settings={"analysis": True})


def probe(student: nn.Module, backbone: Backbone, source, params: Params, batch: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """Per grid index: consistency loss and gradient norm of ``student`` on the same probe trajectories.

    The loss is the loop's (pseudo-Huber between the student's σ_min endpoint from x_n and the online
    target from the teacher's x_{n−1}); one backward pass per index, so each norm is that index's alone.
    """
    steps = params.grid.steps
    sigmas_ext = torch.as_tensor(
        teacher_grid(steps, params.grid.shift, params.grid.num_train_timesteps).extended, dtype=torch.float32)
    trainable = [p for p in student.parameters() if p.requires_grad]
    device = trainable[0].device
    rows = torch.arange(batch) % len(source)
    loss_at, norm_at = np.zeros(steps), np.zeros(steps)
    student.train()
    for n_index in range(steps):
        n = torch.full((batch,), n_index, dtype=torch.long)
        data = source.batch(rows, n, torch.Generator().manual_seed(params.seed + n_index))
        sigma_n = sigmas_ext[n + 1].to(device)
        sigma_prev = sigmas_ext[n].to(device)
        sigma_end = sigmas_ext[torch.zeros_like(n)].to(device)  # σ_min: the whole range is one phase
        x_end, target = endpoints(backbone, student, student, data, sigma_n, sigma_prev, sigma_end,
                                  (n == 0).to(device))
        loss = losses.pseudo_huber(x_end, target, params.training.huber_c)
        grads = torch.autograd.grad(loss, trainable, allow_unused=True)
        norm_at[n_index] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
        loss_at[n_index] = float(loss.detach())
    return loss_at, norm_at


def training_loss_per_index(history: Path | list[Path], steps: int, from_step: int
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Mean per-sample consistency loss per grid index from the loop's history (steps ≥ from_step); a
    list of histories (one per student) pools their samples."""
    total, count = np.zeros(steps), np.zeros(steps, dtype=int)
    lines = [line for h in ([history] if isinstance(history, Path) else history)
             for line in h.read_text().splitlines()]
    for line in lines:
        rec = json.loads(line)
        if rec["step"] < from_step:
            continue
        for n, value in zip(rec["n"], rec["loss_per_sample"]):
            total[n] += value
            count[n] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan), count


def change_point(curves: np.ndarray, min_size: int = 1) -> int:
    """Split s (min_size ≤ s ≤ N − min_size) minimising the joint two-segment squared error of the rows of
    ``curves`` (K, N): both segments hold at least ``min_size`` indices."""
    curves = np.atleast_2d(np.asarray(curves, dtype=np.float64))
    n = curves.shape[1]
    if min_size < 1 or n < 2 * min_size:
        raise ValueError(f"a change point with segments of at least {min_size} needs at least "
                         f"{2 * max(1, min_size)} grid indices, got {n}")
    costs = []
    for s in range(min_size, n - min_size + 1):
        left, right = curves[:, :s], curves[:, s:]
        costs.append(((left - left.mean(1, keepdims=True)) ** 2).sum()
                     + ((right - right.mean(1, keepdims=True)) ** 2).sum())
    return min_size + int(np.argmin(costs))


def _zscore_log(values: np.ndarray) -> np.ndarray:
    logs = np.log10(np.maximum(np.asarray(values, dtype=np.float64), 1e-30))
    spread = logs.std()
    return (logs - logs.mean()) / spread if spread > 0 else logs * 0.0


def propose_kappa(probe_loss: np.ndarray, grad_norm: np.ndarray) -> int:
    """κ by the documented rule (module docstring): the last index of the low-noise segment."""
    n = len(probe_loss)
    min_size = max(1, math.ceil(MIN_SEGMENT * n))
    return change_point(np.stack([_zscore_log(probe_loss), _zscore_log(grad_norm)]), min_size) - 1


def plot(d: Dynamics, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = np.arange(len(d.sigmas))
    fig, (ax_loss, ax_norm) = plt.subplots(2, 1, figsize=(10.5, 5.5), sharex=True)
    seeds = 1 if d.seed_probe_loss is None else len(d.seed_probe_loss)
    if seeds > 1:
        spread = (f"{min(d.seed_kappa)}–{max(d.seed_kappa)}" if min(d.seed_kappa) != max(d.seed_kappa)
                  else d.seed_kappa[0])
        for k, (a, b) in enumerate(zip(d.seed_probe_loss, d.seed_grad_norm)):
            label = f"each student alone (κ {spread})" if k == 0 else None
            ax_loss.plot(index, a, "-", lw=0.7, color="tab:blue", alpha=0.35, label=label)
            ax_norm.plot(index, b, "-", lw=0.7, color="tab:red", alpha=0.35)
    ax_loss.plot(index, d.probe_loss, "o-", ms=3, color="tab:blue",
                 label=(f"probe batch (geometric mean of {seeds} students)" if seeds > 1
                        else "probe batch (trained student)"))
    seen = np.isfinite(d.train_loss)
    ax_loss.plot(index[seen], d.train_loss[seen], "x", ms=4, alpha=0.7, label="during training (2nd half)")
    ax_loss.set_ylabel("consistency loss")
    ax_norm.plot(index, d.grad_norm, "o-", ms=3, color="tab:red")
    ax_norm.set_ylabel("gradient norm")
    ax_norm.set_xlabel("teacher grid index n (σ_n grows with n; 0 = low noise)")
    for ax in (ax_loss, ax_norm):
        ax.set_yscale("log")
        ax.axvline(d.configured_kappa + 0.5, color="gray", ls="--",
                   label=f"configured κ = {d.configured_kappa}")
        ax.axvline(d.proposed_kappa + 0.5, color="black", ls="-", label=f"proposed κ = {d.proposed_kappa}")
    # beside the axes, never over the data
    ax_loss.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax_loss.set_title(f"{seeds} models, each distilled over the whole trajectory: per-timestep dynamics"
                      if seeds > 1
                      else "one model distilled over the whole trajectory: per-timestep dynamics")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def geometric_mean(curves: np.ndarray) -> np.ndarray:
    """Mean of log10 over the rows of ``curves`` (S, N), back on the linear scale: the pooled curve."""
    return 10 ** np.log10(np.maximum(np.asarray(curves, dtype=np.float64), 1e-30)).mean(axis=0)


def analyze(params: Params, backbone: Backbone, source, new_student: Callable[[], nn.Module],
            out_dir: Path, tracker) -> Dynamics:
    """Train ``analysis.seeds`` whole-range students (``new_student()`` each; student k with seed + k,
    into ``out_dir/train`` and ``out_dir/train_s<k>``), probe each, propose κ on the pooled curves; writes
    dynamics.{json,png}."""
    out_dir = Path(out_dir)
    losses_, norms, histories = [], [], []
    for k in range(params.analysis.seeds):
        seeded = params.with_seed(params.seed + k)
        seed_everything(seeded.seed)
        student = new_student()
        folder = out_dir / (TRAIN_DIR if k == 0 else f"{TRAIN_DIR}_s{k}")
        train(whole_range_spec(seeded, student), backbone, source, seeded, folder, tracker)
        # every student on the same probe batch and noise (params.seed): only the training seed differs
        loss_k, norm_k = probe(student, backbone, source, params, params.analysis.probe_batch)
        losses_.append(loss_k)
        norms.append(norm_k)
        histories.append(folder / HISTORY_FILE)
        del student
    seed_loss, seed_norm = np.stack(losses_), np.stack(norms)
    probe_loss, grad_norm = geometric_mean(seed_loss), geometric_mean(seed_norm)
    train_loss, count = training_loss_per_index(histories, params.grid.steps,
                                                params.analysis.train_steps // 2)
    grid = params.teacher_grid()
    d = Dynamics(sigmas=np.asarray(grid.sigmas), probe_loss=probe_loss, grad_norm=grad_norm,
                 train_loss=train_loss, train_count=count,
                 proposed_kappa=propose_kappa(probe_loss, grad_norm), configured_kappa=params.grid.kappa,
                 seed_probe_loss=seed_loss, seed_grad_norm=seed_norm,
                 seed_kappa=tuple(propose_kappa(a, b) for a, b in zip(seed_loss, seed_norm)))
    (out_dir / "dynamics.json").write_text(json.dumps(d.to_json(), indent=1) + "\n")
    plot(d, out_dir / "dynamics.png")
    return d
