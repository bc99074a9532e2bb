"""The comparison people look at: the paper's table shape, the ablation table, plots, loss curves and a
side-by-side video grid (same prompt and seed, every method), as Markdown and one HTML page."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dcm.evaluation.results_block import shown_name  # noqa: E402

QUALITY_KEYS = ("total", "quality", "semantic")


def _legend_outside(ax, **kwargs) -> None:
    """The legend right of the axes, never over the data it labels (save with ``_save``)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kwargs)


def _save(fig, path: Path) -> None:
    """Save with the bounding box grown to hold a legend outside the axes."""
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _fmt_ci(ci) -> str:
    return f"[{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" if ci else ""


def protocol_note(metrics: dict[str, dict]) -> str | None:
    """The line every report prints above its tables when the rows were VBench's standard suite: whole, or a
    subset (``evaluation.vbench.subset``) that must not be read as a score on the whole suite."""
    from dcm.evaluation.vbench_suite import describe

    suites = [m.get("vbench_suite") for m in metrics.values() if m.get("vbench_suite")]
    return describe(suites[0]) if suites else None


def method_table(metrics: dict[str, dict], order: list[str]) -> list[dict]:
    """Rows of the main table: steps, NFE, latency, speedup vs teacher, Total/Quality/Semantic (×100), and
    the distribution metrics (FD to real renders with its real-vs-real floor, diversity) where evaluated."""
    teacher_latency = metrics.get("teacher", {}).get("latency_s")
    rows = []
    for name in order:
        m = metrics[name]
        latency = m.get("latency_s")
        rows.append({
            "method": shown_name(name, m),
            "steps": m.get("steps"),
            "nfe": m.get("nfe"),
            "latency_s": latency,
            "speedup": (teacher_latency / latency) if teacher_latency and latency else None,
            "total": 100 * m["total"], "total_ci95": m.get("total_ci95"),
            "quality": 100 * m["quality"], "semantic": 100 * m["semantic"],
            "diff_vs_teacher": m.get("diff_vs_teacher", {}).get("total"),
            "psnr_vs_teacher": m.get("psnr_vs_teacher"),
            **{k: m.get(k) for k in ("fd", "fd_ci95", "fd_real_floor", "diversity", "diversity_ci95")},
        })
    return rows


def _num(value, fmt: str) -> str:
    return "" if value is None or not np.isfinite(value) else format(value, fmt)


def _value_ci(value, ci) -> str:
    """A distribution metric (not ×100) with its interval, blank where it was not computed."""
    if value is None:
        return ""
    return f"{value:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def markdown_table(rows: list[dict]) -> str:
    head = ("| method | steps | NFE | latency (s/video) | speedup | Total [95% CI] | Quality | Semantic "
            "| Total − teacher [95% CI] | PSNR vs teacher (dB) | FD to real [95% CI] | FD real vs real "
            "| diversity [95% CI] |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        diff = r["diff_vs_teacher"]
        diff_text = f"{100 * diff['mean']:+.2f} {_fmt_ci(diff.get('ci95'))}" if diff else ""
        speedup = _num(r["speedup"], ".1f")
        lines.append(
            f"| {r['method']} | {r['steps']} | {r['nfe']} | {_num(r['latency_s'], '.3f')} | "
            f"{speedup + '×' if speedup else ''} | {r['total']:.2f} {_fmt_ci(r['total_ci95'])} | "
            f"{r['quality']:.2f} | {r['semantic']:.2f} | {diff_text} | {_num(r['psnr_vs_teacher'], '.2f')} | "
            f"{_value_ci(r.get('fd'), r.get('fd_ci95'))} | {_value_ci(r.get('fd_real_floor'), None)} | "
            f"{_value_ci(r.get('diversity'), r.get('diversity_ci95'))} |")
    return "\n".join(lines)


def dimension_table(metrics: dict[str, dict], order: list[str]) -> str:
    """Per-dimension means ×100 with their 95% bootstrap interval where the metrics carry one."""
    dims = list(next(iter(metrics.values())).get("dimensions", {})) if metrics else []
    lines = ["| method | " + " | ".join(d.replace("_", " ") for d in dims) + " |",
             "|" + "---|" * (len(dims) + 1)]
    for name in order:
        m = metrics[name]
        cells = []
        for d in dims:
            ci = m.get("dimensions_ci95", {}).get(d)
            value = m["dimensions"].get(d)
            cells.append("" if value is None
                         else f"{100 * value:.1f}"
                         + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""))
        lines.append(f"| {shown_name(name, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_plot(rows: list[dict], path: Path, title: str) -> Path:
    """Total with 95% bootstrap intervals, Quality and Semantic per method."""
    names = [r["method"] for r in rows]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    width = 0.27
    for k, key in enumerate(QUALITY_KEYS):
        values = [r[key] for r in rows]
        err = None
        if key == "total":
            err = np.array([[r[key] - 100 * r["total_ci95"][0], 100 * r["total_ci95"][1] - r[key]]
                            if r["total_ci95"] else [0, 0] for r in rows]).T.clip(min=0)
        ax.bar(x + (k - 1) * width, values, width, yerr=err, capsize=3, label=key.capitalize())
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("score (×100)")
    ax.set_title(title)
    _legend_outside(ax)
    _save(fig, path)
    return path


def dimension_plot(metrics: dict[str, dict], order: list[str], path: Path) -> Path:
    """Every shapes-bench dimension per method (grouped bars): where the methods differ."""
    dims = sorted({d for name in order for d in metrics[name].get("dimensions", {})})
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(dims)), 4))
    width = 0.8 / max(1, len(order))
    x = np.arange(len(dims))
    for k, name in enumerate(order):
        values = [metrics[name].get("dimensions", {}).get(d, np.nan) for d in dims]
        ax.bar(x + k * width - 0.4 + width / 2, values, width, label=name)
    ax.set_xticks(x, [d.replace("_", " ") for d in dims], rotation=35, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    _legend_outside(ax, fontsize=8)
    _save(fig, path)
    return path


def loss_curves(histories: dict[str, Path], path: Path) -> Path | None:
    """Training loss per method and expert from each stage's history.jsonl."""
    series = {}
    for label, file in histories.items():
        steps, losses = [], []
        for line in file.read_text().splitlines():
            rec = json.loads(line)
            if "loss" in rec and "step" in rec:
                steps.append(rec["step"])
                losses.append(rec["loss"])
        if steps:
            series[label] = (steps, losses)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (steps, losses) in series.items():
        ax.plot(steps, losses, label=label, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    _legend_outside(ax, fontsize=8)
    _save(fig, path)
    return path


def nfe_curves(metrics: dict[str, dict], series: dict[str, list[str]], key: str, path: Path, ylabel: str,
               reference: str | None = None, scale: float = 1.0) -> Path | None:
    """``key`` (``<key>_ci95`` as error bars, times ``scale``) against NFE (log x), one line per method of
    ``series`` (method label → its rows at several step counts), the ``reference`` row as a horizontal
    line with its interval as a band.  The lines are drawn a few percent of NFE apart (ticks at the true
    values) so that methods at the same NFE do not hide each other's bars.  None (no file) when no row
    has ``key``."""
    def point(row: str):
        m = metrics.get(row, {})
        if m.get(key) is None or not m.get("nfe"):
            return None
        ci = m.get(f"{key}_ci95") or (m[key], m[key])
        return m["nfe"], scale * m[key], scale * ci[0], scale * ci[1]

    lines = {label: sorted(p for p in map(point, rows) if p) for label, rows in series.items()}
    lines = {label: pts for label, pts in lines.items() if pts}
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ref = point(reference) if reference else None
    if ref:
        ax.axhspan(ref[2], ref[3], color="0.85", zorder=0)
        ax.axhline(ref[1], color="0.4", ls="--", lw=1, label=f"{reference} (NFE {ref[0]}) ± 95% CI")
    for k, (label, pts) in enumerate(lines.items()):
        nfe, value, lo, hi = (np.array(c, dtype=float) for c in zip(*pts))
        err = np.vstack([value - lo, hi - value]).clip(min=0)
        dodge = 1.04 ** (k - (len(lines) - 1) / 2)
        ax.errorbar(nfe * dodge, value, yerr=err, marker="o", ms=4, capsize=3, lw=1.2, label=label)
    ax.set_xscale("log")
    ticks = sorted({p[0] for pts in lines.values() for p in pts})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("NFE (transformer forwards per video, log scale)")
    ax.set_ylabel(ylabel)
    _legend_outside(ax, fontsize=8)
    _save(fig, path)
    return path


def video_grid(videos: dict[str, np.ndarray], path: Path, scale: int = 4, fps: int = 6) -> Path:
    """One GIF: rows = examples, columns = methods; videos are (N, T, H, W, 3) uint8 per method."""
    import imageio.v2 as imageio

    names = list(videos)
    n, t, h, w, _ = videos[names[0]].shape
    pad = 2
    grid = np.full((t, n * (h + pad), len(names) * (w + pad), 3), 255, dtype=np.uint8)
    for j, name in enumerate(names):
        for i in range(n):
            grid[:, i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = videos[name][i]
    grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    imageio.mimsave(path, list(grid), duration=1000 / fps, loop=0)
    return path


def html_page(title: str, sections: list[tuple[str, str]]) -> str:
    """A self-contained page: (heading, html body) sections."""
    body = "\n".join(f"<h2>{html.escape(h)}</h2>\n{content}" for h, content in sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}</style>"
            f"</head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def unresolved_images(page: str, folder: Path) -> list[str]:
    """Image sources of ``page`` that are not relative paths to existing files under ``folder``."""
    sources = re.findall(r"<img[^>]*\ssrc=['\"]([^'\"]+)['\"]", page)
    return [s for s in sources if re.match(r"^([a-z]+:|/)", s) or not (Path(folder) / s).is_file()]


def analysis_note(dynamics_json: Path) -> str:
    """One line under the dynamics figure: the proposed κ next to the configured one."""
    if not dynamics_json.is_file():
        return ""
    d = json.loads(dynamics_json.read_text())
    each = d.get("per_seed_proposed_kappa")
    spread = (f" (each of {len(each)} training seeds alone: {', '.join(map(str, each))})"
              if each and len(each) > 1 else "")
    return (f"proposed κ = {d['proposed_kappa']} (σ {d['sigma_proposed']:.4f}){spread}, configured "
            f"grid.kappa = {d['configured_kappa']} (σ {d['sigma_configured']:.4f}); rule: {d['rule']}")


def markdown_to_html_table(md: str) -> str:
    lines = [line for line in md.splitlines() if line.startswith("|") and not line.startswith("|---")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    if not cells:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
    return f"<table><tr>{head}</tr>{rows}</table>"
