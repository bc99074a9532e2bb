"""The paper's claims as verdicts computed from paired intervals, never typed in.

A claim compares the Total of two rows of the comparison (``metrics/<row>.json``) over the same
(prompt, seed) evaluation rows: the paired per-row difference Total(a) − Total(b), its mean and its 95%
bootstrap interval (``dcm.evaluation.scoring.bootstrap``, as ``Total − teacher`` in the metrics).

- ``a > b`` (kind ``better``): *holds* if the interval lies above 0, *does not hold* if it lies below 0,
  *inconclusive* otherwise.
- ``a ≈ b`` (kind ``equivalent``, the student matches its teacher): *holds* if the interval reaches 0 or
  lies above it (upper bound ≥ 0) and its lower bound is above −``EQUIVALENCE_MARGIN``; *does not hold*
  if it lies wholly below −``EQUIVALENCE_MARGIN``; *inconclusive* otherwise, including an interval
  inside (−margin, 0): worse than b for sure, by less than the margin.
- ``a vs b`` (kind ``compare``, not a claim of the paper): the ``better`` rule, worded as which row
  scores higher.

A claim compares Total unless it names another ``score`` of the per-row records (a shapes-bench
dimension, e.g. ``imaging_quality``), with the same rules.  A row without metrics gives *not run*,
naming the row.

When a row was trained with several seeds (`paper.seeds`: rows ``<row>_s<k>``), the difference pools them
with a hierarchical bootstrap (:func:`hierarchical_difference`): every resample draws the evaluation rows
(shared by both sides, so the pairing stays) and, independently for each side, its training seeds, both
with replacement; the estimate is the mean over seeds and rows of each side.  The interval then covers
the retraining spread as well as the choice of evaluation rows.  With one training seed per side it is
the paired row bootstrap above, to the digit.

Every such verdict is conditional on one teacher.  Given one project per teacher seed (the same evaluation
rows, students distilled from each project's own teacher), :func:`teacher_pooled_difference` adds a level
on top: each resample draws the rows once, each teacher's training seeds, then the teachers with
replacement; the difference stays within a teacher (a student against its own teacher's rows).  With one
teacher it is :func:`hierarchical_difference`, to the digit.

Controls (:func:`controlled_verdict`): a claim about a distilled row ``a`` sampled at k steps is decided
again with ``a`` replaced by the teacher sampled with plain Euler at k steps (the row ``Euler-k``, no
distillation): *Euler-k ≈ b* for ``a ≈ b``, *Euler-k > b* for ``a > b``, same rules and intervals.  A
claim that holds while its control holds too is marked *holds, but so does Euler-k (no distillation)*:
the comparison does not tell distillation apart from sampling the teacher in as few steps.  Beside it,
Total(a) − Total(Euler-k) says whether the distilled row beats plain Euler at its own step count.  No
Euler row at k with metrics: *control not run (<row>)*.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from dcm.evaluation.scoring import bootstrap

# 1 point of Total (×100): wider than the paper's own "≈" gaps (DCM-4 0.04 below HunyuanVideo's
# teacher-50, 0.60 below CogVideoX's), narrower than the gaps it reports as wins (DCM over PCM: 2.90).
EQUIVALENCE_MARGIN = 0.01

HOLDS, DOES_NOT_HOLD, INCONCLUSIVE, NOT_RUN = "holds", "does not hold", "inconclusive", "not run"
KINDS = ("better", "equivalent", "compare")


@dataclass(frozen=True)
class Claim:
    """``a`` against ``b`` (row names of params.yaml) on ``score`` (a key of the per-row records), as the
    paper states it in ``text``."""

    text: str
    a: str
    b: str
    kind: Literal["better", "equivalent", "compare"]
    score: str = "total"

    @property
    def score_name(self) -> str:
        return "Total" if self.score == "total" else self.score

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"claim {self.text!r}: kind {self.kind!r} is not one of {KINDS}")


@dataclass(frozen=True)
class Difference:
    """The paired Total(a) − Total(b) over ``rows`` shared (prompt, seed) rows: mean and 95% interval."""

    mean: float
    ci95: tuple[float, float]
    rows: int
    seeds: tuple[int, int] = (1, 1)  # training seeds pooled on each side (a, b), over all teachers
    teachers: int = 1  # teachers (teacher seeds) pooled, each with its own students


def row_at(row: str, steps: Mapping[str, int | None] | None) -> str:
    """``row`` with the step count it sampled at, ``dcm, 4 steps``, where ``steps`` (row → steps) knows it."""
    return f"{row}, {steps[row]} steps" if steps and steps.get(row) is not None else row


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    outcome: str  # HOLDS, DOES_NOT_HOLD, INCONCLUSIVE or NOT_RUN
    difference: Difference | None = None
    missing: tuple[str, ...] = ()  # the rows without metrics (outcome NOT_RUN)

    @property
    def label(self) -> str:
        """The outcome as the report prints it (a comparison says which row scores higher)."""
        if self.claim.kind != "compare" or self.outcome == NOT_RUN:
            return self.outcome
        return {HOLDS: f"{self.claim.a} higher", DOES_NOT_HOLD: f"{self.claim.b} higher"}.get(
            self.outcome, INCONCLUSIVE)

    def interval_text(self) -> str:
        """The difference (×100) the outcome was decided on with its 95% interval, ``+0.44 [-0.23, +1.40]``;
        for a claim not run, the rows without metrics."""
        if self.outcome == NOT_RUN:
            rows = [m.partition(" (") for m in self.missing]  # `dcm` (teacher 1)
            return "no metrics for " + ", ".join(f"`{row}`" + (f" ({where}" if where else "")
                                                 for row, _, where in rows)
        d = self.difference
        values = [100 * d.mean, 100 * d.ci95[0], 100 * d.ci95[1]]
        # two decimals, unless an interval bound would print as ±0.00 while the verdict rests on its sign
        spec = "+.2f" if all(v == 0 or abs(v) >= 0.005 for v in values[1:]) else "+.1e"
        mean, low, high = (format(v, spec) for v in values)
        return f"{mean} [{low}, {high}]"

    def pairing_text(self) -> str:
        """The paired rows behind the difference, and the training seeds pooled on each side."""
        d = self.difference
        one_each = (d.teachers, d.teachers)  # one training seed per side and teacher
        seeds = f" × training seeds {d.seeds[0]} vs {d.seeds[1]}" if d.seeds != one_each else ""
        teachers = f" in all, over {d.teachers} teachers" if d.teachers > 1 and seeds else (
            f", over {d.teachers} teachers" if d.teachers > 1 else "")
        return f"{d.rows} paired rows{seeds}{teachers}"

    def difference_text(self, steps: Mapping[str, int | None] | None = None) -> str:
        """The difference (×100) the outcome was decided on, naming each row's step count (``steps``: row →
        sampling steps, from the metrics) and the paired rows; for a claim not run, the rows without
        metrics."""
        if self.outcome == NOT_RUN:
            return self.interval_text()
        c = self.claim
        return (f"{c.score_name}({row_at(c.a, steps)}) − {c.score_name}({row_at(c.b, steps)}) = "
                f"{self.interval_text()} over {self.pairing_text()}")

    def line(self, steps: Mapping[str, int | None] | None = None) -> str:
        """One Markdown line: outcome, claim, and the difference (×100) it was decided on; ``steps`` (row →
        sampling steps, from the metrics) names the step count each row really ran at."""
        if self.outcome == NOT_RUN:
            return (f"- **{NOT_RUN}** — {self.claim.text}: {self.difference_text()} "
                    f"(`dcm run evaluate --method <row>`)")
        return f"- **{self.label}** — {self.claim.text}: {self.difference_text(steps)}"


@dataclass(frozen=True)
class Controlled:
    """A claim's verdict beside its control (module docstring): ``control`` is the claim with ``euler`` (the
    teacher sampled with plain Euler at ``steps``, the step count of the claim's row a) in place of a, and
    ``gain`` compares a with ``euler``.  Both are None when no Euler row is known at ``steps`` or the claim
    names that row itself."""

    verdict: Verdict
    steps: int | None
    euler: str | None
    control: Verdict | None = None
    gain: Verdict | None = None

    @property
    def control_holds(self) -> bool:
        return self.control is not None and self.control.outcome == HOLDS

    @property
    def label(self) -> str:
        """The claim's outcome, or *holds, but so does Euler-k (no distillation)* when its control holds."""
        if self.verdict.outcome == HOLDS and self.verdict.claim.kind != "compare" and self.control_holds:
            return f"{HOLDS}, but so does Euler-{self.steps} (no distillation)"
        return self.verdict.label

    @property
    def control_label(self) -> str:
        """The control's outcome, worded for the report."""
        if self.euler is None:
            return ("no control (the row's step count is unknown)" if self.steps is None
                    else f"no control (no Euler row at {self.steps} steps)")
        if self.control is None:
            return f"no control (the claim compares {self.euler} itself)"
        if self.control.outcome == NOT_RUN:
            return f"control not run ({', '.join(self.control.missing)})"
        return self.control.label


def paired_difference(a_rows: list[Mapping], b_rows: list[Mapping], n: int, seed: int,
                      score: str = "total") -> Difference:
    """Total(a) − Total(b) (or another ``score``) on the (prompt, seed) rows both scored (``per_row`` of the
    metrics, in a's order), with the metrics' bootstrap (``n`` resamples, ``seed``)."""
    b_total = {(r["prompt"], r["seed"]): r.get(score) for r in b_rows}
    delta = [r[score] - b_total[(r["prompt"], r["seed"])] for r in a_rows
             if r.get(score) is not None and b_total.get((r["prompt"], r["seed"])) is not None]
    if not delta:
        raise ValueError("no (prompt, seed) row scored in both metrics: a paired difference needs shared "
                         "rows (sample every row on the same evaluation set)")
    delta = np.asarray(delta, dtype=float)
    return Difference(float(delta.mean()), bootstrap(delta, np.mean, n, seed), len(delta))


def _shared_totals(sets: list[list[Mapping]], missing: str, score: str = "total") -> tuple[int, np.ndarray]:
    """(rows, totals (len(sets), rows)): each training seed's Total (or ``score``) on the (prompt, seed) rows
    every one of ``sets`` scored, in the first set's order; ``missing`` is the error when there is none."""
    tables = [{(r["prompt"], r["seed"]): r[score] for r in rows if r.get(score) is not None} for rows in sets]
    keys = [k for k in tables[0] if all(k in t for t in tables[1:])] if tables else []
    if not keys:
        raise ValueError(missing)
    return len(keys), np.array([[t[k] for k in keys] for t in tables], dtype=float)


def _resampled_means(totals: np.ndarray, rows: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """Per resample j: each seed's mean over the drawn rows ``rows[j]``, then the mean over the drawn seeds
    ``pick[j]`` — the two-level bootstrap statistic of ``totals`` (seeds, rows)."""
    return totals[:, rows].mean(-1)[pick.T, np.arange(len(rows))].mean(0)


def hierarchical_difference(a_sets: list[list[Mapping]], b_sets: list[list[Mapping]], n: int, seed: int,
                            score: str = "total") -> Difference:
    """Total(a) − Total(b) pooled over training seeds: ``a_sets`` / ``b_sets`` hold each training seed's
    ``per_row`` scores.  Estimate: mean over a's seeds and the shared rows minus the same for b; interval:
    95% percentile of ``n`` two-level resamples (module docstring), seeded by ``seed``.  One seed on each
    side is :func:`paired_difference`.  ``score``: the per-row key compared (Total by default)."""
    if not a_sets or not b_sets:
        raise ValueError("a difference needs at least one training seed on each side")
    if len(a_sets) == len(b_sets) == 1:
        return paired_difference(a_sets[0], b_sets[0], n, seed, score)
    count, totals = _shared_totals([*a_sets, *b_sets], "no (prompt, seed) row scored in every training "
                                   "seed's metrics: a paired difference needs shared rows (sample every row "
                                   "on the same evaluation set)", score)
    a, b = totals[:len(a_sets)], totals[len(a_sets):]
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, count, (n, count))  # shared by both sides: the difference stays paired
    lo, hi = np.percentile(_resampled_differences(a, b, rows, rng), [2.5, 97.5])
    return Difference(float(a.mean() - b.mean()), (float(lo), float(hi)), count, (len(a), len(b)))


def _resampled_differences(a: np.ndarray, b: np.ndarray, rows: np.ndarray,
                           rng: np.random.Generator) -> np.ndarray:
    """Per resample (``rows``: the drawn rows of each): a's mean minus b's, each side's training seeds drawn
    with replacement (a's, then b's, from ``rng``)."""
    n = len(rows)
    pick_a, pick_b = rng.integers(0, len(a), (n, len(a))), rng.integers(0, len(b), (n, len(b)))
    return _resampled_means(a, rows, pick_a) - _resampled_means(b, rows, pick_b)


def teacher_pooled_difference(teachers: Sequence[tuple[list[list[Mapping]], list[list[Mapping]]]], n: int,
                              seed: int, score: str = "total") -> Difference:
    """Total(a) − Total(b) pooled over teachers: ``teachers[t]`` holds teacher t's ``(a_sets, b_sets)``, the
    training seeds of its own rows a and b.  Estimate: the mean over teachers of each teacher's difference
    (:func:`hierarchical_difference`'s); interval: every resample draws the shared rows once, within each
    teacher both sides' training seeds, and then the teachers with replacement, so a and b stay paired by
    teacher (a student is compared with rows of its own teacher).  One teacher is
    :func:`hierarchical_difference`, to the digit."""
    if len(teachers) == 1:
        return hierarchical_difference(*teachers[0], n, seed, score)
    if any(not a or not b for a, b in teachers):
        raise ValueError("a difference needs at least one training seed on each side of every teacher")
    missing = ("no (prompt, seed) row scored in every teacher's and training seed's metrics: a paired "
               "difference needs shared rows (every project on the same evaluation set)")
    count, totals = _shared_totals([s for a, b in teachers for s in (*a, *b)], missing, score)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, count, (n, count))
    within, estimates, start = [], [], 0
    for a_sets, b_sets in teachers:
        a = totals[start:start + len(a_sets)]
        b = totals[start + len(a_sets):start + len(a_sets) + len(b_sets)]
        start += len(a_sets) + len(b_sets)
        within.append(_resampled_differences(a, b, rows, rng))
        estimates.append(a.mean() - b.mean())
    pick = rng.integers(0, len(teachers), (n, len(teachers)))
    values = np.stack(within)[pick.T, np.arange(n)].mean(0)
    lo, hi = np.percentile(values, [2.5, 97.5])
    seeds = (sum(len(a) for a, _ in teachers), sum(len(b) for _, b in teachers))
    return Difference(float(np.mean(estimates)), (float(lo), float(hi)), count, seeds, len(teachers))


def pooled_total(sets: list[list[Mapping]], n: int,
                 seed: int) -> tuple[float, tuple[float, float], list[float]]:
    """One row's Total over its training seeds (each seed's ``per_row``): the mean over seeds and the rows
    every seed scored, its 95% two-level bootstrap interval (rows, then seeds, as
    :func:`hierarchical_difference`) and each seed's own mean."""
    count, totals = _shared_totals(sets, "no (prompt, seed) row scored in every training seed's metrics")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, count, (n, count))
    pick = rng.integers(0, len(totals), (n, len(totals)))
    lo, hi = np.percentile(_resampled_means(totals, rows, pick), [2.5, 97.5])
    return float(totals.mean()), (float(lo), float(hi)), [float(v) for v in totals.mean(1)]


def decide(kind: str, ci95: tuple[float, float], margin: float = EQUIVALENCE_MARGIN) -> str:
    """The outcome of a claim of ``kind`` from the 95% interval of its difference (module docstring)."""
    lo, hi = ci95
    if kind in ("better", "compare"):
        return HOLDS if lo > 0 else DOES_NOT_HOLD if hi < 0 else INCONCLUSIVE
    if kind == "equivalent":
        if hi >= 0 and lo > -margin:
            return HOLDS
        return DOES_NOT_HOLD if hi < -margin else INCONCLUSIVE
    raise ValueError(f"claim kind {kind!r} is not one of {KINDS}")


def verdict(claim: Claim, metrics: Mapping[str, Mapping] | Sequence[Mapping[str, Mapping]], n: int, seed: int,
            margin: float = EQUIVALENCE_MARGIN,
            seeds: Mapping[str, list[str]] | Sequence[Mapping[str, list[str]]] | None = None) -> Verdict:
    """The claim's verdict from ``metrics`` (row name → metrics record with ``per_row``); not run when a
    row has no record.  ``seeds`` (row → its training-seed rows, itself first) pools the seeds that have
    metrics with :func:`hierarchical_difference`.  A list of ``metrics`` (and of ``seeds``) is one project
    per teacher seed, pooled with :func:`teacher_pooled_difference`; a row missing in any of them: not run,
    the row named with the teacher that lacks it where it is not the first (``dcm (teacher 1)``: the list's
    second project, the report's teachers/s1/)."""
    projects = [metrics] if isinstance(metrics, Mapping) else list(metrics)
    seed_maps = [seeds] if seeds is None or isinstance(seeds, Mapping) else list(seeds)
    seed_maps = seed_maps * len(projects) if len(seed_maps) == 1 else seed_maps
    missing = tuple(dict.fromkeys(m if m not in projects[0] or k == 0 else f"{m} (teacher {k})"
                                  for k, p in enumerate(projects) for m in (claim.a, claim.b) if m not in p))
    if missing:
        return Verdict(claim, NOT_RUN, missing=missing)
    teachers = []
    for project, seed_map in zip(projects, seed_maps, strict=True):
        sides = [[r for r in (seed_map or {}).get(m, [m]) if r in project] or [m] for m in (claim.a, claim.b)]
        for m in (r for side in sides for r in side):
            if not project[m].get("per_row"):
                raise ValueError(f"metrics of {m!r} have no 'per_row' scores: a verdict needs the paired "
                                 f"rows (re-run `dcm run evaluate --method {m}`)")
        teachers.append(tuple([project[r]["per_row"] for r in side] for side in sides))
    diff = teacher_pooled_difference(teachers, n, seed, claim.score)
    return Verdict(claim, decide(claim.kind, diff.ci95, margin), diff)


def controlled_verdict(claim: Claim, metrics: Mapping[str, Mapping] | Sequence[Mapping[str, Mapping]], n: int,
                       seed: int, euler: Mapping[int, str], steps: Mapping[str, int | None],
                       margin: float = EQUIVALENCE_MARGIN,
                       seeds: Mapping[str, list[str]] | Sequence[Mapping[str, list[str]]] | None = None,
                       ) -> Controlled:
    """The claim's verdict with its control (module docstring).  ``euler``: sampling steps → the row that
    samples the teacher with plain Euler at that many steps; ``steps``: row → its sampling steps (the
    metrics' where it ran).  The control replaces the claim's row a by ``euler[steps[a]]``; the gain is
    a against that row (kind ``compare``).  Both decided as :func:`verdict`, with its ``n``, ``seed``,
    ``margin`` and ``seeds``; a list of ``metrics`` pools teachers as there."""
    main = verdict(claim, metrics, n, seed, margin, seeds)
    k = steps.get(claim.a)
    row = euler.get(k) if k is not None else None
    if row is None or row in (claim.a, claim.b):
        return Controlled(main, k, row)
    control = replace(claim, text=f"{claim.text} (control: Euler-{k} in place of {claim.a})", a=row)
    gain = Claim(f"{claim.a} vs Euler-{k}", claim.a, row, "compare", claim.score)
    return Controlled(main, k, row, verdict(control, metrics, n, seed, margin, seeds),
                      verdict(gain, metrics, n, seed, margin, seeds))
