"""``analyze``: per-timestep loss and gradient-norm dynamics of models distilled over the whole
trajectory (``analysis.seeds`` training seeds), and the κ they propose (``dcm.analysis.dynamics``).

Writes ``analysis/`` — ``dynamics.png`` (the report shows it), ``dynamics.json`` (per-index curves, the
proposed and the configured κ, each student's own proposal, the rule) and ``train/``, ``train_s<k>/``
(each student's loop history and summary) — in one MLflow run.
"""

from __future__ import annotations

from dcm import distill, io, paths, tracking
from dcm.analysis.dynamics import analyze
from dcm.config import Params


def run(params: Params) -> None:
    distill.check_inputs(params)
    backbone = distill.load_backbone(params)
    source = distill.make_source(params, backbone)
    with tracking.stage_run(params, "analyze") as run_, io.atomic_dir(paths.ANALYSIS) as out:
        d = analyze(params, backbone, source, lambda: distill.full_parameter_student(backbone), out, run_)
        run_.metrics({"proposed_kappa": d.proposed_kappa, "configured_kappa": d.configured_kappa,
                      "proposed_kappa_min": min(d.seed_kappa), "proposed_kappa_max": max(d.seed_kappa)})
        run_.artifact(out / "dynamics.png")
        run_.artifact(out / "dynamics.json")
    print(f"analyze: proposed kappa = {d.proposed_kappa} (sigma {d.sigmas[d.proposed_kappa]:.4f}; "
          f"each of the {len(d.seed_kappa)} students alone: {list(d.seed_kappa)})  "
          f"configured grid.kappa = {d.configured_kappa} (sigma {d.sigmas[d.configured_kappa]:.4f})  "
          f"-> {paths.ANALYSIS / 'dynamics.png'}")
