"""shapes-bench metrics of one method's samples, paired with the teacher's on the same (prompt, seed) rows.

Per-dimension scores, Quality, Semantic, Total with a 95% bootstrap interval, the paired differences to
the teacher (Total and per dimension) with their intervals, PSNR vs the teacher, the match rate,
per-row scores, and the distribution-level metrics against real renders of the same prompts (``fd``,
``fd_real_floor``, ``fd_excess``, ``diversity``, ``diversity_real``, each with ``*_ci95``, and the
``distribution`` details; ``dcm.evaluation.distribution``): the ``metrics/<method>.json`` contract
(shared/DESIGN.md, Data contracts).  With open captions on (``world.open_share``, ``world.eval_open_prompts``,
or open prompts in the rows) an ``open_world`` block is added: coverage of the unnamed attributes and the
averaged-mode share (``distribution.open_world_metrics``); the default world's record is unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

from dcm.config import Params
from dcm.evaluation.distribution import distribution_metrics
from dcm.evaluation.scoring import aggregate, bootstrap
from dcm.evaluation.shapes_bench import SHAPES_BENCH, psnr, score_video
from dcm.worlds import shapes


def score_rows(params: Params, rows: list[dict], videos: torch.Tensor) -> list[dict[str, float]]:
    """shapes-bench scores of each row's video against the world's ground truth for its (prompt, seed); an
    open caption's unnamed attributes score whether the detector reads any value (``score_video``)."""
    size, frames = params.world.size, params.world.frames
    scores = []
    for row, video in zip(rows, videos, strict=True):
        scene = shapes.sample_scene(np.random.default_rng(row["seed"]), size, frames, caption=row["prompt"],
                                    jitter=params.world.position_jitter)
        scores.append(score_video(video, scene, size, frames, shapes.open_attributes_of(row["prompt"])))
    return scores


def match_rate(scores: list[dict[str, float]]) -> float:
    """Fraction of rows whose colour, shape and motion direction all match the prompt."""
    return float(np.mean([s["object_class"] * s["color"] * s["motion_direction"] for s in scores]))


def row_totals(scores: list[dict[str, float]]) -> np.ndarray:
    return np.array([aggregate(s, SHAPES_BENCH)["total"] for s in scores])


def label(params: Params, method: str) -> dict:
    """``{"label": …}`` for a row with ``methods.<m>.label`` (how the reports name it beside its key), else
    nothing (the metrics of an unlabelled row are as before)."""
    text = params.method(method).label
    return {"label": text} if text else {}


def shapes_bench_metrics(params: Params, method: str, record: dict, videos: torch.Tensor,
                         teacher_videos: torch.Tensor) -> dict:
    """The metrics record of ``videos`` (sampled as ``record``, the method's samples.json) against the
    teacher's ``teacher_videos`` of the same rows."""
    rows = record["rows"]
    scores = score_rows(params, rows, videos)
    dims = {d: float(np.mean([s[d] for s in scores])) for d in SHAPES_BENCH}
    summary = aggregate(dims, SHAPES_BENCH)
    totals = row_totals(scores)
    n, seed = params.evaluation.bootstrap, params.seed
    teacher_scores = scores if teacher_videos is videos else score_rows(params, rows, teacher_videos)
    teacher_totals = row_totals(teacher_scores)
    diff = totals - teacher_totals

    def per_dimension_diff(d: str) -> dict:  # paired: the same (prompt, seed) rows as the teacher
        delta = np.array([s[d] - t[d] for s, t in zip(scores, teacher_scores)])
        return {"mean": float(delta.mean()), "ci95": list(bootstrap(delta, np.mean, n, seed))}

    psnrs = [psnr(v, t) for v, t in zip(videos, teacher_videos)]
    return {
        "method": method, **label(params, method), "backend": "shapes-bench", "steps": record["num_steps"],
        "nfe": record["nfe"],
        "latency_s": record["seconds_per_video"], "dimensions": dims, **summary,
        "total_ci95": list(bootstrap(totals, np.mean, n, seed)),
        "dimensions_ci95": {d: list(bootstrap(np.array([s[d] for s in scores]), np.mean, n, seed))
                            for d in SHAPES_BENCH},
        "diff_vs_teacher": {"total": {"mean": float(diff.mean()),
                                      "ci95": list(bootstrap(diff, np.mean, n, seed))},
                            **{d: per_dimension_diff(d) for d in SHAPES_BENCH}},
        "psnr_vs_teacher": float(np.mean(psnrs)) if np.all(np.isfinite(psnrs)) else None,
        "match_rate": match_rate(scores),
        **distribution_metrics(params, rows, videos),
        "per_row": [{"prompt": r["prompt"], "seed": r["seed"], "total": float(t), **s}
                    for r, t, s in zip(rows, totals, scores)],
    }
