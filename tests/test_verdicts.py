"""The claims' verdicts come from paired intervals over per-row scores: each outcome of each claim type,
decided on hand-made rows whose difference is known."""

from __future__ import annotations

import numpy as np
import pytest

from dcm.evaluation.verdicts import (
    DOES_NOT_HOLD,
    EQUIVALENCE_MARGIN,
    HOLDS,
    INCONCLUSIVE,
    NOT_RUN,
    Claim,
    controlled_verdict,
    decide,
    hierarchical_difference,
    paired_difference,
    pooled_total,
    teacher_pooled_difference,
    verdict,
)

ROWS = 64
BETTER = Claim("A > B", "a", "b", "better")
EQUIVALENT = Claim("A ≈ B", "a", "b", "equivalent")
COMPARE = Claim("A vs B", "a", "b", "compare")


def per_row(totals) -> list[dict]:
    return [{"prompt": f"prompt {i // 2}", "seed": i % 2, "total": float(t)} for i, t in enumerate(totals)]


def metrics_with_difference(shift: float, spread: float) -> dict[str, dict]:
    """Rows b around 0.85, rows a = b + shift + a zero-mean ±spread pattern (so the mean difference is
    shift)."""
    b = 0.85 + 0.05 * np.random.default_rng(0).standard_normal(ROWS)
    a = b + shift + spread * np.tile([1.0, -1.0], ROWS // 2)
    return {"a": {"per_row": per_row(a)}, "b": {"per_row": per_row(b)}}


def outcome(claim: Claim, shift: float, spread: float) -> str:
    return verdict(claim, metrics_with_difference(shift, spread), n=200, seed=0).outcome


def test_better_holds_fails_or_is_inconclusive_by_where_the_interval_lies():
    assert outcome(BETTER, +0.02, 0.01) == HOLDS
    assert outcome(BETTER, -0.02, 0.01) == DOES_NOT_HOLD
    assert outcome(BETTER, 0.0, 0.05) == INCONCLUSIVE


def test_equivalence_holds_within_the_margin_and_fails_wholly_below_it():
    assert outcome(EQUIVALENT, 0.0, 0.002) == HOLDS
    assert outcome(EQUIVALENT, +0.03, 0.002) == HOLDS  # better than b: not worse by the margin
    assert outcome(EQUIVALENT, -3 * EQUIVALENCE_MARGIN, 0.002) == DOES_NOT_HOLD
    assert outcome(EQUIVALENT, -EQUIVALENCE_MARGIN, 0.02) == INCONCLUSIVE  # straddles -margin
    # worse than b for sure, by less than the margin: the rule asks the interval to reach 0
    assert outcome(EQUIVALENT, -EQUIVALENCE_MARGIN / 2, 0.001) == INCONCLUSIVE


def test_a_comparison_says_which_row_scores_higher():
    labels = [verdict(COMPARE, metrics_with_difference(shift, spread), n=200, seed=0).label
              for shift, spread in ((0.02, 0.01), (-0.02, 0.01), (0.0, 0.05))]
    assert labels == ["a higher", "b higher", INCONCLUSIVE]


def test_decide_reads_only_the_interval():
    assert decide("better", (0.001, 0.02)) == HOLDS
    assert decide("better", (-0.02, -0.001)) == DOES_NOT_HOLD
    assert decide("better", (-0.001, 0.02)) == INCONCLUSIVE
    assert decide("equivalent", (-0.009, 0.001), margin=0.01) == HOLDS
    assert decide("equivalent", (-0.03, -0.011), margin=0.01) == DOES_NOT_HOLD
    assert decide("equivalent", (-0.012, 0.001), margin=0.01) == INCONCLUSIVE
    with pytest.raises(ValueError, match="'bigger' is not one of"):
        decide("bigger", (0.0, 1.0))


def test_a_missing_row_is_not_run_and_named():
    v = verdict(BETTER, {"b": {"per_row": per_row([0.8] * 4)}}, n=50, seed=0)
    assert v.outcome == NOT_RUN and v.missing == ("a",)
    assert "**not run**" in v.line() and "`a`" in v.line()


def test_rows_are_paired_by_prompt_and_seed_not_by_position():
    metrics = metrics_with_difference(0.02, 0.0)
    b_rows = metrics["b"]["per_row"]
    shuffled = [b_rows[i] for i in np.random.default_rng(1).permutation(len(b_rows))]
    diff = paired_difference(metrics["a"]["per_row"], shuffled, n=100, seed=0)
    assert diff.rows == ROWS
    assert diff.mean == pytest.approx(0.02)
    assert diff.ci95 == pytest.approx((0.02, 0.02))  # the same shift on every row: no spread to resample


def test_rows_without_a_shared_prompt_and_seed_are_an_error():
    with pytest.raises(ValueError, match="no \\(prompt, seed\\) row scored in both"):
        paired_difference(per_row([0.8]), [{"prompt": "other", "seed": 0, "total": 0.7}], n=10, seed=0)


def test_the_line_states_the_difference_and_the_rows_step_counts():
    v = verdict(BETTER, metrics_with_difference(0.02, 0.0), n=50, seed=0)
    assert v.line({"a": 4, "b": 50}) == ("- **holds** — A > B: Total(a, 4 steps) − Total(b, 50 steps) = "
                                         "+2.00 [+2.00, +2.00] over 64 paired rows")


def test_an_unknown_claim_kind_is_refused_when_the_claim_is_made():
    with pytest.raises(ValueError, match="kind 'similar' is not one of"):
        Claim("A ~ B", "a", "b", "similar")


def test_a_verdict_on_a_tiny_difference_never_prints_its_interval_as_zero():
    """A +0.00 [+0.00, +0.00] beside 'holds' would hide the sign the verdict rests on: tiny values in
    e-notation."""
    v = verdict(BETTER, metrics_with_difference(2e-6, 0.0), n=50, seed=0)
    assert v.outcome == "holds"
    assert v.line().endswith("= +2.0e-04 [+2.0e-04, +2.0e-04] over 64 paired rows")


# ------------------------------------------------------------------------------------ training seeds


def test_one_training_seed_each_is_the_paired_row_bootstrap_to_the_digit():
    m = metrics_with_difference(0.01, 0.02)
    assert hierarchical_difference([m["a"]["per_row"]], [m["b"]["per_row"]], 200, 0) == \
        paired_difference(m["a"]["per_row"], m["b"]["per_row"], 200, 0)


def test_the_pooled_difference_covers_the_spread_between_training_seeds():
    """Three retrained a's, 2 points apart: the estimate is their mean's difference, the interval grows
    past what the rows alone give, and it stays paired (b's row noise cancels)."""
    m = metrics_with_difference(0.01, 0.0)
    a = np.array([r["total"] for r in m["a"]["per_row"]])
    seeds_a = [per_row(a + offset) for offset in (-0.02, 0.0, 0.02)]
    one = hierarchical_difference([m["a"]["per_row"]], [m["b"]["per_row"]], 500, 0)
    pooled = hierarchical_difference(seeds_a, [m["b"]["per_row"]], 500, 0)
    assert pooled.mean == pytest.approx(0.01) and pooled.seeds == (3, 1) and pooled.rows == ROWS
    assert one.ci95[1] - one.ci95[0] < 1e-9  # a − b is the same 0.01 on every row
    assert pooled.ci95[0] < 0.0 < 0.01 < pooled.ci95[1]  # the seed spread alone makes the interval
    claim = Claim("A > B", "a", "b", "better")
    metrics = {"a": m["a"], "a_s1": {"per_row": seeds_a[0]}, "a_s2": {"per_row": seeds_a[2]}, "b": m["b"]}
    assert verdict(claim, metrics, 500, 0).outcome == HOLDS  # one run: a is better on every row
    pooled_verdict = verdict(claim, metrics, 500, 0, seeds={"a": ["a", "a_s1", "a_s2"], "b": ["b"]})
    assert pooled_verdict.outcome == INCONCLUSIVE and "training seeds 3 vs 1" in pooled_verdict.line()


def test_training_seeds_share_only_the_rows_every_seed_scored():
    m = metrics_with_difference(0.01, 0.0)
    shorter = m["a"]["per_row"][: ROWS // 2]
    d = hierarchical_difference([m["a"]["per_row"], shorter], [m["b"]["per_row"]], 100, 0)
    assert d.rows == ROWS // 2
    with pytest.raises(ValueError, match="every training seed"):
        hierarchical_difference([m["a"]["per_row"], [{"prompt": "elsewhere", "seed": 9, "total": 1.0}]],
                                [m["b"]["per_row"]], 100, 0)


def test_one_teacher_is_the_training_seed_bootstrap_to_the_digit():
    m = metrics_with_difference(0.01, 0.02)
    seeds_a = [m["a"]["per_row"], per_row([r["total"] + 0.01 for r in m["a"]["per_row"]])]
    assert teacher_pooled_difference([(seeds_a, [m["b"]["per_row"]])], 200, 0) == \
        hierarchical_difference(seeds_a, [m["b"]["per_row"]], 200, 0)
    assert verdict(BETTER, [m], 200, 0) == verdict(BETTER, m, 200, 0)


def test_pooling_teachers_keeps_a_and_b_paired_within_a_teacher_and_covers_their_spread():
    """Two teachers whose rows all sit 3 points apart (teacher B's rows and students higher): a − b is
    +1 point within each, so the pooled difference is +1 with a tight interval (pairing by teacher removes
    the teachers' offset).  Teachers whose a − b differ (+1 and −1) give 0 with an interval from −1 to +1."""
    m = metrics_with_difference(0.01, 0.0)
    a, b = (np.array([r["total"] for r in m[k]["per_row"]]) for k in ("a", "b"))
    teacher_a = {"a": {"per_row": per_row(a)}, "b": {"per_row": per_row(b)}}
    teacher_b = {"a": {"per_row": per_row(a + 0.03)}, "b": {"per_row": per_row(b + 0.03)}}
    same = verdict(BETTER, [teacher_a, teacher_b], 400, 0)
    assert same.difference.mean == pytest.approx(0.01) and same.difference.teachers == 2
    assert same.difference.ci95[1] - same.difference.ci95[0] < 1e-9 and same.outcome == HOLDS
    assert same.line().endswith("over 64 paired rows, over 2 teachers")

    flipped = {"a": {"per_row": per_row(b - 0.01)}, "b": {"per_row": per_row(b)}}
    split = verdict(BETTER, [teacher_a, flipped], 400, 0)
    assert split.difference.mean == pytest.approx(0.0, abs=1e-12)
    assert split.difference.ci95 == pytest.approx((-0.01, 0.01)) and split.outcome == INCONCLUSIVE
    lacking = verdict(BETTER, [teacher_a, {"b": teacher_a["b"]}], 400, 0)
    assert lacking.missing == ("a (teacher 1)",)
    assert lacking.interval_text() == "no metrics for `a` (teacher 1)"
    assert verdict(BETTER, [{"b": teacher_a["b"]}, {"b": teacher_a["b"]}], 400, 0).missing == ("a",)
    seeds = [{"a": ["a", "a_s1"], "b": ["b"]}, {"a": ["a"], "b": ["b"]}]
    pooled = verdict(BETTER, [{**teacher_a, "a_s1": teacher_a["a"]}, teacher_b], 400, 0, seeds=seeds)
    assert pooled.line().endswith("over 64 paired rows × training seeds 3 vs 2 in all, over 2 teachers")


def test_pooled_total_is_the_mean_over_seeds_with_each_seeds_own_mean():
    base = 0.8 + 0.01 * np.random.default_rng(1).standard_normal(ROWS)
    mean, (lo, hi), per_seed = pooled_total([per_row(base + d) for d in (-0.01, 0.0, 0.01)], 300, 0)
    assert mean == pytest.approx(base.mean())
    assert per_seed == pytest.approx([base.mean() - 0.01, base.mean(), base.mean() + 0.01])
    assert lo < base.mean() - 0.003 and hi > base.mean() + 0.003  # wider than the rows' own ±0.0025



# ------------------------------------------------------------------------------------ Euler controls


def control_metrics(euler_shift: float | None) -> dict[str, dict]:
    """a = b + 0.02 on every row (a > b and a ≈ b both hold); the Euler row e = b + ``euler_shift`` (None:
    not run)."""
    m = metrics_with_difference(0.02, 0.0)
    if euler_shift is not None:
        b = np.array([r["total"] for r in m["b"]["per_row"]])
        m["e"] = {"per_row": per_row(b + euler_shift)}
    return m


@pytest.mark.parametrize("claim", [BETTER, EQUIVALENT])
def test_a_claim_its_euler_control_also_satisfies_is_marked_as_such(claim):
    """Euler at a's step count in place of a: the claim keeps its outcome, the label says no distillation
    does as well; the gain is a against the Euler row."""
    c = controlled_verdict(claim, control_metrics(0.01), 100, 0, euler={4: "e"}, steps={"a": 4, "b": 50})
    assert c.verdict.outcome == HOLDS and c.control.outcome == HOLDS
    assert (c.control.claim.a, c.control.claim.b, c.control.claim.kind) == ("e", "b", claim.kind)
    assert c.label == "holds, but so does Euler-4 (no distillation)" and c.control_label == HOLDS
    assert c.gain.difference.mean == pytest.approx(0.01) and (c.gain.claim.a, c.gain.claim.b) == ("a", "e")


def test_a_claim_whose_euler_control_fails_keeps_a_bare_holds():
    c = controlled_verdict(BETTER, control_metrics(-0.01), 100, 0, euler={4: "e"}, steps={"a": 4})
    assert c.verdict.outcome == HOLDS and c.control.outcome == DOES_NOT_HOLD
    assert c.label == HOLDS and c.control_label == DOES_NOT_HOLD


def test_a_control_without_its_euler_row_says_which_row_is_missing():
    c = controlled_verdict(BETTER, control_metrics(None), 100, 0, euler={4: "e"}, steps={"a": 4})
    assert c.label == HOLDS and c.control.outcome == NOT_RUN and c.control_label == "control not run (e)"
    c = controlled_verdict(BETTER, control_metrics(0.01), 100, 0, euler={4: "e"}, steps={"a": 2})
    assert c.control is None and c.label == HOLDS
    assert c.control_label == "no control (no Euler row at 2 steps)"
