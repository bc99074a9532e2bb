"""The world decision table (issue 31, item 3): the trained teacher at 50 steps against plain Euler at
fewer, on the validation split, scored exactly as ``evaluate`` scores a method.

What it answers, before any distillation method runs on a world: does teacher-50 name the prompt's
attributes (match), cover the attributes an open prompt leaves free (``coverage.*.tv_excess``), stay close
to its data (FD to real renders beside the real-vs-real floor, with the features that move it), and is
plain Euler at 4, 2, 1 steps measurably worse (paired intervals on the same rows)?

It samples ``dcm.data.prompts.validation_rows`` (full captions, plus ``world.eval_open_prompts`` open ones:
seeds disjoint from training and from the eval rows) with the teacher in ``models/teacher`` at every step
count of ``--steps`` and guidance scale of ``--guidance`` (plain Euler on the teacher grid, the
``kind: teacher`` rows' sampler), rounds the videos through float16 as ``sample`` stores them, and scores
them with the project's functions: ``score_rows`` / ``row_totals`` / ``match_rate`` (shapes-bench),
``distribution.compare`` (FD, its floor and excess, the per-feature mean shift), and
``distribution.open_world_metrics`` (coverage per open attribute, averaged-mode share).  Paired
differences to the first row (teacher-50 by default) use the same rows (Total, match, averaged modes:
row bootstrap), the same prompt draws as FD's own interval (FD), and the same prompt weights for both
samplers (coverage ``tv``: ``distribution.coverage_draws``; the floor cancels in the difference).

Run it in a project directory whose teacher is trained (``dcm run prepare && dcm run teacher``):

    python benchmarks/world_decision.py [--params params.yaml] [--steps 50,4,2,1] [--guidance 4]
        [--eval-prompts N] [--eval-seeds S] [--open-prompts K] [--json out.json]

``--eval-prompts`` / ``--eval-seeds`` / ``--open-prompts`` override ``world.eval_prompts``,
``world.eval_seeds`` and ``world.eval_open_prompts`` for the validation rows only (more rows, narrower
intervals).  It writes nothing but ``--json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dcm import config, paths
from dcm.backbones import load_teacher
from dcm.config import ConfigError, MethodConfig
from dcm.data.prompts import validation_rows
from dcm.evaluation import distribution as dist
from dcm.evaluation.metrics import match_rate, row_totals, score_rows
from dcm.evaluation.scoring import bootstrap
from dcm.methods import generate
from dcm.worlds import shapes

TOP_SHIFTS = 4  # features listed per row, by |mean shift|


def _matches(scores: list[dict]) -> np.ndarray:
    return np.array([s["object_class"] * s["color"] * s["motion_direction"] for s in scores])


NOISE_KEPT_SIGMAS = (1.0, 0.7, 0.4)


@torch.no_grad()
def noise_kept(backbone, prompts: list[str], world, seed: int, guidance: float) -> dict[float, float]:
    """For each σ of ``NOISE_KEPT_SIGMAS``: real renders of ``prompts`` (one per row, seeds of their own)
    noised to σ, the teacher's guided one-step clean prediction x0̂ = x_σ − σ·v, and the least-squares slope β
    of x0̂ − x0 on ε.  The ideal prediction E[x0 | x_σ] at σ = 1 does not depend on ε (β = 0), nor, for a
    full caption (its video fixed up to ±0.75 px), at the lower σ here; a teacher that cannot carry its
    input noise through keeps β·ε in every prediction, which sampling turns into content (issue 31's
    "confetti").  Full-caption rows only: an open caption's posterior mean legitimately follows the noise."""
    g = torch.Generator().manual_seed(seed + 11)
    seeds = (dist.REAL_SEED_BASE + torch.randperm(dist.TRAIN_SEED_LIMIT, generator=g)[:len(prompts)]).tolist()
    x0 = backbone.encode_video(dist.real_videos(prompts, seeds, world.size, world.frames,
                                                world.position_jitter))
    cond, uncond = backbone.encode_prompts(prompts), backbone.encode_prompts([""] * len(prompts))
    out = {}
    for s in NOISE_KEPT_SIGMAS:
        eps = torch.randn(x0.shape, generator=g)
        sigma = torch.full((len(prompts),), s)
        xs = (1 - s) * x0 + s * eps
        pred = []
        for i in range(0, len(prompts), 32):
            part = slice(i, i + 32)
            v = backbone.guided_velocity(backbone.transformer, xs[part], sigma[part], cond.index(part),
                                         uncond.index(part), guidance)
            pred.append(xs[part] - s * v)
        pred = torch.cat(pred)
        out[s] = float(((pred - x0) * eps).sum() / (eps * eps).sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--teacher", default=str(paths.TEACHER), help="the trained teacher's folder")
    ap.add_argument("--steps", default="50,4,2,1", help="Euler step counts; the first is the reference")
    ap.add_argument("--guidance", default=None,
                    help="CFG scales, comma-separated (default: backbone.guidance_scale)")
    ap.add_argument("--eval-prompts", type=int, default=None)
    ap.add_argument("--eval-seeds", type=int, default=None)
    ap.add_argument("--open-prompts", type=int, default=None)
    ap.add_argument("--json", default=None, help="write every row's numbers here")
    args = ap.parse_args()

    params = config.load(args.params, preset=args.preset)
    if params.backbone.family != "toy":
        raise ConfigError("backbone.family", params.backbone.family, "toy: the shapes world")
    if not Path(args.teacher).exists():
        raise ConfigError("--teacher", args.teacher, "a saved teacher: run `dcm run teacher` first")
    world = params.world
    for key, value in (("eval_prompts", args.eval_prompts), ("eval_seeds", args.eval_seeds),
                       ("eval_open_prompts", args.open_prompts)):
        if value is not None:
            setattr(world, key, value)
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    scales = ([float(g) for g in args.guidance.split(",")] if args.guidance
              else [params.backbone.guidance_scale])
    combos = [(k, g) for g in scales for k in steps] if len(scales) > 1 else [(k, scales[0]) for k in steps]

    rows = validation_rows(params)
    prompts = [r["prompt"] for r in rows]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_teacher(params, args.teacher).to(device)
    n, seed, size, frames = params.evaluation.bootstrap, params.seed, world.size, world.frames
    real = dist.real_sets(prompts, size, frames, world.position_jitter, seed, observe_open=True)
    open_rows = [i for i, p in enumerate(prompts) if shapes.is_open(p)]
    print(f"validation split: {len(rows)} rows ({len(rows) - len(open_rows)} full-caption, {len(open_rows)} "
          f"open), teacher {args.teacher}, grid shift {params.grid.shift}, {n} bootstrap resamples")

    # FD's own prompt draws (compare's), for the paired FD difference
    mean, scale = dist.standardiser(real.reference)
    order = list(dict.fromkeys(real.reference_prompts))
    present = [p for p in order if p in set(prompts)]
    ref = dist._by_prompt((real.reference - mean) / scale, real.reference_prompts, present)
    fd_draws = np.random.default_rng(seed).integers(0, len(present), (n, len(present)))
    open_sets = [shapes.open_attributes_of(p) for p in prompts]
    cov_attrs = [a for a in shapes.ATTRIBUTES if any(a in s for s in open_sets)]
    cov_rows = {a: [i for i, s in enumerate(open_sets) if a in s] for a in cov_attrs}
    cov_present = {a: list(dict.fromkeys(prompts[i] for i in cov_rows[a])) for a in cov_attrs}
    cov_weights = {a: dist.prompt_weights(len(cov_present[a]), n, np.random.default_rng([seed, 7, i]))
                   for i, a in enumerate(cov_attrs)}

    results = []
    for k, g in combos:
        name = f"world_euler{k}"
        params.methods[name] = MethodConfig(kind="teacher", sample_steps=k)
        backbone.guidance_scale = g
        t0 = time.perf_counter()
        _, videos, *_ = generate(params, name, backbone, rows, desc=f"euler{k} g{g:g}")
        wall = time.perf_counter() - t0
        videos = videos.to(torch.float16).float()  # as sample stores, evaluate reads
        scores = score_rows(params, rows, videos)
        generated = dist.observe(videos, size)
        fd = dist.compare(generated.features, prompts, real, n, seed)
        ow = dist.open_world_metrics(prompts, generated, real, n, seed)
        gen = dist._by_prompt((generated.features - mean) / scale, prompts, present)
        fds = np.array([dist.frechet_distance(np.concatenate([gen[j] for j in d]),
                                              np.concatenate([ref[j] for j in d])) for d in fd_draws])
        cov_tv = {a: dist.coverage_draws(a, cov_rows[a], prompts, generated, real, cov_weights[a],
                                         cov_present[a])["tv"] for a in cov_attrs}
        results.append({
            "steps": k, "guidance": g, "wall_s": wall, "video_steps_per_s": k * len(rows) / wall,
            "totals": row_totals(scores), "matches": _matches(scores), "match_rate": match_rate(scores),
            "flags": np.array([a.flagged for a in generated.averaged], dtype=np.float64),
            "fd": fd, "fd_draws": fds, "open_world": ow, "cov_tv": cov_tv,
        })
        print(f"  euler{k} g{g:g}: {wall:.0f} s wall, {k * len(rows) / wall:.1f} video-steps/s "
              f"(NFE {2 * k if g != 1 else k} per video)", flush=True)

    base = results[0]
    full = [p for p in prompts if not shapes.is_open(p)]
    kept = {g: noise_kept(backbone, full, world, seed, g) for g in scales}

    def ci(values: np.ndarray, pct: bool = True) -> str:
        lo, hi = bootstrap(values, np.mean, n, seed)
        f = 100 if pct else 1
        return f"{f * values.mean():.1f} [{f * lo:.1f}, {f * hi:.1f}]" if pct else \
            f"{values.mean():.2f} [{lo:.2f}, {hi:.2f}]"

    def rci(point: float, draws: np.ndarray, digits: int = 1) -> str:
        lo, hi = dist.recentred_ci(point, draws)
        return f"{point:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"

    def name(r: dict) -> str:
        return f"Euler-{r['steps']}" + (f" g{r['guidance']:g}" if len(scales) > 1 else "")

    print()
    print("| sampler | match [95% CI] | Δ match | Total [95% CI] | Δ Total | FD [95% CI] | real floor | "
          "FD excess [95% CI] | Δ FD | averaged_mode [95% CI] (floor) | Δ averaged |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        fd = r["fd"]
        d_fd = r["fd_draws"] - base["fd_draws"]
        av = r["open_world"]["averaged_mode"]
        print(f"| {name(r)} | {ci(r['matches'])} | {ci(r['matches'] - base['matches'])} | "
              f"{ci(r['totals'])} | {ci(r['totals'] - base['totals'])} | "
              f"{fd['fd']:.2f} [{fd['fd_ci95'][0]:.2f}, {fd['fd_ci95'][1]:.2f}] | "
              f"{fd['fd_real_floor']:.2f} | "
              f"{fd['fd_excess']:.2f} [{fd['fd_excess_ci95'][0]:.2f}, {fd['fd_excess_ci95'][1]:.2f}] | "
              f"{rci(fd['fd'] - base['fd']['fd'], d_fd)} | "
              f"{100 * av['share']:.1f} [{100 * av['ci95'][0]:.1f}, {100 * av['ci95'][1]:.1f}] "
              f"({100 * av['real_floor']:.1f}) | {ci(r['flags'] - base['flags'])} |")
    print()
    print("largest FD feature shifts (generated − real mean, in the reference's SDs):")
    for r in results:
        shift = r["fd"]["distribution"]["mean_shift"]
        top = sorted(shift, key=lambda f: -abs(shift[f]))[:TOP_SHIFTS]
        print(f"  {name(r)}: " + ", ".join(f"{f} {shift[f]:+.1f}" for f in top))
    if cov_attrs:
        print()
        print("coverage tv_excess per open attribute [95% CI] (Δ: tv vs the first row's, paired):")
        print("| sampler | " + " | ".join(f"{a} tv_excess | Δ {a}" for a in cov_attrs) + " |")
        print("|---|" + "---|---|" * len(cov_attrs))
        for r in results:
            cells = []
            for a in cov_attrs:
                c = r["open_world"]["coverage"][a]
                d = r["cov_tv"][a] - base["cov_tv"][a]
                lo, hi = c["tv_excess_ci95"]
                cells.append(f"{c['tv_excess']:+.2f} [{lo:+.2f}, {hi:+.2f}]")
                cells.append(rci(float(d[0]), d[1:], 2))
            print(f"| {name(r)} | " + " | ".join(cells) + " |")
    print()
    print("noise kept in the teacher's one-step x0 prediction (slope of x0̂ − x0 on ε, real renders of the "
          f"{len(full)} full-caption rows noised to σ; 0: the prediction ignores the noise)")
    for g in scales:
        print(f"  guidance {g:g}: " + ", ".join(f"σ {s:g}: {b:.3f}" for s, b in kept[g].items()))
    if args.json:
        out = [{"steps": r["steps"], "guidance": r["guidance"], "wall_s": r["wall_s"],
                "video_steps_per_s": r["video_steps_per_s"], "match_rate": r["match_rate"],
                "total": float(r["totals"].mean()),
                "diff_total": float((r["totals"] - base["totals"]).mean()),
                "diff_total_ci95": list(bootstrap(r["totals"] - base["totals"], np.mean, n, seed)),
                **{k: r["fd"][k] for k in dist.METRIC_KEYS},
                "mean_shift": r["fd"]["distribution"]["mean_shift"],
                "open_world": r["open_world"]} for r in results]
        record = {"rows": len(rows), "open_rows": len(open_rows), "results": out,
                  "noise_kept": {str(g): kept[g] for g in scales}}
        Path(args.json).write_text(json.dumps(record, indent=1, default=float))


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        raise SystemExit(f"world_decision.py: {err}") from None
