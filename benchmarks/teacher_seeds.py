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
are not pooled, so both sides are decided alike), and whether the teacher's seed moved it.  Then each
row's Total with its interval in both projects and whether B's lies inside A's interval.  It writes
nothing; exit status 0 always: the table is the result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dcm import config, paths
from dcm.evaluation.verdicts import controlled_verdict, verdict
from dcm.pipeline.stages.report_paper import CLAIMS, COMPARISONS, euler_rows, labelled


def project(folder: Path) -> tuple[dict[str, dict], dict[int, str], dict[str, int]]:
    """The folder's metrics by row (less a paper project's training-seed rows ``<row>_s<k>``), its Euler
    rows by step count and each row's sampling steps."""
    params = config.load(folder / "params.yaml")
    replicas = {m for m, row in params.methods.items() if row.replicate_of}
    metrics = {p.stem: json.loads(p.read_text()) for p in sorted((folder / paths.METRICS).glob("*.json"))
               if p.stem not in replicas}
    steps = {**{m: params.methods[m].sample_steps for m in params.methods},
             **{m: r["steps"] for m, r in metrics.items() if r.get("steps") is not None}}
    return metrics, euler_rows(params), steps


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
    (ma, ea, sa), (mb, eb, sb) = project(args.a), project(args.b)
    n, seed = args.bootstrap, 0

    print(f"teacher A: {args.a}   teacher B: {args.b}   ({n} bootstrap resamples, paired rows, one "
          "training seed each)\n")
    print("| claim | A: verdict (control) | A: difference ×100 | B: verdict (control) | B: difference ×100 "
          "| moved? |")
    print("|---|---|---|---|---|---|")
    moved = 0
    for claim in CLAIMS:
        if not all(m in ma and m in mb for m in (claim.a, claim.b)):
            continue
        va = controlled_verdict(claim, ma, n, seed, ea, sa)
        vb = controlled_verdict(claim, mb, n, seed, eb, sb)
        same = (va.label, va.control_label) == (vb.label, vb.control_label)
        moved += not same
        print(f"| {claim.text} | {va.label} ({va.control_label}) | {diff(va.verdict)} | "
              f"{vb.label} ({vb.control_label}) | {diff(vb.verdict)} | "
              f"{'no' if same else '**yes**'} |")
    for claim in COMPARISONS:
        if all(m in ma and m in mb for m in (claim.a, claim.b)):
            va, vb = verdict(labelled(claim, ma), ma, n, seed), verdict(labelled(claim, mb), mb, n, seed)
            same = va.label == vb.label
            moved += not same
            print(f"| {va.claim.text} | {va.label} | {diff(va)} | {vb.label} | {diff(vb)} | "
                  f"{'no' if same else '**yes**'} |")
    print(f"\nverdicts (or controls) the teacher's seed moved: {moved}\n")

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
