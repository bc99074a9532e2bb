"""Does the teacher's seed move a verdict?  The paper's claims decided on two projects whose teachers differ
only in their training seed, side by side.

Every verdict of ``make paper`` is conditional on one teacher: the intervals cover the evaluation rows and
the students' training seeds, not the teacher (issue 31, item 5).  Run the default rows on a second teacher
(the ``teacher`` stage with another ``seed``; every other stage with the first project's params, so the
students' seeds, the data and the evaluation rows are the same) and give both project folders:

    python benchmarks/teacher_seeds.py PROJECT_A PROJECT_B

For each claim of ``report_paper.CLAIMS`` (and its comparisons) whose rows both projects scored, it prints
the verdict with its control (plain Euler at the claim row's step count) in each project, decided by the
report's rule on each project's own rows (one training seed: the first; a paper project's ``_s<k>`` rows
are not pooled, so both sides are decided alike), and whether the teacher's seed moved it.  Then the
verdicts as A's report decides them (its training seeds pooled) beside the same pooled over both teachers
(``verdicts.teacher_pooled_difference``: each student against its own teacher's rows, the teachers
resampled on top), and each row's Total with its interval in both projects and whether B's lies inside
A's interval.  It writes
nothing; exit status 0 always: the table is the result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dcm import config, paths
from dcm.evaluation.verdicts import controlled_verdict, verdict
from dcm.pipeline.stages.report_paper import CLAIMS, COMPARISONS, euler_rows, labelled


def project(folder: Path) -> tuple[dict[str, dict], dict[int, str], dict[str, int], dict[str, list[str]]]:
    """The folder's metrics by row (every row, a paper project's training-seed rows ``<row>_s<k>`` too), its
    Euler rows by step count, each row's sampling steps, and each row's training-seed rows (itself first)."""
    params = config.load(folder / "params.yaml")
    metrics = {p.stem: json.loads(p.read_text()) for p in sorted((folder / paths.METRICS).glob("*.json"))}
    steps = {**{m: params.methods[m].sample_steps for m in params.methods},
             **{m: r["steps"] for m, r in metrics.items() if r.get("steps") is not None}}
    seeds = {m: params.replicates(m) for m in metrics
             if m in params.methods and not params.methods[m].replicate_of}
    return metrics, euler_rows(params), steps, seeds


def first_seeds(metrics: dict[str, dict], seeds: dict[str, list[str]]) -> dict[str, dict]:
    """``metrics`` less the training-seed rows: each row's first training seed alone."""
    return {m: r for m, r in metrics.items() if m in seeds}


def diff(v) -> str:
    """The verdict's paired difference ×100 with its interval (— where a row did not run)."""
    d = v.difference
    return "—" if d is None else f"{100 * d.mean:+.2f} [{100 * d.ci95[0]:+.2f}, {100 * d.ci95[1]:+.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="project folder of teacher A (e.g. a make paper or make demo run)")
    ap.add_argument("b", type=Path, help="project folder of teacher B (another teacher seed)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    (all_a, ea, sa, seeds_a), (all_b, eb, sb, seeds_b) = project(args.a), project(args.b)
    ma, mb = first_seeds(all_a, seeds_a), first_seeds(all_b, seeds_b)
    n, seed = args.bootstrap, 0

    print(f"teacher A: {args.a}   teacher B: {args.b}   ({n} bootstrap resamples, paired rows, one "
          "training seed each)\n")
    print("| claim | A: verdict (control) | A: difference ×100 | B: verdict (control) | B: difference ×100 "
          "| moved? |")
    print("|---|---|---|---|---|---|")
    moved = 0
    both = [c for c in CLAIMS if all(m in ma and m in mb for m in (c.a, c.b))]
    for claim in both:
        va = controlled_verdict(claim, ma, n, seed, ea, sa)
        vb = controlled_verdict(claim, mb, n, seed, eb, sb)
        same = (va.label, va.control_label) == (vb.label, vb.control_label)
        moved += not same
        print(f"| {claim.text} | {va.label} ({va.control_label}) | {diff(va.verdict)} | "
              f"{vb.label} ({vb.control_label}) | {diff(vb.verdict)} | "
              f"{'no' if same else '**yes**'} |")
    comparisons = [c for c in COMPARISONS if all(m in ma and m in mb for m in (c.a, c.b))]
    for claim in comparisons:
        va, vb = verdict(labelled(claim, ma), ma, n, seed), verdict(labelled(claim, mb), mb, n, seed)
        same = va.label == vb.label
        moved += not same
        print(f"| {va.claim.text} | {va.label} | {diff(va)} | {vb.label} | {diff(vb)} | "
              f"{'no' if same else '**yes**'} |")
    print(f"\nverdicts (or controls) the teacher's seed moved: {moved}\n")

    # what make paper reports (A, its training seeds pooled) against the same pooled over both teachers
    print(f"pooled: A with its training seeds (as its report decides) against A and B pooled over the two "
          f"teachers (each teacher's own training seeds; {n} resamples)\n")
    print("| claim | A: verdict (control) | A: difference ×100 | A + B: verdict (control) "
          "| A + B: difference ×100 | pairs (A + B) | moved? |")
    print("|---|---|---|---|---|---|---|")
    pooled_moved = 0
    for claim in both:
        va = controlled_verdict(claim, all_a, n, seed, ea, sa, seeds=seeds_a)
        vp = controlled_verdict(claim, [all_a, all_b], n, seed, ea, sa, seeds=[seeds_a, seeds_b])
        same = (va.label, va.control_label) == (vp.label, vp.control_label)
        pooled_moved += not same
        print(f"| {claim.text} | {va.label} ({va.control_label}) | {diff(va.verdict)} | {vp.label} "
              f"({vp.control_label}) | {diff(vp.verdict)} | {vp.verdict.pairing_text()} | "
              f"{'no' if same else '**yes**'} |")
    for claim in comparisons:
        va = verdict(labelled(claim, all_a), all_a, n, seed, seeds=seeds_a)
        vp = verdict(labelled(claim, all_a), [all_a, all_b], n, seed, seeds=[seeds_a, seeds_b])
        same = va.label == vp.label
        pooled_moved += not same
        print(f"| {va.claim.text} | {va.label} | {diff(va)} | {vp.label} | {diff(vp)} | "
              f"{vp.pairing_text()} | {'no' if same else '**yes**'} |")
    print(f"\nverdicts (or controls) pooling the second teacher moved: {pooled_moved}\n")

    print("| row | A: Total ×100 [95% CI] | B: Total ×100 [95% CI] | B inside A's interval? |")
    print("|---|---|---|---|")
    for m in (r for r in ma if r in mb):
        (ta, (lo, hi)), tb = (ma[m]["total"], ma[m]["total_ci95"]), mb[m]
        inside = lo <= tb["total"] <= hi
        print(f"| {m} | {100 * ta:.2f} [{100 * lo:.2f}, {100 * hi:.2f}] | {100 * tb['total']:.2f} "
              f"[{100 * tb['total_ci95'][0]:.2f}, {100 * tb['total_ci95'][1]:.2f}] | "
              f"{'yes' if inside else '**no**'} |")


if __name__ == "__main__":
    main()
