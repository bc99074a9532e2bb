"""Score methods on the validation split: choose hyperparameters without looking at the eval numbers.

The DAG reports every method on the eval rows of ``data/prompts.json``.  Choosing a loss weight, κ or
budget by those same numbers would select on the test set.  This script samples the *validation* rows
(``dcm.data.prompts.validation_rows``: the same shape as the eval rows, other captions order and
seeds in a range used by nothing else) with each trained method and the teacher, scores them with the
shapes-bench exactly as ``evaluate`` does (videos rounded through float16 as ``sample`` stores them),
and prints one row per method with 95% bootstrap intervals and the paired difference to the teacher.
It writes nothing.  Run it in a project whose methods are trained (after ``dvc repro`` or the
``train_*`` stages); candidate settings are extra methods in ``params.yaml`` (``ablation: true``).

    python benchmarks/validate.py --methods dcm,dcm_g01 [--preset P] [--params params.yaml]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from dcm import config, paths
from dcm.backbones import load_teacher
from dcm.config import ConfigError
from dcm.data.prompts import validation_rows
from dcm.evaluation.metrics import match_rate, row_totals, score_rows
from dcm.evaluation.scoring import bootstrap
from dcm.methods import generate
from dcm.paths import weights_paths

TEACHER = "teacher"
SHOWN = ("imaging_quality", "motion_smoothness", "subject_consistency", "object_class")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", required=True, help="comma-separated trained methods of params.methods")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--preset", default=None)
    args = ap.parse_args()

    params = config.load(args.params, preset=args.preset)
    if params.backbone.family != "toy":
        raise ConfigError("backbone.family", params.backbone.family,
                          "toy: the shapes-bench scores the shapes world")
    methods = [m for m in dict.fromkeys(x.strip() for x in args.methods.split(",")) if m and m != TEACHER]
    for m in methods:
        params.method(m)  # unknown names fail here, with the allowed ones
        missing = [p for p in weights_paths(params, m) if not Path(p).exists()]
        if missing:
            raise ConfigError(f"--methods {m}", missing, "trained weights: run its training stages first")
    if not paths.TEACHER.exists():
        raise ConfigError("models/teacher", str(paths.TEACHER),
                          "a saved teacher: run `dcm run teacher` first")

    rows = validation_rows(params)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_teacher(params, paths.TEACHER).to(device)
    n, seed = params.evaluation.bootstrap, params.seed

    def scored(method: str) -> tuple[list[dict], np.ndarray]:
        _, videos, *_ = generate(params, method, backbone, rows, desc=f"validate[{method}]")
        # as sample stores, evaluate reads
        scores = score_rows(params, rows, videos.to(torch.float16).float())
        return scores, row_totals(scores)

    def ci(values: np.ndarray) -> str:
        lo, hi = bootstrap(values, np.mean, n, seed)
        return f"[{100 * lo:.1f}, {100 * hi:.1f}]"

    teacher_scores, teacher_totals = scored(TEACHER)
    print(f"validation split: {len(rows)} rows ({params.world.eval_prompts} captions × "
          f"{params.world.eval_seeds} seeds ≥ {min(r['seed'] for r in rows)}), shapes-bench, "
          f"{n} bootstrap resamples")
    print("| method | Total [95% CI] | Total − teacher [95% CI] | match | " + " | ".join(SHOWN) + " |")
    print("|---|---|---|---|" + "---|" * len(SHOWN))
    for m in [TEACHER, *methods]:
        scores, totals = (teacher_scores, teacher_totals) if m == TEACHER else scored(m)
        diff = totals - teacher_totals
        dims = " | ".join(f"{100 * np.mean([s[d] for s in scores]):.1f}" for d in SHOWN)
        print(f"| {m} | {100 * totals.mean():.1f} {ci(totals)} | {100 * diff.mean():+.1f} {ci(diff)} | "
              f"{100 * match_rate(scores):.0f}% | {dims} |")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # bad input: one line naming the key, before any sampling
        raise SystemExit(f"validate.py: {err}") from None
