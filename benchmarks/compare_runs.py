"""Two runs of the same DAG side by side: per method, the headline figures of ``metrics/<method>.json``
in each run and whether the second run's value lies inside the first run's 95% interval.

For a change meant to keep every result (a faster kernel that rounds differently, another machine):

    python benchmarks/compare_runs.py BEFORE_DIR AFTER_DIR [--methods teacher lcm ...]

BEFORE_DIR and AFTER_DIR are project folders after ``make demo`` (or ``make paper``); methods default to
those both have.  Exit status 0 always: the table is the result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dcm import paths

# (label, how to read value and interval from a metrics record, scale for printing)
FIGURES = (
    ("Total ×100", lambda r: (r["total"], r["total_ci95"]), 100),
    ("Total − teacher ×100 (paired)", lambda r: (r["diff_vs_teacher"]["total"]["mean"],
                                                 r["diff_vs_teacher"]["total"]["ci95"]), 100),
    ("FD to real", lambda r: (r["fd"], r["fd_ci95"]), 1),
    ("diversity", lambda r: (r["diversity"], r["diversity_ci95"]), 1),
)


def load(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((folder / paths.METRICS).glob("*.json"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--methods", nargs="*")
    args = ap.parse_args()
    before, after = load(args.before), load(args.after)
    methods = args.methods or [m for m in before if m in after]
    inside = 0
    for label, read, scale in FIGURES:
        print(f"\n{label}: method | before [95% CI] | after [95% CI] | after inside before's interval")
        for m in methods:
            (b, b_ci), (a, a_ci) = read(before[m]), read(after[m])
            ok = b_ci[0] <= a <= b_ci[1]
            inside += ok
            print(f"  {m:10s} | {b * scale:8.2f} [{b_ci[0] * scale:.2f}, {b_ci[1] * scale:.2f}]"
                  f" | {a * scale:8.2f} [{a_ci[0] * scale:.2f}, {a_ci[1] * scale:.2f}] | "
                  f"{'yes' if ok else 'NO'}")
    print(f"\n{inside} of {len(FIGURES) * len(methods)} figures of the second run lie inside the "
          "first run's 95% intervals")


if __name__ == "__main__":
    main()
