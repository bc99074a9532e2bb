"""Teacher timestep grid, the κ split into expert phases, PCM phases and student sampling schedules.

Flow matching throughout: x_σ = (1−σ)·x0 + σ·ε, t = 1000·σ (METHODS.md).  The teacher grid is the
subsampled set of the scheduler's training sigmas, σ_0 < … < σ_{N−1} = 1, with the end point σ_min
(the smallest training sigma) below σ_0.  Grid index n = −1 stands for σ_min everywhere, so a
phase whose end is −1 ends at σ_min.  Every index range, the routing threshold and the inference
schedule are derived here from (steps, shift, κ) instead of being hard-coded.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from numbers import Real

import numpy as np

SIGMA_MIN_INDEX = -1


def noised(x0, noise, sigma):
    """Forward noising of flow matching, x_σ = (1 − σ)·x0 + σ·ε (``sigma`` a float or broadcastable
    tensor)."""
    return (1.0 - sigma) * x0 + sigma * noise


def training_sigmas(num_train_timesteps: int, shift: float) -> np.ndarray:
    """The ``num_train_timesteps`` (1000 for every family here) training sigmas of diffusers'
    FlowMatchEulerDiscreteScheduler(shift), ascending."""
    s = np.arange(1, num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    return shift * s / (1.0 + (shift - 1.0) * s)


@dataclass(frozen=True)
class TeacherGrid:
    """σ_0 < … < σ_{N−1} = 1 plus σ_min; ``sigma(n)`` accepts n = −1 for σ_min."""

    sigmas: np.ndarray  # ascending, length N
    sigma_min: float

    @property
    def steps(self) -> int:
        return len(self.sigmas)

    def sigma(self, n: int) -> float:
        if n == SIGMA_MIN_INDEX:
            return self.sigma_min
        if not 0 <= n < self.steps:
            raise IndexError(f"grid index {n} outside [-1, {self.steps - 1}]")
        return float(self.sigmas[n])

    @property
    def extended(self) -> np.ndarray:
        """[σ_min, σ_0, …, σ_{N−1}] ascending: the points a stored trajectory holds (position n + 1)."""
        return np.concatenate([[self.sigma_min], self.sigmas])


def teacher_grid(steps: int, shift: float, num_train_timesteps: int = 1000) -> TeacherGrid:
    """Every (num_train/steps)-th training sigma: index i ↔ ascending position stride·(i+1) − 1."""
    if steps < 1 or num_train_timesteps % steps:
        raise ValueError(f"grid steps must divide num_train_timesteps ({num_train_timesteps}), got {steps}")
    train = training_sigmas(num_train_timesteps, shift)
    stride = num_train_timesteps // steps
    positions = stride * (np.arange(steps) + 1) - 1
    return TeacherGrid(sigmas=train[positions], sigma_min=float(train[0]))


def boundary_index(grid: TeacherGrid, boundary_t: float) -> int:
    """The κ of a two-expert teacher's boundary on ``grid``: the largest n whose model timestep 1000·σ_n is
    below ``boundary_t`` (where ``WanPipeline`` runs its low-noise expert), so SemE's phase [κ+1, N−1] is
    the high-noise expert's and DetE's [0, κ] the low-noise expert's."""
    below = [n for n in range(grid.steps) if 1000.0 * grid.sigma(n) < boundary_t]
    if not below:
        raise ValueError(f"no grid point lies below the boundary t = {boundary_t:g}")
    return max(below)


@dataclass(frozen=True)
class Phase:
    """A consistency phase: start indices n ∈ [first, last], all mapped to the phase end ``end``."""

    first: int
    last: int
    end: int

    def __post_init__(self) -> None:
        if not (self.end < self.first <= self.last):
            raise ValueError(f"invalid phase: end {self.end} must be < first {self.first} <= last "
                             f"{self.last}")

    def __contains__(self, n: int) -> bool:
        return self.first <= n <= self.last

    @property
    def size(self) -> int:
        return self.last - self.first + 1


def phases_from_ends(ends: list[int], steps: int) -> list[Phase]:
    """Phases between consecutive ends, ascending: ends [−1, 11, 24, 36] → n ∈ [0,11], [12,24], …,
    [37, N−1]."""
    bounds = sorted(ends) + [steps - 1]
    return [Phase(first=e + 1, last=bounds[i + 1], end=e) for i, e in enumerate(bounds[:-1])]


def expert_phases(steps: int, kappa: int) -> dict[str, Phase]:
    """The κ split: SemE on n ∈ [κ+1, N−1] ending at σ_κ; DetE on n ∈ [0, κ] ending at σ_min."""
    if not 0 <= kappa < steps - 1:
        raise ValueError(f"kappa must lie in [0, {steps - 2}], got {kappa}")
    dete, seme = phases_from_ends([SIGMA_MIN_INDEX, kappa], steps)
    return {"seme": seme, "dete": dete}


def pcm_phases(steps: int, num_phases: int) -> list[Phase]:
    """PCM: phase starts floor(linspace(0, N, K, endpoint=False)); K = 4, N = 50 → starts
    [0, 12, 25, 37]."""
    if not 1 <= num_phases <= steps:
        raise ValueError(f"num_phases must lie in [1, {steps}], got {num_phases}")
    starts = np.floor(np.linspace(0, steps, num_phases, endpoint=False)).astype(int)
    return phases_from_ends([int(s) - 1 for s in starts], steps)


def phase_of(phases: list[Phase], n: int) -> Phase:
    for phase in phases:
        if n in phase:
            return phase
    raise IndexError(f"grid index {n} is in no phase")


def split_points(first_index: int, end_index: int, count: int) -> list[int]:
    """``count`` grid indices evenly from ``first_index`` down towards ``end_index`` (end excluded).

    SemE [49 → 37] in 2 steps gives [49, 43]; DetE [37 → −1] in 2 steps gives [37, 18]: the
    official HunyuanVideo 4-step sigmas [1.0, 0.992, 0.9818, 0.9124] at shift 17.
    """
    if not 1 <= count <= first_index - end_index:
        raise ValueError(f"cannot place {count} steps on grid indices {first_index} down to "
                         f"{end_index + 1}")
    points = np.linspace(first_index, end_index, count + 1)[:-1]
    indices = [int(np.floor(p + 0.5)) for p in points]
    # rounding may collide when steps are dense: keep them strictly decreasing
    for k in range(1, count):
        indices[k] = min(indices[k], indices[k - 1] - 1)
    return indices


@dataclass(frozen=True)
class SamplingStep:
    sigma: float
    expert: str  # "seme", "dete", or the name of a single model ("student", "teacher")


def expert_schedule(grid: TeacherGrid, kappa: int, steps: int) -> list[SamplingStep]:
    """DCM schedule: half the steps (rounded up) for SemE from σ_{N−1} to σ_κ, the rest for DetE to
    σ_min."""
    if steps < 2:
        raise ValueError(f"a dual-expert schedule needs at least 2 steps, got {steps}")
    n_seme = (steps + 1) // 2
    seme = split_points(grid.steps - 1, kappa, n_seme)
    dete = split_points(kappa, SIGMA_MIN_INDEX, steps - n_seme)
    return ([SamplingStep(grid.sigma(n), "seme") for n in seme]
            + [SamplingStep(grid.sigma(n), "dete") for n in dete])


def phase_schedule(grid: TeacherGrid, phases: list[Phase], expert: str = "student") -> list[SamplingStep]:
    """Multistep sampling at phase edges (PCM/LCM): one step from the top of each phase, highest
    first."""
    tops = sorted({p.last for p in phases}, reverse=True)
    return [SamplingStep(grid.sigma(n), expert) for n in tops]


def uniform_schedule(grid: TeacherGrid, steps: int, expert: str = "teacher") -> list[SamplingStep]:
    """``steps`` grid points evenly from σ_{N−1} down towards σ_min; steps = N gives the full teacher
    grid."""
    if steps == grid.steps:
        return [SamplingStep(float(s), expert) for s in grid.sigmas[::-1]]
    return [SamplingStep(grid.sigma(n), expert)
            for n in split_points(grid.steps - 1, SIGMA_MIN_INDEX, steps)]


def explicit_schedule(pairs: Sequence[Sequence], num_train_timesteps: int = 1000,
                      experts: Collection[str] | None = None) -> list[SamplingStep]:
    """Sampling steps from an explicit list of ``[t, expert]`` pairs, σ = t / num_train_timesteps.

    The official lists as data (METHODS.md, Inference), e.g. Wan's ``[[1000, "seme"], [992, "seme"],
    [982, "seme"], [949, "dete"], [905, "dete"], [810, "dete"]]``.  Checked: at least one pair; each
    a ``[t, expert]`` pair with 0 < t ≤ num_train_timesteps and a non-empty expert name (one of
    ``experts`` when given); t strictly decreasing; each expert's steps contiguous (an expert that
    hands over never takes the trajectory back).  Errors name the pair's position and value.
    """
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs:
        raise ValueError(f"a schedule is a non-empty list of [t, expert] pairs, got {pairs!r}")
    allowed = None if experts is None else set(experts)
    steps: list[SamplingStep] = []
    finished: set[str] = set()
    for i, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"schedule[{i}] = {pair!r}: expected a [t, expert] pair")
        t, expert = pair
        if isinstance(t, bool) or not isinstance(t, Real) or not 0 < float(t) <= num_train_timesteps:
            raise ValueError(f"schedule[{i}] = {list(pair)!r}: t must be a number in "
                             f"(0, {num_train_timesteps}]")
        if not isinstance(expert, str) or not expert:
            raise ValueError(f"schedule[{i}] = {list(pair)!r}: the expert must be a non-empty name")
        if allowed is not None and expert not in allowed:
            raise ValueError(f"schedule[{i}] = {list(pair)!r}: expert {expert!r} is not one of "
                             f"{sorted(allowed)}")
        if steps and float(t) / num_train_timesteps >= steps[-1].sigma:
            raise ValueError(f"schedule[{i}] = {list(pair)!r}: t must decrease strictly "
                             f"(previous t = {steps[-1].sigma * num_train_timesteps:g})")
        if steps and expert != steps[-1].expert:
            finished.add(steps[-1].expert)
        if expert in finished:
            raise ValueError(f"schedule[{i}] = {list(pair)!r}: {expert!r} already handed over to another "
                             "expert (each expert's steps must be contiguous)")
        steps.append(SamplingStep(float(t) / num_train_timesteps, expert))
    return steps
