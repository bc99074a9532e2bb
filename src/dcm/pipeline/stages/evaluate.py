"""``evaluate --method M``: shapes-bench (or real VBench, ``evaluation.backend``) scores of ``samples/<M>``
paired with ``samples/teacher``.

Writes ``metrics/<M>.json`` (per-dimension scores, Quality, Semantic, Total with a 95% bootstrap
interval, the paired Total difference to the teacher with its interval, PSNR vs teacher-50, latency,
steps, NFE, per-row scores; with shapes-bench also the Fréchet distance to real renders of the same
prompts with its real-vs-real floor, and diversity across seeds: ``dcm.evaluation.distribution``) and
logs them to one MLflow run.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from dcm import io, paths, tracking
from dcm.config import Params
from dcm.evaluation.metrics import shapes_bench_metrics

TEACHER = "teacher"


def _videos(method: str) -> torch.Tensor:
    return load_file(str(paths.samples(method) / "videos.safetensors"))["videos"].float()


def run(params: Params, method: str) -> None:
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
    videos = _videos(method)
    teacher_videos = videos if method == TEACHER else _videos(TEACHER)
    return shapes_bench_metrics(params, method, record, videos, teacher_videos)


def _write(params: Params, method: str, metrics: dict) -> None:
    with tracking.stage_run(params, "evaluate", method) as run_:
        io.write_json_atomic(paths.metrics(method), metrics)
        run_.metrics({k: metrics[k] for k in ("total", "quality", "semantic", "latency_s", "match_rate", "fd",
                                              "fd_real_floor", "fd_excess", "diversity", "diversity_real")
                      if metrics.get(k) is not None})
        run_.metrics({f"dim.{k}": v for k, v in metrics["dimensions"].items()})
    match = f", match rate {metrics['match_rate']:.2%}" if metrics.get("match_rate") is not None else ""
    fd = (f", FD {metrics['fd']:.2f} (real floor {metrics['fd_real_floor']:.2f})"
          if metrics.get("fd") is not None else "")
    diversity = f", diversity {metrics['diversity']:.2f}" if metrics.get("diversity") is not None else ""
    print(f"evaluate[{method}] ({metrics['backend']}): Total {100 * metrics['total']:.2f} "
          f"(Quality {100 * metrics['quality']:.2f}, Semantic {100 * metrics['semantic']:.2f})"
          f"{match}{fd}{diversity}")
