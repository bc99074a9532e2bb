"""``report_ablations``: ablations/summary.md + ablations/index.html, the paper's ablation rows (Table 3:
VCM, +OD, +OD+PE, +OD+PE+TC; MCM's) beside every method of the default DAG, scored the same way
(``make ablations``: ``dvc repro report_ablations``)."""

from __future__ import annotations

from dcm import paths, tracking
from dcm.config import Params
from dcm.evaluation import reporting
from dcm.io import atomic_dir, read_json
from dcm.pipeline import table


def run(params: Params) -> None:
    main_rows = table.STAGES["evaluate"].methods(params)
    ablation_rows = table.ablation_rows(params)  # not the NFE-curve rows: those are in the paper report
    order = main_rows + ablation_rows
    metrics = {m: read_json(paths.metrics(m)) for m in order}
    with tracking.stage_run(params, "report_ablations", param_keys={"methods": ",".join(order)}) as run_, \
            atomic_dir(paths.ABLATIONS) as out:
        rows = reporting.method_table(metrics, order)
        md_table = reporting.markdown_table(rows)
        reporting.bar_plot(rows, out / "scores.png", "Total / Quality / Semantic, ablation rows last")
        protocol = reporting.protocol_note(metrics)
        md = [f"# {params.experiment}: ablations\n", *([f"**{protocol}**\n"] if protocol else []),
              "## Methods and ablation rows (same prompts and seeds for every row; scores ×100)\n", md_table,
              "", "![scores](scores.png)", ""]
        (out / "summary.md").write_text("\n".join(md) + "\n")
        sections = [*([("Evaluation rows", f"<p><b>{protocol}</b></p>")] if protocol else []),
                    ("Ablations", reporting.markdown_to_html_table(md_table)),
                    ("Scores", "<img src='scores.png'>")]
        (out / "index.html").write_text(reporting.html_page(f"dcm — {params.experiment}: ablations",
                                                            sections))
        run_.metrics({f"{m}.total": metrics[m]["total"] for m in order})
        run_.artifact(out, "ablations")
    print(f"report_ablations: {paths.ABLATIONS / 'summary.md'} ({len(ablation_rows)} ablation rows)")
