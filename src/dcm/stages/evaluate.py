"""``evaluate --method M``: shapes-bench (or real VBench, ``evaluation.backend``) scores of ``samples/<M>``
paired with ``samples/teacher``.

Writes ``metrics/<M>.json`` (per-dimension scores, Quality, Semantic, Total with a 95% bootstrap
interval, the paired Total difference to the teacher with its interval, PSNR vs teacher-50, latency,
steps, NFE, per-row scores) and logs them to one MLflow run.
"""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file

from dcm import io, paths, tracking
from dcm.config import ConfigError, Params
from dcm.evaluation.scoring import aggregate, bootstrap
from dcm.evaluation.shapes_bench import SHAPES_BENCH, psnr, score_video
from dcm.worlds import shapes

TEACHER = "teacher"


def _videos(method: str) -> torch.Tensor:
    return load_file(str(paths.samples(method) / "videos.safetensors"))["videos"].float()


def _row_scores(params: Params, method: str, rows: list[dict]) -> list[dict[str, float]]:
    return score_rows(params, rows, _videos(method))


def score_rows(params: Params, rows: list[dict], videos: torch.Tensor) -> list[dict[str, float]]:
    """shapes-bench scores of each row's video against the world's ground truth for its (prompt, seed)."""
    size, frames = params.world.size, params.world.frames
    scores = []
    for row, video in zip(rows, videos, strict=True):
        scene = shapes.sample_scene(np.random.default_rng(row["seed"]), size, frames, caption=row["prompt"],
                                    jitter=params.world.position_jitter)
        scores.append(score_video(video, scene, size, frames))
    return scores


def match_rate(scores: list[dict[str, float]]) -> float:
    """Fraction of rows whose colour, shape and motion direction all match the prompt."""
    return float(np.mean([s["object_class"] * s["color"] * s["motion_direction"] for s in scores]))


def row_totals(scores: list[dict[str, float]]) -> np.ndarray:
    return np.array([aggregate(s, SHAPES_BENCH)["total"] for s in scores])


def run(params: Params, method: str) -> None:
    for m in dict.fromkeys([method, TEACHER]):
        if not (paths.samples(m) / "samples.json").is_file():
            raise ConfigError(f"evaluate --method {method}", str(paths.samples(m)),
                              f"existing samples: run `dcm run sample --method {m}` first")
    if params.evaluation.backend == "vbench":
        from dcm.evaluation import vbench

        # the paired difference needs the teacher's per-row VBench totals: evaluate the teacher first
        teacher = paths.metrics(TEACHER)
        metrics = vbench.evaluate(params, method, io.read_json(teacher) if teacher.is_file() else None)
    else:
        metrics = _shapes_bench_metrics(params, method)
    _write(params, method, metrics)


def _shapes_bench_metrics(params: Params, method: str) -> dict:
    record = io.read_json(paths.samples(method) / "samples.json")
    rows = record["rows"]
    scores = _row_scores(params, method, rows)
    dims = {d: float(np.mean([s[d] for s in scores])) for d in SHAPES_BENCH}
    summary = aggregate(dims, SHAPES_BENCH)
    totals = row_totals(scores)
    n, seed = params.evaluation.bootstrap, params.seed
    teacher_scores = scores if method == TEACHER else _row_scores(params, TEACHER, rows)
    teacher_totals = row_totals(teacher_scores)
    diff = totals - teacher_totals

    def per_dimension_diff(d: str) -> dict:  # paired: the same (prompt, seed) rows as the teacher
        delta = np.array([s[d] - t[d] for s, t in zip(scores, teacher_scores)])
        return {"mean": float(delta.mean()), "ci95": list(bootstrap(delta, np.mean, n, seed))}

    videos, teacher_videos = _videos(method), _videos(TEACHER)
    psnrs = [psnr(v, t) for v, t in zip(videos, teacher_videos)]
    metrics = {
        "method": method, "backend": "shapes-bench", "steps": record["num_steps"], "nfe": record["nfe"],
        "latency_s": record["seconds_per_video"], "dimensions": dims, **summary,
        "total_ci95": list(bootstrap(totals, np.mean, n, seed)),
        "dimensions_ci95": {d: list(bootstrap(np.array([s[d] for s in scores]), np.mean, n, seed))
                            for d in SHAPES_BENCH},
        "diff_vs_teacher": {"total": {"mean": float(diff.mean()), "ci95": list(bootstrap(diff, np.mean, n, seed))},
                            **{d: per_dimension_diff(d) for d in SHAPES_BENCH}},
        "psnr_vs_teacher": float(np.mean(psnrs)) if np.all(np.isfinite(psnrs)) else None,
        "match_rate": match_rate(scores),
        "per_row": [{"prompt": r["prompt"], "seed": r["seed"], "total": float(t), **s}
                    for r, t, s in zip(rows, totals, scores)],
    }
    return metrics


def _write(params: Params, method: str, metrics: dict) -> None:
    with tracking.stage_run(params, "evaluate", method) as run_:
        io.write_json_atomic(paths.metrics(method), metrics)
        run_.metrics({k: metrics[k] for k in ("total", "quality", "semantic", "latency_s", "match_rate")
                      if metrics.get(k) is not None})
        run_.metrics({f"dim.{k}": v for k, v in metrics["dimensions"].items()})
    match = f", match rate {metrics['match_rate']:.2%}" if metrics.get("match_rate") is not None else ""
    print(f"evaluate[{method}] ({metrics['backend']}): Total {100 * metrics['total']:.2f} "
          f"(Quality {100 * metrics['quality']:.2f}, Semantic {100 * metrics['semantic']:.2f}){match}")
