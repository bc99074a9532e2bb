"""``report_paper``: paper/summary.md + paper/index.html (``make paper``: ``dcm repro report report_paper``).

In order: the paper's claims as the first table, each with a verdict computed from the paired 95%
intervals (``dcm.evaluation.verdicts``; pooled over a row's training seeds, `paper.seeds`, by a hierarchical
bootstrap, and with `paper.teachers` > 1 over the teachers of ``teachers/s<k>/``, stage ``teachers``) and
beside it its control, the same claim with the teacher sampled by plain Euler at the claim's
step count in place of the distilled row (``CURVES["teacher (Euler)"]``), and DMD2 against DCM as a
comparison; each family's Total and FD excess at 1, 2 and 4 steps (``STEP_COUNTS``), one row per family of
``CURVES``; the coverage of open attributes (the metrics' ``open_world`` block, where the world has open
prompts); each row's Total per training seed; the headline tables at 2 and 4 steps; Total, FD excess
and diversity against NFE, one line per method; MCM's claims in its own setting (stage ``mcm_setting``:
``mcm_setting/metrics/``); the ablation table.  A row the claims or curves name that has no metrics is
reported as not run.
"""

from __future__ import annotations

import dataclasses
import html

from dcm import paths, tracking
from dcm.config import ConfigError, Params
from dcm.evaluation import reporting
from dcm.evaluation.results_block import shown_name
from dcm.evaluation.verdicts import (
    EQUIVALENCE_MARGIN,
    NOT_RUN,
    Claim,
    Controlled,
    Verdict,
    controlled_verdict,
    pooled_total,
    row_at,
    verdict,
)
from dcm.io import atomic_dir, read_json
from dcm.pipeline.table import STAGES, curve_rows, paper_rows

TEACHER = "teacher"
# The paper's claims (arXiv 2506.03123: the HunyuanVideo table and the ablation table) on params.yaml's rows.
CLAIMS = (
    Claim("DCM-4 ≈ teacher-50", "dcm", TEACHER, "equivalent"),
    Claim("DCM-4 > PCM-4", "dcm", "pcm", "better"),
    Claim("PCM-4 > LCM-4", "pcm", "lcm", "better"),
    Claim("ablation: + trajectory split helps (OD > VCM)", "od", "vcm", "better"),
    Claim("ablation: + parameter-efficient DetE helps (OD+PE > OD)", "od_pe", "od", "better"),
    Claim("ablation: + temporal coherence helps (OD+PE+TC > OD+PE)", "od_pe_tc", "od_pe", "better"),
    Claim("ablation: + GAN and feature matching help (DCM > OD+PE+TC)", "dcm", "od_pe_tc", "better"),
)
COMPARISONS = (Claim("DCM vs DMD2 at 4 steps (a comparison, not a claim of the paper)", "dcm", "dmd2",
                     "compare"),)
# MCM's own claims (arXiv 2406.06890) in its own setting (stage mcm_setting: a teacher that learnt from
# low-quality videos), on mcm_setting/metrics/: not claims of the DCM paper.
MCM_CLAIMS = (
    Claim("MCM-4 > LCM-4, both distilled from the low-quality teacher (MCM's claim)", "mcm", "lcm", "better"),
    Claim("MCM-4's frames sharper than its low-quality teacher-50's (MCM's claim: high-quality stills lift "
          "frame quality)", "mcm", TEACHER, "better", score="imaging_quality"),
    Claim("MCM-4 ≈ its low-quality teacher-50", "mcm", TEACHER, "equivalent"),
)
# Each method's rows at several step counts (params.yaml): one line per method in the curves.
CURVES = {
    "teacher (Euler)": ["euler1", "euler2", "euler4", "euler8", "euler16", TEACHER],
    "LCM": ["lcm1", "lcm2", "lcm", "lcm8"],
    "PCM": ["pcm2", "pcm"],
    "DCM": ["dcm2", "dcm", "dcm8"],
    "DMD2": ["dmd2_1", "dmd2_2", "dmd2"],
    "MCM": ["mcm"],
}
HEADLINE_STEPS = (2, 4)
STEP_COUNTS = (1, 2, 4)  # the columns of the quality-at-steps table
STEPS_TABLE_IF_RUN = ("MCM",)  # families the steps table lists only where one of their rows ran
# the coverage table's rows (those that ran): the teacher, plain Euler at 4 steps, each method's 4-step row
COVERAGE_ROWS = (TEACHER, "euler4", "lcm", "pcm", "dcm", "dmd2", "mcm")
COVERAGE_NOTE = (
    "TV excess: the total-variation distance between an open attribute's detected values, over the rows "
    "whose prompt leaves it open, and those of real renders of the same prompts, less the real-vs-real "
    "floor: ≈ 0 is the data's coverage, > 0 coverage lost (up to 1 − 1/K for a collapse onto one of K "
    "values). Averaged-mode share: the share of videos flagged as blends, ghosts or smears (a clean "
    "render: 0). 95% bootstrap intervals; docs/shapes-world.md explains both.")
CONTROL_RULE = (
    "Control: each claim is decided again, by the same rule, with its distilled row a replaced by the "
    "teacher sampled with plain Euler at a's step count k (Euler-k, no distillation): Euler-k ≈ teacher-50 "
    "for a ≈ teacher-50, Euler-k > b for a > b. A claim that holds while its control holds too is marked "
    "holds, but so does Euler-k (no distillation): it does not show what distillation adds. The column "
    "a − Euler-k says whether a beats plain Euler at its own step count. The last column names the score, "
    "the rows at their step counts and the claim's pairing (rows × training seeds pooled on each side); the "
    "controls pair the same rows, with Euler-k's one run in place of a's seeds. An Euler row at k without "
    "metrics: control not run.")
# (metrics key, axis label, scale): the headline metrics plotted against NFE
CURVE_METRICS = (
    ("total", "Total (×100, higher is better)", 100.0),
    ("fd_excess", "FD excess over real vs real (lower is better)", 1.0),
    ("diversity", "diversity across seeds (1 = the data's)", 1.0),
)


def labelled(claim: Claim, metrics: dict[str, dict]) -> Claim:
    """``claim`` with its text naming a labelled row by its label ("DMD2" → "DMD2 (no GAN)")."""
    text = claim.text
    for row in (claim.a, claim.b):
        label = metrics.get(row, {}).get("label")
        if label:
            text = text.replace(label.split(" ", 1)[0], label, 1)
    return dataclasses.replace(claim, text=text)


def labelled_curves(metrics: dict[str, dict]) -> dict[str, list[str]]:
    """``CURVES`` with a series named by the label of its rows where they have one."""
    out = {}
    for name, rows in CURVES.items():
        labels = [metrics[r]["label"] for r in rows if metrics.get(r, {}).get("label")]
        out[labels[0] if labels else name] = rows
    return out


def run(params: Params) -> None:
    main, own = STAGES["evaluate"].methods(params), paper_rows(params)
    rows = [*main, *own, *curve_rows(params)]  # the stage's deps: nothing else is read
    metrics = {m: read_json(paths.metrics(m)) for m in rows if paths.metrics(m).is_file()}
    n, seed = params.evaluation.bootstrap, params.seed
    seeds = {m: params.replicates(m) for m in metrics if not params.methods[m].replicate_of}
    steps = {m: r.get("steps") for m, r in metrics.items()}
    # the controls: a claim row's step count (the metrics', else params.yaml's) → the Euler row at it
    row_steps = {**{m: params.methods[m].sample_steps for m in params.methods},
                 **{m: k for m, k in steps.items() if k is not None}}
    euler = euler_rows(params)
    # with paper.teachers > 1 every claim pools this project and teachers/s<k>/ (stage teachers)
    others = _other_teachers(params)
    projects, seed_maps = [metrics, *others], [seeds, *[None] * len(others)]
    controlled = [controlled_verdict(c, projects, n, seed, euler, row_steps, seeds=seed_maps) for c in CLAIMS]
    claims = [c.verdict for c in controlled]
    comparisons = [verdict(labelled(c, metrics), projects, n, seed, seeds=seed_maps) for c in COMPARISONS]
    with tracking.stage_run(params, "report_paper", param_keys={"methods": ",".join(metrics)}) as run_, \
            atomic_dir(paths.PAPER) as out:
        md = [f"# {params.experiment}: the paper's claims, quality against steps, ablations\n"]
        sections = []
        protocol = reporting.protocol_note(metrics)
        if protocol:
            md += [f"**{protocol}**\n"]
            sections.append(("Evaluation rows", f"<p><b>{html.escape(protocol)}</b></p>"))

        rule = (f"Each verdict is the paired difference of Total over the same (prompt, seed) rows with its "
                f"95% bootstrap interval (scores ×100). *a > b* holds if the interval lies above 0, does not "
                f"hold if it lies below 0, inconclusive otherwise. *a ≈ b* (equivalence margin "
                f"{100 * EQUIVALENCE_MARGIN:.0f} point of Total) holds if the interval reaches 0 or lies "
                f"above it and its lower bound is above −{100 * EQUIVALENCE_MARGIN:.0f}, does not hold if it "
                f"lies wholly below −{100 * EQUIVALENCE_MARGIN:.0f}, inconclusive otherwise. A row without "
                f"metrics: not run. " + _seeds_rule(params, metrics) + " " + CONTROL_RULE)
        header, rows_ = _claims_table(controlled, steps)
        md += ["## Claims\n", rule, "", _markdown_rows(header, rows_), "",
               *(v.line(steps) for v in comparisons), ""]
        sections.append(("Claims", f"<p>{html.escape(rule)}</p>" + _html_table(header, rows_, bold=(1, 4))
                         + _html_list(comparisons, steps)))

        title = f"Quality at {', '.join(map(str, STEP_COUNTS[:-1]))} and {STEP_COUNTS[-1]} steps"
        header, rows_ = _steps_table(metrics, steps)
        note = _steps_note(metrics, steps)
        md += [f"## {title}\n", _markdown_rows(header, rows_), "", note, ""]
        sections.append((title, _html_table(header, rows_) + f"<p>{html.escape(note)}</p>"))

        title = "Coverage of open attributes"
        coverage = _coverage_table(metrics)
        if coverage:
            md += [f"## {title}\n", _markdown_rows(*coverage), "", COVERAGE_NOTE, ""]
            sections.append((title, _html_table(*coverage) + f"<p>{html.escape(COVERAGE_NOTE)}</p>"))
        else:
            no_open = _no_coverage_note(params)
            md += [f"## {title}\n", no_open, ""]
            sections.append((title, f"<p>{html.escape(no_open)}</p>"))

        seed_table = _seed_table(metrics, seeds, n, seed)
        if seed_table:
            title = "Training seeds (Total ×100 per seed; pooled mean and its hierarchical 95% interval)"
            md += [f"## {title}\n", seed_table, ""]
            sections.append((title, reporting.markdown_to_html_table(seed_table)))

        for k in HEADLINE_STEPS:
            at_k = [m for series in CURVES.values() for m in series if m in metrics and steps[m] == k]
            order = ([TEACHER] if TEACHER in metrics else []) + [m for m in at_k if m != TEACHER]
            title = f"At {k} steps (the teacher-50 as reference; scores ×100)"
            table = (reporting.markdown_table(reporting.method_table(metrics, order)) if at_k
                     else f"no row at {k} steps ran")
            md += [f"## {title}\n", table, ""]
            sections.append((title,
                             reporting.markdown_to_html_table(table) or f"<p>{html.escape(table)}</p>"))

        figures = []
        for key, label, scale in CURVE_METRICS:
            file = out / f"{key}_vs_nfe.png"
            if reporting.nfe_curves(metrics, labelled_curves(metrics), key, file, label, reference=TEACHER,
                                    scale=scale):
                figures.append(file.name)
        not_run = [m for series in CURVES.values() for m in series if m not in metrics]
        note = ("Error bars: 95% bootstrap intervals over the evaluation rows; dashed line and band: the "
                "teacher-50." + (f" Not run: {', '.join(not_run)}." if not_run else ""))
        md += ["## Against NFE\n", note, "", *(f"![{f}]({f})" for f in figures), ""]
        sections.append(("Against NFE",
                         f"<p>{html.escape(note)}</p>" + "".join(f"<img src='{f}'>" for f in figures)))

        mcm = _mcm_setting(params, n, seed)
        md += ["## MCM in its own setting\n", *mcm["md"], ""]
        sections.append(("MCM in its own setting", mcm["html"]))

        table_rows = main + [m for m in own if not params.methods[m].replicate_of]
        order = [m for m in table_rows if m in metrics]
        missing = [m for m in table_rows if m not in metrics]
        table = reporting.markdown_table(reporting.method_table(metrics, order))
        ablation_note = f"Not run: {', '.join(missing)}." if missing else ""
        md += ["## Methods and ablation rows (scores ×100)\n", table, "", ablation_note, ""]
        sections.append(("Methods and ablation rows",
                         reporting.markdown_to_html_table(table) + f"<p>{html.escape(ablation_note)}</p>"))

        (out / "summary.md").write_text("\n".join(md) + "\n")
        page = reporting.html_page(f"dcm — {params.experiment}: paper", sections)
        broken = reporting.unresolved_images(page, out)
        if broken:
            raise RuntimeError(f"report_paper: index.html refers to images that are not in {paths.PAPER}/: "
                               f"{broken}")
        (out / "index.html").write_text(page)
        run_.metrics({f"claim.{v.claim.a}-{v.claim.b}": v.difference.mean
                      for v in claims + comparisons if v.difference})
        run_.metrics({f"control.{c.verdict.claim.a}-{c.verdict.claim.b}": c.control.difference.mean
                      for c in controlled if c.control and c.control.difference})
        run_.metrics({f"mcm_setting.claim.{v.claim.a}-{v.claim.b}.{v.claim.score}": v.difference.mean
                      for v in mcm["verdicts"] if v.difference})
        run_.artifact(out, "paper")
    print(f"report_paper: {paths.PAPER / 'summary.md'} and {paths.PAPER / 'index.html'}")


def _mcm_setting(params: Params, n: int, seed: int) -> dict:
    """MCM's claims and table from ``mcm_setting/metrics/`` (stage mcm_setting): Markdown lines, HTML,
    verdicts."""
    folder = paths.MCM_SETTING / paths.METRICS
    metrics = {m: read_json(folder / f"{m}.json") for m in ("teacher", "lcm", "mcm")
               if (folder / f"{m}.json").is_file()}
    verdicts = [verdict(c, metrics, n, seed) for c in MCM_CLAIMS]
    steps = {m: r.get("steps") for m, r in metrics.items()}
    intro = (f"The `mcm` preset's pipeline in `{paths.MCM_SETTING}/` (`dcm run mcm_setting`): its teacher "
             f"learnt from the world's low-quality videos (blurred, noisy, colour-shifted), as MCM's "
             f"teachers learnt from WebVid; LCM and MCM are distilled from it with this file's settings. "
             f"Same rules as the claims above; these are MCM's claims, not the DCM paper's.")
    order = [m for m in ("teacher", "lcm", "mcm") if m in metrics]
    table = reporting.markdown_table(reporting.method_table(metrics, order)) if order else "not run"
    dims = ""
    if order:
        dims = ("| row | imaging_quality (×100) | − teacher [95%] |\n|---|---|---|\n" + "\n".join(
            f"| {m} | {100 * metrics[m]['dimensions']['imaging_quality']:.2f} | "
            + ("" if m == TEACHER
               else _interval(metrics[m].get("diff_vs_teacher", {}).get("imaging_quality"))) + " |"
            for m in order if "imaging_quality" in metrics[m].get("dimensions", {})))
    lines = [v.line(steps) for v in verdicts]
    md = [intro, "", *lines, "", table, "", dims]
    html_ = (f"<p>{html.escape(intro)}</p>" + _html_list(verdicts, steps)
             + (reporting.markdown_to_html_table(table) or f"<p>{html.escape(table)}</p>")
             + (reporting.markdown_to_html_table(dims) if dims else ""))
    return {"md": md, "html": html_, "verdicts": verdicts}


def _interval(diff: dict | None) -> str:
    return _with_ci(diff["mean"], diff.get("ci95"), 100.0, "+.2f") if diff else "—"


def _with_ci(value: float | None, ci: list[float] | None, scale: float = 1.0, spec: str = ".2f") -> str:
    """``value`` × ``scale`` with its 95% interval where it has one; — where there is no value."""
    if value is None:
        return "—"
    return format(scale * value, spec) + (f" [{format(scale * ci[0], spec)}, {format(scale * ci[1], spec)}]"
                                          if ci else "")


def _steps_cell(row: str, m: dict) -> str:
    """A row's Total ×100 with its 95% interval, its FD excess where evaluated, and its key."""
    fd = m.get("fd_excess")
    return (_with_ci(m["total"], m.get("total_ci95"), 100.0)
            + ("" if fd is None else f"; FD excess {fd:.2f}") + f" (`{row}`)")


def _steps_table(metrics: dict[str, dict], steps: dict) -> tuple[tuple[str, ...], list[list[str]]]:
    """One row per family of ``CURVES`` (those of ``STEPS_TABLE_IF_RUN`` only where a row ran), one cell per
    step count of ``STEP_COUNTS``: the family's row sampled at that many steps (its metrics' ``steps``), or —
    where none ran."""
    header = ("family", *(f"{k} step{'s' if k > 1 else ''}" for k in STEP_COUNTS))
    rows = []
    for (family, series), name in zip(CURVES.items(), labelled_curves(metrics), strict=True):
        ran = [m for m in series if m in metrics]
        if family in STEPS_TABLE_IF_RUN and not ran:
            continue
        at = {k: next((m for m in ran if steps[m] == k), None) for k in STEP_COUNTS}
        rows.append([name, *("—" if m is None else _steps_cell(m, metrics[m]) for m in at.values())])
    return header, rows


def _steps_note(metrics: dict[str, dict], steps: dict) -> str:
    """The line under the steps table: what a cell holds, and the teacher's own Total as the reference."""
    reference = (f"the teacher at {steps[TEACHER]} steps: {_steps_cell(TEACHER, metrics[TEACHER])}"
                 if TEACHER in metrics else f"the teacher (`{TEACHER}`): not run")
    return ("Each cell: Total ×100 [95% bootstrap interval over the evaluation rows]; FD excess, the Fréchet "
            "distance to real renders less the real-vs-real floor (lower is better, ≈ 0: like real videos); "
            "then the row (`metrics/<row>.json`). —: the family has no row at that step count, or it did "
            f"not run. Reference, {reference}.")


def _coverage_table(metrics: dict[str, dict]) -> tuple[tuple[str, ...], list[list[str]]] | None:
    """The rows of ``COVERAGE_ROWS`` that ran, one column per open attribute (TV excess and its interval)
    and the averaged-mode share, from the metrics' ``open_world`` blocks
    (``dcm.evaluation.distribution.open_world_metrics``); None where no row has one."""
    blocks = {m: metrics[m].get("open_world") or {} for m in COVERAGE_ROWS if m in metrics}
    if not any(blocks.values()):
        return None
    attributes = list(dict.fromkeys(a for b in blocks.values() for a in b.get("coverage", {})))
    header = ("method", *(f"{a}: TV excess [95% CI]" for a in attributes), "averaged-mode share [95% CI]")
    rows = []
    for m, block in blocks.items():
        coverage, averaged = block.get("coverage", {}), block.get("averaged_mode") or {}
        rows.append([shown_name(m, metrics[m]),
                     *(_with_ci(coverage[a]["tv_excess"], coverage[a].get("tv_excess_ci95"), spec="+.2f")
                       if a in coverage else "—" for a in attributes),
                     _with_ci(averaged.get("share"), averaged.get("ci95"))])
    return header, rows


def _no_coverage_note(params: Params) -> str:
    world = params.world
    keys = f"world.open_share = {world.open_share:g}, world.eval_open_prompts = {world.eval_open_prompts}"
    if world.open_share > 0 or world.eval_open_prompts > 0:
        return (f"No row's metrics has an `open_world` block although the world has open prompts ({keys}): "
                f"re-run `dcm run evaluate --method <row>`.")
    return (f"The world has no open prompts ({keys}): every prompt names all its attributes, so there is "
            f"no coverage to measure (docs/shapes-world.md, \"Open captions\").")


def _other_teachers(params: Params) -> list[dict[str, dict]]:
    """The metrics of teachers/s<k>/ (stage teachers), k = 1 … paper.teachers − 1, by row."""
    out = []
    for k in range(1, params.paper.teachers):
        folder = paths.teacher_folder(k) / paths.METRICS
        found = sorted(folder.glob("*.json"))
        if not found:
            raise ConfigError("paper.teachers", params.paper.teachers,
                              f"{folder}/ holds no metrics: run `dcm run teachers` first")
        out.append({p.stem: read_json(p) for p in found})
    return out


def _seeds_rule(params: Params, metrics: dict) -> str:
    pooled = sorted(m for m in metrics if params.methods[m].replicate_of)
    if not pooled:
        rule = ("One training run per row: the intervals cover the evaluation rows, not training seeds, so a "
                "verdict says what this run shows, not what a retrained one would.")
    else:
        rule = (f"Rows trained with several seeds (paper.seeds = {params.paper.seeds}: "
                f"{', '.join(params.paper.rows)}) are pooled by a hierarchical bootstrap — each resample "
                f"draws the evaluation rows (paired) and each side's training seeds — so their intervals "
                f"cover retraining as well as the evaluation rows.")
    if params.paper.teachers > 1:
        return rule + (f" The claims pool {params.paper.teachers} teachers (paper.teachers; seeds "
                       f"{params.seed} … {params.seed + params.paper.teachers - 1}, the others' rows in "
                       f"{paths.TEACHERS}/s<k>/): each student is compared with its own teacher's rows, and "
                       f"the teachers are resampled on top.")
    return rule + (" Every verdict is conditional on one teacher (paper.teachers: 1): the intervals do not "
                   "cover the teacher's own training seed.")


def _seed_table(metrics: dict, seeds: dict[str, list[str]], n: int, seed: int) -> str:
    """Markdown: one line per row with more than one training seed that has metrics."""
    lines = []
    for row, names in seeds.items():
        have = [m for m in names if m in metrics]
        if len(have) < 2:
            continue
        mean, (lo, hi), per_seed = pooled_total([metrics[m]["per_row"] for m in have], n, seed)
        lines.append(f"| {row} | {len(have)} | {', '.join(f'{100 * v:.1f}' for v in per_seed)} | "
                     f"{100 * mean:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | "
                     f"{100 * (max(per_seed) - min(per_seed)):.1f} |")
    if not lines:
        return ""
    return "\n".join(["| row | seeds | Total per seed | pooled Total [95%] | spread (max − min) |",
                      "|---|---|---|---|---|", *lines])


def euler_rows(params: Params) -> dict[int, str]:
    """Sampling steps → the row that samples the teacher with plain Euler at that many steps (the curve
    ``teacher (Euler)`` of params.yaml's rows, less the teacher-50 reference itself)."""
    return {params.methods[m].sample_steps: m for m in CURVES["teacher (Euler)"]
            if m != TEACHER and m in params.methods}


CLAIMS_HEADER = ("claim", "verdict", "a − b ×100 [95% CI]", "control: Euler-k as a", "control verdict",
                 "Euler-k − b ×100 [95% CI]", "a − Euler-k ×100 [95% CI]", "score (a vs b), pairs")


def _claims_table(controlled: list[Controlled], steps: dict) -> tuple[tuple[str, ...], list[list[str]]]:
    """The claims with their controls: the header and one row of cells per claim.  The difference cells
    hold the figures alone; the last column names the score, the rows with their step counts and the
    pairing they share (a claim not run: its missing rows)."""
    rows = []
    for c in controlled:
        v = c.verdict
        claim = v.claim
        pairs = "—" if v.outcome == NOT_RUN else (
            f"{claim.score_name}: {row_at(claim.a, steps)} vs {row_at(claim.b, steps)}; {v.pairing_text()}")
        rows.append([claim.text, c.label, v.interval_text(), "—" if c.euler is None else f"`{c.euler}`",
                     c.control_label, c.control.interval_text() if c.control else "—",
                     c.gain.interval_text() if c.gain else "—", pairs])
    return CLAIMS_HEADER, rows


def _markdown_rows(header: tuple[str, ...], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(r) + " |" for r in rows)])


def _html_table(header: tuple[str, ...], rows: list[list[str]], bold: tuple[int, ...] = ()) -> str:
    """An HTML table of ``rows`` (cells as text, backticks dropped); the columns ``bold`` in bold."""
    def cell(i: int, text: str) -> str:
        text = html.escape(text.replace("`", ""))
        return f"<td><b>{text}</b></td>" if i in bold else f"<td>{text}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(i, t) for i, t in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _html_list(verdicts: list[Verdict], steps: dict) -> str:
    items = []
    for v in verdicts:
        text = v.line(steps).removeprefix("- ").replace(f"**{v.label}**", "\0", 1)
        items.append("<li>" + html.escape(text).replace("\0", f"<b>{html.escape(v.label)}</b>") + "</li>")
    return "<ul>" + "".join(items) + "</ul>"
