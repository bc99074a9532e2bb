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

A row without metrics gives *not run*, naming the row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
    """``a`` against ``b`` (row names of params.yaml), as the paper states it in ``text``."""

    text: str
    a: str
    b: str
    kind: Literal["better", "equivalent", "compare"]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"claim {self.text!r}: kind {self.kind!r} is not one of {KINDS}")


@dataclass(frozen=True)
class Difference:
    """The paired Total(a) − Total(b) over ``rows`` shared (prompt, seed) rows: mean and 95% interval."""

    mean: float
    ci95: tuple[float, float]
    rows: int


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

    def line(self, steps: Mapping[str, int] | None = None) -> str:
        """One Markdown line: outcome, claim, and the difference (×100) it was decided on; ``steps`` (row →
        sampling steps, from the metrics) names the step count each row really ran at."""
        c = self.claim
        if self.outcome == NOT_RUN:
            rows = ", ".join(f"`{m}`" for m in self.missing)
            return f"- **{NOT_RUN}** — {c.text}: no metrics for {rows} (`dcm run evaluate --method <row>`)"
        d = self.difference

        def row(m: str) -> str:
            return f"{m}, {steps[m]} steps" if steps and steps.get(m) is not None else m

        values = [100 * d.mean, 100 * d.ci95[0], 100 * d.ci95[1]]
        # two decimals, unless an interval bound would print as ±0.00 while the verdict rests on its sign
        spec = "+.2f" if all(v == 0 or abs(v) >= 0.005 for v in values[1:]) else "+.1e"
        mean, low, high = (format(v, spec) for v in values)
        return (f"- **{self.label}** — {c.text}: Total({row(c.a)}) − Total({row(c.b)}) = {mean} [{low}, {high}] "
                f"over {d.rows} paired rows")


def paired_difference(a_rows: list[Mapping], b_rows: list[Mapping], n: int, seed: int) -> Difference:
    """Total(a) − Total(b) on the (prompt, seed) rows both scored (``per_row`` of the metrics, in a's
    order), with the metrics' bootstrap (``n`` resamples, ``seed``)."""
    b_total = {(r["prompt"], r["seed"]): r.get("total") for r in b_rows}
    delta = [r["total"] - b_total[(r["prompt"], r["seed"])] for r in a_rows
             if r.get("total") is not None and b_total.get((r["prompt"], r["seed"])) is not None]
    if not delta:
        raise ValueError("no (prompt, seed) row scored in both metrics: a paired difference needs shared rows "
                         "(sample every row on the same evaluation set)")
    delta = np.asarray(delta, dtype=float)
    return Difference(float(delta.mean()), bootstrap(delta, np.mean, n, seed), len(delta))


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


def verdict(claim: Claim, metrics: Mapping[str, Mapping], n: int, seed: int,
            margin: float = EQUIVALENCE_MARGIN) -> Verdict:
    """The claim's verdict from ``metrics`` (row name → metrics record with ``per_row``); not run when a
    row has no record."""
    missing = tuple(m for m in (claim.a, claim.b) if m not in metrics)
    if missing:
        return Verdict(claim, NOT_RUN, missing=missing)
    for m in (claim.a, claim.b):
        if not metrics[m].get("per_row"):
            raise ValueError(f"metrics of {m!r} have no 'per_row' scores: a verdict needs the paired rows "
                             f"(re-run `dcm run evaluate --method {m}`)")
    diff = paired_difference(metrics[claim.a]["per_row"], metrics[claim.b]["per_row"], n, seed)
    return Verdict(claim, decide(claim.kind, diff.ci95, margin), diff)
