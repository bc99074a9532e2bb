"""Each loss term's gradient norm before clipping, per training run, from its ``history.jsonl``.

The loop logs ``grad_norm/<term>`` (the norm of that term's gradient alone on the stepped parameters,
before clipping) on logging steps, beside the total ``grad_norm`` (before clipping, as ``clip_grad_norm_``
returns it) and, for DetE, the discriminator's ``gan/d_real`` / ``gan/d_fake``.  This prints one row per run:
medians over the logged steps of the first and of the last third of the run, each term's share against the
consistency term, and D's margin D(real) − D(fake), so one can see whether the adversarial terms steer the
update or ride on it.

    python benchmarks/grad_norms.py checkpoints/dcm/dete [checkpoints/od_pe/dete ...] [--labels a,b,...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HISTORY_FILE = "history.jsonl"


def read_history(run: Path) -> list[dict]:
    path = run / HISTORY_FILE if run.is_dir() else run
    if not path.is_file():
        raise SystemExit(f"{path}: no {HISTORY_FILE} (expected a training output folder such as "
                         "checkpoints/dcm/dete)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per key (each ``grad_norm/<term>``, the total and D's margin): medians over the first and last
    thirds of the logged steps."""
    logged = [r for r in records if any(k.startswith("grad_norm/") for k in r)]
    if not logged:
        raise SystemExit("no grad_norm/<term> entries: the run predates per-term logging or logged no step")
    third = max(1, len(logged) // 3)
    parts = {"first": logged[:third], "last": logged[-third:]}
    keys = sorted({k for r in logged for k in r if k.startswith("grad_norm/")})
    out: dict[str, dict[str, float]] = {}
    for key in [*keys, "grad_norm"]:
        out[key] = {p: float(np.median([r[key] for r in rs if key in r])) for p, rs in parts.items()
                    if any(key in r for r in rs)}
    if any("gan/d_real" in r for r in logged):
        out["d_margin"] = {p: float(np.median([r["gan/d_real"] - r["gan/d_fake"] for r in rs
                                               if "gan/d_real" in r]))
                           for p, rs in parts.items()}
    out["_"] = {"logged": float(len(logged)), "steps": float(max(r["step"] for r in records) + 1)}
    return out


def table(runs: dict[str, dict[str, dict[str, float]]]) -> str:
    terms = sorted({k for s in runs.values() for k in s if k.startswith("grad_norm/")})
    head = ["run", "steps (logged)"]
    for t in terms:
        head += [f"{t.removeprefix('grad_norm/')} first", "last"]
    head += ["÷ consistency (last)", "total before clipping (last)", "D(real) − D(fake) last"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, s in runs.items():
        row = [label, f"{s['_']['steps']:.0f} ({s['_']['logged']:.0f})"]
        for t in terms:
            row += [f"{s[t]['first']:.3g}" if t in s else "", f"{s[t]['last']:.3g}" if t in s else ""]
        base = s.get("grad_norm/consistency", {}).get("last")
        shares = [f"{t.removeprefix('grad_norm/')} {s[t]['last'] / base:.3g}" for t in terms
                  if t in s and t != "grad_norm/consistency" and base]
        row += ["; ".join(shares), f"{s['grad_norm']['last']:.3g}",
                f"{s['d_margin']['last']:+.2g}" if "d_margin" in s else ""]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="training output folders (or history.jsonl files)")
    ap.add_argument("--labels", default=None, help="comma-separated row labels, one per run")
    args = ap.parse_args()
    labels = args.labels.split(",") if args.labels else [str(r) for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"--labels has {len(labels)} labels for {len(args.runs)} runs")
    print(table({label: summarise(read_history(run)) for label, run in zip(labels, args.runs)}))


if __name__ == "__main__":
    main()
