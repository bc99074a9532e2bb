"""``report``: reports/summary.md + reports/index.html with the method table (the paper's shape), plots,
loss curves, the dynamics figure and a side-by-side video grid of the default DAG's methods; one MLflow
parent run with a child per method.  The ablation rows have their own stage (``report_ablations``)."""

from __future__ import annotations

import shutil

import numpy as np
from safetensors.numpy import load_file

from dcm import paths, tracking
from dcm.config import Params
from dcm.evaluation import reporting
from dcm.io import atomic_dir, read_json
from dcm.pipeline.table import STAGES

GRID_EXAMPLES = 4


def _to_uint8(video: np.ndarray) -> np.ndarray:
    """(N, 3, T, H, W) in [-1, 1] → (N, T, H, W, 3) uint8."""
    v = ((np.asarray(video, dtype=np.float32).clip(-1, 1) + 1) * 127.5).round().astype(np.uint8)
    return v.transpose(0, 2, 3, 4, 1)


def run(params: Params) -> None:
    main_rows = STAGES["evaluate"].methods(params)
    missing = [m for m in main_rows if not paths.metrics(m).is_file()]
    if missing:
        raise FileNotFoundError(f"report: metrics missing for {missing} (run `dcm run evaluate --method M`)")
    evaluated = main_rows
    metrics = {m: read_json(paths.metrics(m)) for m in evaluated}

    with tracking.stage_run(params, "report", param_keys={"methods": ",".join(evaluated)}) as run_, \
            atomic_dir(paths.REPORTS) as out:
        sections, md = [], [f"# {params.experiment}: distillation results\n"]
        protocol = reporting.protocol_note(metrics)
        if protocol:
            md += [f"**{protocol}**\n"]
            sections.append(("Evaluation rows", f"<p><b>{protocol}</b></p>"))
        table = reporting.markdown_table(reporting.method_table(metrics, main_rows))
        legend = ("FD: Fréchet distance to real renders of the same prompts on 26 detector features (lower "
                  "is better; 'FD real vs real' is what real videos score at this sample size). Diversity: "
                  "spread across seeds ÷ the real videos' (1 = as diverse as the data, 0 = collapse).")
        md += ["## Methods (same prompts and seeds for every method; scores ×100)\n", table, "", legend, ""]
        sections.append(("Methods", reporting.markdown_to_html_table(table) + f"<p>{legend}</p>"))
        reporting.bar_plot(reporting.method_table(metrics, main_rows), out / "scores.png",
                           "Total / Quality / Semantic")
        reporting.dimension_plot(metrics, main_rows, out / "dimensions.png")
        sections.append(("Scores", "<img src='scores.png'><img src='dimensions.png'>"))
        md += ["![scores](scores.png)", "![dimensions](dimensions.png)", ""]
        dim_table = reporting.dimension_table(metrics, main_rows)
        md += ["## Per dimension (×100, [95% CI])\n", dim_table, ""]
        sections.append(("Per dimension", reporting.markdown_to_html_table(dim_table)))
        histories = ({str(f.parent.relative_to(paths.CHECKPOINTS)): f
                      for f in sorted(paths.CHECKPOINTS.glob("**/history.jsonl"))}
                     if paths.CHECKPOINTS.is_dir() else {})
        if reporting.loss_curves(histories, out / "losses.png"):
            sections.append(("Training losses", "<img src='losses.png'>"))
            md += ["## Training losses\n", "![losses](losses.png)", ""]
        for fig in sorted(paths.ANALYSIS.glob("*.png")) if paths.ANALYSIS.is_dir() else []:
            shutil.copy(fig, out / f"analysis_{fig.name}")
            note = reporting.analysis_note(fig.with_suffix(".json"))
            sections.append((f"Analysis: {fig.stem}", f"<p>{note}</p><img src='analysis_{fig.name}'>"))
            md += [f"![{fig.stem}](analysis_{fig.name})", note, ""]

        videos = {}
        for m in main_rows:
            file = paths.samples(m) / "videos.safetensors"
            if file.is_file():
                tensors = load_file(str(file))
                videos[m] = _to_uint8(next(iter(tensors.values()))[:GRID_EXAMPLES])
        if videos:
            reporting.video_grid(videos, out / "side_by_side.gif")
            caption = ("columns: " + ", ".join(videos)
                       + "; rows: the first evaluation prompts (same seed per row)")
            sections.append(("Side by side", f"<p>{caption}</p><img src='side_by_side.gif'>"))
            md += ["## Side by side\n", caption, "", "![videos](side_by_side.gif)", ""]

        (out / "summary.md").write_text("\n".join(md) + "\n")
        page = reporting.html_page(f"dcm — {params.experiment}", sections)
        broken = reporting.unresolved_images(page, out)
        if broken:  # every image is a relative path to a file in reports/, or the page would show it broken
            raise RuntimeError(f"report: index.html refers to images that are not in {paths.REPORTS}/: "
                               f"{broken}")
        (out / "index.html").write_text(page)
        for m in evaluated:
            r = metrics[m]
            values = {k: r[k] for k in ("total", "quality", "semantic", "latency_s", "nfe", "fd", "fd_excess",
                                        "diversity") if r.get(k) is not None}
            values.update({f"dim.{k}": v for k, v in r.get("dimensions", {}).items()})
            run_.child(m, values, {"dcm.method": m, "dcm.steps": r.get("steps")})
        run_.metrics({f"{m}.total": metrics[m]["total"] for m in evaluated})
        run_.artifact(out, "reports")
    print(f"report: {paths.REPORTS / 'summary.md'} and {paths.REPORTS / 'index.html'}")
