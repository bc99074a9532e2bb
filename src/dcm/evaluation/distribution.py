"""Distribution-level metrics of the shapes world: a Fréchet distance to real videos, and diversity across
seeds.

shapes-bench scores each video on its own, so it cannot see what few-step samplers usually lose at the
level of the whole set: blur spread thinly over every video, motion that is right in direction but
off in speed or position, and lost diversity (every seed of a prompt giving the same video).  This
module compares *sets* of videos with the real ones, the way FVD does, but on fixed features that a
reader can check instead of a network's.

**Real videos.**  The world's renderer draws the ground truth: for every evaluation prompt, scenes
from fresh seeds (a range no split uses, ``REAL_SEED_BASE``) rendered clean, never the teacher's
samples, so the teacher is judged like every student.  Two disjoint real sets are drawn:
the *reference* (``REAL_SEEDS_PER_PROMPT`` seeds per prompt) every method is compared with, and a
*floor* set shaped exactly like the method's rows (one real video per row, same prompts).

**Features** (``FEATURES``; ``video_features``): 26 numbers per video, in natural units, read with the
analytic detector's saturation rule (objects are saturated, the background is grey) and from the
detector's own track and edge sharpness (``shapes.detect``):

- object shape: mean area and bounding-box area (÷ the square's: square 1, disc ≈ 0.8, triangle ≈ 0.5
  of the area), the area's variation over time, widening from the upper to the lower half (triangle);
- object colour and texture: mean RGB of the brightest object pixels; brightness change one texture
  band apart along rows and along columns (stripes: rows only; checks: both; plain: neither);
- motion: the track's position at mid-clip (÷ frame size), velocity (px/frame at the 32 px
  reference: ±1 slowly, ±2 quickly), RMS residual around constant velocity, share of frames found;
- sharpness: the detector's edge sharpness, log high-frequency energy (mean squared Laplacian over
  the frame's variance: blur removes the background's 1-px grain and the object's crisp edges) and
  flicker (mean |Δ| of static background pixels between frames);
- background: mean RGB, contrast, and its 2×2 layout (quadrant means of the time-averaged background
  less their mean): what a seed changes besides the start position, so diversity can see it.

Why these and not a learned network: every shapes-world failure that matters has a feature that moves
with it by construction (blur: sharpness and high-frequency energy; wrong or jerky motion: velocity,
position and residual; wrong colour, shape or texture: their descriptors; collapse: the background
and position), they need no training stage, no weights and no GPU, and they mean the same on every
machine.  A network trained once on the ground truth would see more, but it would be one more model
to validate, and a Fréchet distance on its features could not be read feature by feature
(``distribution.mean_shift`` says which features move a method's FD).  Features are standardised by
the reference set's mean and standard deviation, floored at each feature's resolution (``FEATURES``).

**Fréchet distance** ``fd``: ‖μ_g − μ_r‖² + Tr(Σ_g + Σ_r − 2 (Σ_g Σ_r)^½) between the method's features
and the reference's, with a 95% bootstrap interval over prompts (each draw resamples prompts and takes
their rows on both sides; the interval is moved onto the estimate, see ``recentred_ci``).
``fd_real_floor`` is the same distance for the floor set, on the same draws: what a perfect generator
scores at this sample size (FD's estimator is biased upwards with few videos); ``fd_excess`` =
fd − floor, paired over the draws: its interval above 0 means measurably unlike the real videos.

**Diversity**: per prompt, the mean pairwise distance (standardised features) between the videos of
its seeds over the same spread of its reference videos; the mean over prompts with ≥ 2 seeds, with a
bootstrap interval over them.  1 = as diverse as the data, → 0 = mode collapse, > 1 = more spread
than the data (e.g. attributes changing with the seed).  ``diversity_real`` is the floor set's: a real
set of the same shape, ≈ 1.  It needs ≥ 2 seeds per prompt in the samples (``world.eval_seeds``);
with one, diversity is None and ``distribution.note`` says so.

**Open captions** (opt-in: ``world.open_share``, ``world.eval_open_prompts``; docs/shapes-world.md): a
prompt that leaves attributes open has several right videos, one per value of each open attribute, and
the world draws them uniformly per seed.  Few-step samplers lose that multimodality in two ways, which
``open_world_metrics`` measures from the detector's reading of each video (``shapes.detect``,
``shapes.averaged_mode``), in an ``open_world`` block added only when the option is on:

- *coverage* per open attribute: the total-variation distance between the detected values over the
  rows whose prompt leaves that attribute open (pooled over those prompts, undetected counted as a value
  of its own) and the detected values of the real reference renders of the same prompts (weighted like
  the rows), which carries the detector's own errors; the floor set's distance to the same reference
  is what real videos score at this sample size, and the excess (paired over the same draws) is the
  coverage lost.  Beside it, *repeat*: the share of seed pairs of one prompt that agree on the value
  (real: ≈ 1/K for K values, → 1 for a collapse that a pooled distribution can hide when different
  prompts collapse onto different values), with its floor and excess.  Intervals: 95% bootstrap over
  prompts (their rows on every side), moved onto the estimate (``recentred_ci``).
- *averaged modes*: the share of videos ``shapes.averaged_mode`` flags (blended colours, ghosts, smears;
  a clean render never), with the floor set's share and the paired excess, bootstrapped over rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dcm.config import Params
from dcm.data.prompts import TRAIN_SEED_LIMIT
from dcm.evaluation.scoring import bootstrap
from dcm.worlds import shapes

# reference videos per prompt (256 renders for 32 prompts), so the reference side of FD is stable
REAL_SEEDS_PER_PROMPT = 8
REAL_SEED_BASE = 3 * TRAIN_SEED_LIMIT  # train [0, L), eval [L, 2L), validation [2L, 3L): real sets [3L, 4L)
MIN_SEEDS_FOR_DIVERSITY = 2
METRIC_KEYS = ("fd", "fd_ci95", "fd_real_floor", "fd_real_floor_ci95", "fd_excess", "fd_excess_ci95",
               "diversity", "diversity_ci95", "diversity_real", "diversity_real_ci95")

# Each feature and its resolution: the smallest difference worth one unit, the floor under the reference
# set's standard deviation (features constant on real data, such as flicker, would otherwise make any
# deviation an unbounded distance).  Shape, colour, texture, motion and sharpness features are O(1) in
# their units (5% of that range); positions are in frame widths (half a pixel at the 32 px reference);
# flicker and the background live on the dim background's scale ([0, 1] grey): 0.01 ≈ 2.5 of 255 levels of
# flicker (shapes-bench temporal_flickering 0.99), 0.005 of background colour or layout.
FEATURES: dict[str, float] = {
    "object_area": 0.05, "object_area_cv": 0.05, "object_extent": 0.05, "object_widening": 0.05,
    "object_r": 0.05, "object_g": 0.05, "object_b": 0.05, "texture_rows": 0.05, "texture_cols": 0.05,
    "position_x": 1 / 64, "position_y": 1 / 64, "velocity_x": 0.05, "velocity_y": 0.05,
    "track_residual": 0.05, "found_fraction": 0.05,
    "edge_sharpness": 0.05, "high_frequency": 0.05, "flicker": 0.01,
    "background_r": 0.005, "background_g": 0.005, "background_b": 0.005, "background_contrast": 0.005,
    "layout_top_left": 0.005, "layout_top_right": 0.005, "layout_bottom_left": 0.005,
    "layout_bottom_right": 0.005,
}
RESOLUTION = np.array(list(FEATURES.values()))


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def _foreground(rgb: np.ndarray) -> np.ndarray:
    """(T, H, W) object pixels: HSV saturation above the detector's threshold (texture-invariant)."""
    high, low = rgb.max(axis=0), rgb.min(axis=0)
    return (high - low) / np.maximum(high, shapes.VALUE_FLOOR) > shapes.SATURATION_THRESHOLD


def _shape_features(fg: np.ndarray, size: int) -> list[float]:
    """Mean area and bounding-box area (÷ the square's), the area's variation over time, lower-half
    widening."""
    square = (2 * shapes.object_half_extent(size) + 1) ** 2
    areas, extents, widenings = [], [], []
    for mask in fg:
        rows, cols = np.nonzero(mask)
        if rows.size == 0:
            continue
        top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
        areas.append(rows.size)
        extents.append((bottom - top + 1) * (right - left + 1) / square)
        widths = mask[top:bottom + 1].sum(axis=1).astype(np.float64)
        half = widths.size // 2
        widenings.append((widths[widths.size - half:].mean() - widths[:half].mean()) / widths.max()
                         if half else 0.0)
    if not areas:
        return [0.0, 0.0, 0.0, 0.0]
    area = np.array(areas, dtype=np.float64)
    return [area.mean() / square, area.std() / area.mean(), float(np.mean(extents)),
            float(np.mean(widenings))]


def _colour_texture_features(rgb: np.ndarray, fg: np.ndarray, size: int) -> list[float]:
    """Mean RGB of the brightest quarter of object pixels; brightness change one band apart along rows,
    columns."""
    if not fg.any():
        return [0.0] * 5
    value = rgb.max(axis=0)
    pixels, values = rgb[:, fg], value[fg]
    colour = pixels[:, values >= np.percentile(values, 75)].mean(axis=1)
    relative = value / max(float(np.percentile(values, 90)), shapes.VALUE_FLOOR)
    band = shapes.band_width(size)

    def change(axis: int) -> float:
        n = fg.shape[axis]
        first, second = np.arange(n - band), np.arange(band, n)
        both = fg.take(first, axis) & fg.take(second, axis)
        return (float(np.abs(relative.take(second, axis) - relative.take(first, axis))[both].mean())
                if both.any() else 0.0)

    return [*colour.tolist(), change(1), change(2)]


def _motion_features(det: shapes.Detection, size: int) -> list[float]:
    """Track position at mid-clip (÷ size), velocity (px/frame at the reference size), residual, found
    share."""
    unit = shapes.speed_px_per_frame("slowly", size)  # 1 px/frame at the 32 px reference
    times = np.flatnonzero(det.found)
    frames = det.found.size
    if times.size == 0:
        return [0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    track = det.track[times]
    if times.size == 1:
        position, velocity, residual = track[0], np.zeros(2), 0.0
    else:
        fits = [np.polyfit(times, track[:, k], 1) for k in (0, 1)]
        velocity = np.array([f[0] for f in fits])
        position = np.array([np.polyval(f, (frames - 1) / 2) for f in fits])
        residual = float(np.sqrt(np.mean([(track[:, k] - np.polyval(fits[k], times)) ** 2 for k in (0, 1)])))
    return [*(position / size).tolist(), *(velocity / unit).tolist(), residual / unit, times.size / frames]


def _sharpness_features(rgb: np.ndarray, fg: np.ndarray, det: shapes.Detection) -> list[float]:
    """Edge sharpness, log high-frequency energy share of the frames, flicker of static background pixels."""
    grey = rgb.mean(axis=0)  # (T, H, W)
    padded = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")
    laplacian = (4 * grey - padded[:, :-2, 1:-1] - padded[:, 2:, 1:-1]
                 - padded[:, 1:-1, :-2] - padded[:, 1:-1, 2:])
    variance = float(np.mean((grey - grey.mean(axis=(1, 2), keepdims=True)) ** 2))
    high_frequency = float(np.log((np.mean(laplacian ** 2) + 1e-8) / (variance + 1e-8)))
    static = ~fg[1:] & ~fg[:-1]
    flicker = float(np.abs(np.diff(grey, axis=0))[static].mean()) if static.any() else 0.0
    return [float(det.sharpness), high_frequency, flicker]


def _background_features(rgb: np.ndarray, fg: np.ndarray) -> list[float]:
    """Mean background RGB, contrast of the time-averaged background, its 2×2 layout (quadrants less their
    mean)."""
    background = ~fg
    if not background.any():
        return [0.0] * 8
    colour = rgb[:, background].mean(axis=1)
    grey = rgb.mean(axis=0)
    seen = background.sum(axis=0)
    mean_grey = float(grey[background].mean())
    image = np.where(seen > 0, (grey * background).sum(axis=0) / np.maximum(seen, 1), mean_grey)  # (H, W)
    h, w = image.shape
    quadrants = np.array([image[:h // 2, :w // 2].mean(), image[:h // 2, w // 2:].mean(),
                          image[h // 2:, :w // 2].mean(), image[h // 2:, w // 2:].mean()])
    return [*colour.tolist(), float(image.std()), *(quadrants - quadrants.mean()).tolist()]


def _describe(video: torch.Tensor, size: int) -> tuple[np.ndarray, shapes.Detection]:
    """``video_features`` and the detection they read."""
    array = torch.as_tensor(video).detach().to("cpu", torch.float32).numpy()
    rgb = np.clip((np.nan_to_num(array) + 1.0) / 2.0, 0.0, 1.0)
    fg = _foreground(rgb)
    det = shapes.detect(torch.from_numpy(array), size_hint=size)
    features = [*_shape_features(fg, size), *_colour_texture_features(rgb, fg, size),
                *_motion_features(det, size), *_sharpness_features(rgb, fg, det),
                *_background_features(rgb, fg)]
    return np.asarray(features, dtype=np.float64), det


def video_features(video: torch.Tensor, size: int) -> np.ndarray:
    """The ``FEATURES`` of one (3, T, H, W) video in [-1, 1]; ``size`` is the world's frame size."""
    return _describe(video, size)[0]


def check_videos(videos: torch.Tensor, size: int, frames: int, what: str) -> None:
    """Raise ValueError naming ``what`` unless ``videos`` is a non-empty (N, 3, frames, size, size) batch."""
    shape = tuple(videos.shape)
    if len(shape) != 5 or shape[1:] != (3, frames, size, size):
        raise ValueError(f"{what}: expected videos of shape (N, 3, {frames}, {size}, {size}) "
                         f"(world.frames={frames}, world.size={size}), got {shape}")
    if shape[0] == 0:
        raise ValueError(f"{what}: no videos (an empty set has no distribution to compare)")


def features(videos: torch.Tensor, size: int) -> np.ndarray:
    """(N, len(FEATURES)) features of a (N, 3, T, H, W) batch."""
    return (np.stack([video_features(v, size) for v in videos]) if len(videos)
            else np.zeros((0, len(FEATURES))))


@dataclass(frozen=True)
class Observations:
    """What the metrics read from a batch of videos: ``features``, and per video the detected attributes
    and its ``shapes.averaged_mode`` reading."""

    features: np.ndarray
    attributes: list[dict[str, str | None]]
    averaged: list[shapes.AveragedMode]


def observe(videos: torch.Tensor, size: int) -> Observations:
    """``features`` of a (N, 3, T, H, W) batch (the same numbers), with each video's detected attributes and
    averaged-mode reading."""
    described = [_describe(v, size) for v in videos]
    return Observations(
        np.stack([f for f, _ in described]) if described else np.zeros((0, len(FEATURES))),
        [det.attributes for _, det in described],
        [shapes.averaged_mode(v, size_hint=size) for v in videos])


# --------------------------------------------------------------------------------------------
# Real videos
# --------------------------------------------------------------------------------------------


def real_videos(prompts: Sequence[str], seeds: Sequence[int], size: int, frames: int,
                jitter: float | None) -> torch.Tensor:
    """Clean renders of ``prompts[i]`` at ``seeds[i]``: the world's ground truth, as ``score_rows`` draws
    it."""
    scenes = [shapes.sample_scene(np.random.default_rng(s), size, frames, caption=p, jitter=jitter)
              for p, s in zip(prompts, seeds, strict=True)]
    return shapes.render_batch(scenes, size, frames)


@dataclass(frozen=True)
class RealSets:
    """The two disjoint real sets of some rows: ``reference`` (``per_prompt`` seeds per prompt) and ``floor``
    (one real video per row, the rows' prompts), as features, with each video's prompt."""

    reference: np.ndarray
    reference_prompts: list[str]
    floor: np.ndarray
    floor_prompts: list[str]
    # with ``real_sets(observe_open=True)``: the real videos' readings the open-caption metrics compare with
    reference_observed: Observations | None = None
    floor_observed: Observations | None = None


def real_sets(prompts: Sequence[str], size: int, frames: int, jitter: float | None, seed: int,
              per_prompt: int = REAL_SEEDS_PER_PROMPT, observe_open: bool = False) -> RealSets:
    """Render and describe the real sets for rows with these ``prompts`` (one entry per row); seeds come
    from [REAL_SEED_BASE, REAL_SEED_BASE + TRAIN_SEED_LIMIT), distinct, deterministic in ``seed`` and the
    prompts.  ``observe_open`` keeps the detections and averaged-mode readings as well (same features)."""
    unique = list(dict.fromkeys(prompts))
    reference_prompts = [p for p in unique for _ in range(per_prompt)]
    floor_prompts = list(prompts)
    rng = np.random.default_rng([seed, 3])
    seeds = REAL_SEED_BASE + rng.choice(TRAIN_SEED_LIMIT, size=len(reference_prompts) + len(floor_prompts),
                                        replace=False)
    videos = real_videos(reference_prompts + floor_prompts, seeds.tolist(), size, frames, jitter)
    k = len(reference_prompts)
    if not observe_open:
        described = features(videos, size)
        return RealSets(described[:k], reference_prompts, described[k:], floor_prompts)
    seen = observe(videos, size)
    reference, floor = (Observations(seen.features[part], seen.attributes[part], seen.averaged[part])
                        for part in (slice(0, k), slice(k, None)))
    return RealSets(reference.features, reference_prompts, floor.features, floor_prompts, reference, floor)


# --------------------------------------------------------------------------------------------
# Fréchet distance and diversity
# --------------------------------------------------------------------------------------------


def standardiser(reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scale (standard deviation, floored at each feature's resolution) of the reference features."""
    return reference.mean(axis=0), np.maximum(reference.std(axis=0), RESOLUTION)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) of two (N, D) feature sets (N ≥ 2 each).

    Tr (Σ_a Σ_b)^½ = Σ √eig(Σ_a^½ Σ_b Σ_a^½): symmetric eigenproblems only, stable for singular Σ.
    """
    for name, x in (("first", a), ("second", b)):
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"frechet_distance: the {name} set needs ≥ 2 feature rows of shape (N, D), "
                             f"got {x.shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    mean_term = float(np.sum((a.mean(axis=0) - b.mean(axis=0)) ** 2))
    return mean_term + float(np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


def spread(x: np.ndarray) -> float:
    """Mean pairwise Euclidean distance between the rows of ``x`` (≥ 2 rows)."""
    i, j = np.triu_indices(len(x), k=1)
    return float(np.linalg.norm(x[i] - x[j], axis=1).mean())


def _by_prompt(x: np.ndarray, prompts: Sequence[str], order: Sequence[str]) -> list[np.ndarray]:
    """The rows of ``x`` of each prompt in ``order`` (empty where a prompt has none)."""
    index = {p: k for k, p in enumerate(order)}
    rows: list[list[int]] = [[] for _ in order]
    for r, p in enumerate(prompts):
        rows[index[p]].append(r)
    return [x[np.array(g, dtype=np.int64)] for g in rows]


def _diversity(groups: list[np.ndarray], reference_groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt: the spread of its videos (NaN below 2 seeds) and its ratio to the reference's spread."""
    own = np.array([spread(g) if len(g) >= MIN_SEEDS_FOR_DIVERSITY else np.nan for g in groups])
    real = np.array([spread(r) for r in reference_groups])
    return own, own / np.maximum(real, 1e-12)


def recentred_ci(point: float, draws: np.ndarray, low: float | None = None) -> list[float]:
    """95% percentile interval of bootstrap ``draws`` moved so that their median sits on ``point``.

    Resampling prompts with replacement repeats videos, which inflates FD's small-sample bias: every draw
    of a real-vs-real FD can lie above the estimate itself, and the plain percentile interval would
    exclude it.  Moving the interval by that bias keeps the spread (and its asymmetry) around the
    estimate; ``low`` clips it (an FD is ≥ 0).
    """
    lo, median, hi = np.percentile(draws, [2.5, 50, 97.5])
    bounds = [point - (median - lo), point + (hi - median)]
    return [float(b) if low is None else float(max(b, low)) for b in bounds]


def _mean_ci(values: np.ndarray, n: int, seed: int) -> tuple[float | None, list[float] | None]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None, None
    return float(values.mean()), list(bootstrap(values, np.mean, n, seed))


def compare(generated: np.ndarray, prompts: Sequence[str], real: RealSets, n: int = 1000,
            seed: int = 0) -> dict:
    """FD (with its real floor and the paired excess) and diversity of ``generated`` features, one row per
    video of ``prompts[i]``, against ``real`` (``real_sets`` of the same prompts); ``n`` bootstrap draws."""
    if generated.ndim != 2 or generated.shape[1] != len(FEATURES):
        raise ValueError(f"generated features must be (N, {len(FEATURES)}), got {generated.shape}")
    if len(generated) != len(prompts):
        raise ValueError(f"{len(generated)} feature rows for {len(prompts)} prompts: one row per video")
    if len(generated) < 2:
        raise ValueError(f"a Fréchet distance needs ≥ 2 generated videos, got {len(generated)}")
    order = list(dict.fromkeys(real.reference_prompts))
    unknown = sorted(set(prompts) - set(order))
    if unknown:
        raise ValueError(f"{len(unknown)} prompts have no real reference videos, e.g. {unknown[0]!r}")
    mean, scale = standardiser(real.reference)
    present = [p for p in order if p in set(prompts)]  # the prompts the method sampled
    gen, ref, floor = (_by_prompt((x - mean) / scale, ps, present) for x, ps in (
        (generated, prompts), (real.reference, real.reference_prompts), (real.floor, real.floor_prompts)))

    def distances(chosen: Sequence[int]) -> tuple[float, float]:
        """FD of the generated and of the floor videos of the ``chosen`` prompts to their reference videos."""
        r = np.concatenate([ref[k] for k in chosen])
        return (frechet_distance(np.concatenate([gen[k] for k in chosen]), r),
                frechet_distance(np.concatenate([floor[k] for k in chosen]), r))

    fd, fd_floor = distances(range(len(present)))
    rng = np.random.default_rng(seed)
    draws = np.array([distances(rng.integers(0, len(present), len(present))) for _ in range(n)])
    spreads, ratios = _diversity(gen, ref)
    _, floor_ratios = _diversity(floor, ref)
    diversity, diversity_ci = _mean_ci(ratios, n, seed)
    diversity_real, diversity_real_ci = _mean_ci(floor_ratios, n, seed)
    seeds = [len(g) for g in gen]
    with_seeds = int(np.isfinite(ratios).sum())
    note = (f"diversity over the {with_seeds} prompts with ≥ {MIN_SEEDS_FOR_DIVERSITY} seeds "
            f"(seeds per prompt: {min(seeds)} to {max(seeds)})" if with_seeds else
            f"diversity not computed: every prompt was sampled with {max(seeds)} seed; it needs "
            f"≥ {MIN_SEEDS_FOR_DIVERSITY} seeds per prompt (world.eval_seeds)")
    shift = (np.concatenate(gen).mean(axis=0) - np.concatenate(ref).mean(axis=0))
    return {
        "fd": fd, "fd_ci95": recentred_ci(fd, draws[:, 0], low=0.0),
        "fd_real_floor": fd_floor, "fd_real_floor_ci95": recentred_ci(fd_floor, draws[:, 1], low=0.0),
        "fd_excess": fd - fd_floor, "fd_excess_ci95": recentred_ci(fd - fd_floor, draws[:, 0] - draws[:, 1]),
        "diversity": diversity, "diversity_ci95": diversity_ci,
        "diversity_real": diversity_real, "diversity_real_ci95": diversity_real_ci,
        "distribution": {
            "prompts": len(present), "videos": len(generated), "seeds_per_prompt": [min(seeds), max(seeds)],
            "real_seeds_per_prompt": len(real.reference_prompts) // len(order),
            "prompts_with_diversity": with_seeds, "note": note,
            # mean of the generated features less the reference's, in resolution-floored standard deviations
            "mean_shift": {name: float(v) for name, v in zip(FEATURES, shift)},
            "per_prompt": [{"prompt": p, "seeds": k, "spread": float(s) if np.isfinite(s) else None,
                            "diversity": float(d) if np.isfinite(d) else None}
                           for p, k, s, d in zip(present, seeds, spreads, ratios)],
        },
    }


# --------------------------------------------------------------------------------------------
# Open captions: coverage of the unnamed attributes and averaged modes
# --------------------------------------------------------------------------------------------

NONE_VALUE = "none"  # the detector read no value: counted as a value of its own in coverage


def _tv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Total-variation distance of distributions along the last axis."""
    return 0.5 * np.abs(a - b).sum(axis=-1)


def _value_counts(attributes: Sequence[dict], attribute: str, values: Sequence[str]) -> np.ndarray:
    """(len(values) + 1,) counts of each value of ``attribute`` and, last, of undetected (None)."""
    counts = np.zeros(len(values) + 1)
    for read in attributes:
        counts[values.index(read[attribute]) if read[attribute] is not None else len(values)] += 1
    return counts


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def coverage_draws(attribute: str, rows: list[int], prompts: Sequence[str], generated: Observations,
                   real: RealSets, weights: np.ndarray, present: list[str]) -> dict[str, np.ndarray]:
    """The draws ``_coverage`` summarises, one per row of ``weights`` ((n, prompts) bootstrap weights of the
    prompts in ``present``, row 0 the sample itself): ``tv`` and ``tv_floor`` (the generated and the floor
    set's distance to the reference), ``repeat`` and ``repeat_floor``, and the pooled ``detected`` and
    ``real`` distributions.  Two samplers scored with the same ``weights`` give paired draws
    (``benchmarks/world_decision.py``)."""
    values = list(shapes.VOCABULARY[attribute])
    k = len(values)
    by_prompt = {p: [i for i in rows if prompts[i] == p] for p in present}
    ref_rows = {p: [j for j, q in enumerate(real.reference_prompts) if q == p] for p in present}
    gen = np.stack([_value_counts([generated.attributes[i] for i in by_prompt[p]], attribute, values)
                    for p in present])  # (P, K + 1)
    floor = np.stack([_value_counts([real.floor_observed.attributes[i] for i in by_prompt[p]], attribute,
                                    values) for p in present])
    reference = np.stack([_value_counts([real.reference_observed.attributes[j] for j in ref_rows[p]],
                                        attribute, values) for p in present])
    n_rows = gen.sum(axis=1)  # rows per prompt (the floor set has as many)
    reference = reference / reference.sum(axis=1, keepdims=True) * n_rows[:, None]  # weighted like the rows

    def pooled(counts: np.ndarray) -> np.ndarray:  # (n, K + 1) distributions of every draw
        return (weights @ counts) / (weights @ n_rows)[:, None]

    def repeat(counts: np.ndarray) -> np.ndarray:  # share of same-prompt seed pairs agreeing on a value
        agree = (counts[:, :k] * (counts[:, :k] - 1) / 2).sum(axis=1)
        return _ratio(weights @ agree, weights @ (n_rows * (n_rows - 1) / 2))

    ref_dist = pooled(reference)
    gen_dist = pooled(gen)
    return {"tv": _tv(gen_dist, ref_dist), "tv_floor": _tv(pooled(floor), ref_dist), "repeat": repeat(gen),
            "repeat_floor": repeat(floor), "detected": gen_dist, "floor": pooled(floor), "real": ref_dist,
            "rows_per_prompt": n_rows}


def _coverage(attribute: str, rows: list[int], prompts: Sequence[str], generated: Observations,
              real: RealSets, weights: np.ndarray, present: list[str]) -> dict:
    """Coverage of ``attribute`` over ``rows`` (those leaving it open); ``weights``: (n, prompts) bootstrap
    draws of the prompts in ``present`` (row 0: the sample itself)."""
    values = list(shapes.VOCABULARY[attribute])
    k = len(values)
    d = coverage_draws(attribute, rows, prompts, generated, real, weights, present)
    tv, tv_floor, rep, rep_floor = d["tv"], d["tv_floor"], d["repeat"], d["repeat_floor"]
    uniform = np.append(np.full(k, 1 / k), 0.0)
    names = [*values, NONE_VALUE]
    out = {
        "rows": len(rows), "prompts": len(present),
        "tv": float(tv[0]), "tv_ci95": recentred_ci(tv[0], tv[1:], low=0.0),
        "tv_real_floor": float(tv_floor[0]),
        "tv_real_floor_ci95": recentred_ci(tv_floor[0], tv_floor[1:], low=0.0),
        "tv_excess": float(tv[0] - tv_floor[0]),
        "tv_excess_ci95": recentred_ci(tv[0] - tv_floor[0], tv[1:] - tv_floor[1:]),
        "tv_uniform": float(_tv(d["detected"][0], uniform)),
        "tv_uniform_real_floor": float(_tv(d["floor"][0], uniform)),
        "detected": dict(zip(names, d["detected"][0].round(6).tolist(), strict=True)),
        "real": dict(zip(names, d["real"][0].round(6).tolist(), strict=True)),
        "repeat": None, "repeat_ci95": None, "repeat_real_floor": None, "repeat_excess": None,
        "repeat_excess_ci95": None, "repeat_uniform": 1 / k,
    }
    if np.isfinite(rep[0]):
        ok = np.isfinite(rep[1:])
        out.update({
            "repeat": float(rep[0]), "repeat_ci95": recentred_ci(rep[0], rep[1:][ok], low=0.0),
            "repeat_real_floor": float(rep_floor[0]), "repeat_excess": float(rep[0] - rep_floor[0]),
            "repeat_excess_ci95": recentred_ci(rep[0] - rep_floor[0], (rep - rep_floor)[1:][ok]),
        })
    return out


def prompt_weights(prompts: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n + 1, prompts) bootstrap weights: row 0 the sample itself, then ``n`` resamples of the prompts
    (how often each is drawn), the ``weights`` of ``coverage_draws``."""
    draws = rng.integers(0, prompts, (n, prompts))
    weights = np.zeros((n + 1, prompts))
    weights[0] = 1.0
    np.add.at(weights, (1 + np.arange(n)[:, None], draws), 1.0)
    return weights


def open_world_metrics(prompts: Sequence[str], generated: Observations, real: RealSets, n: int = 1000,
                       seed: int = 0) -> dict:
    """Coverage of every attribute some prompt leaves open, and the averaged-mode share (module docstring),
    of ``generated`` (one reading per row of ``prompts``) against ``real`` (``real_sets(observe_open=True)``
    of the same prompts); ``n`` bootstrap draws."""
    if real.reference_observed is None or real.floor_observed is None:
        raise ValueError("open_world_metrics needs real sets made with real_sets(..., observe_open=True)")
    if not len(generated.attributes) == len(prompts) == len(real.floor_prompts):
        raise ValueError(f"{len(generated.attributes)} generated readings, {len(prompts)} prompts and "
                         f"{len(real.floor_prompts)} floor videos: one of each per row")
    flags = np.array([a.flagged for a in generated.averaged], dtype=np.float64)
    floor_flags = np.array([a.flagged for a in real.floor_observed.averaged], dtype=np.float64)
    averaged = {
        "share": float(flags.mean()), "ci95": list(bootstrap(flags, np.mean, n, seed)),
        "real_floor": float(floor_flags.mean()),
        "real_floor_ci95": list(bootstrap(floor_flags, np.mean, n, seed)),
        "excess": float(flags.mean() - floor_flags.mean()),
        "excess_ci95": list(bootstrap(flags - floor_flags, np.mean, n, seed)),
        "mixed_share": float(np.mean([a.mixed_share for a in generated.averaged])),
        "mixed_share_real_floor": float(np.mean([a.mixed_share for a in real.floor_observed.averaged])),
        "flagged_rows": np.flatnonzero(flags).tolist(),
        "thresholds": {"pure_distance": shapes.PURE_DISTANCE, "mixed_share": shapes.MIXED_SHARE_THRESHOLD,
                       "footprint": shapes.FOOTPRINT_THRESHOLD},
    }
    open_sets = [shapes.open_attributes_of(p) for p in prompts]
    coverage = {}
    rng = np.random.default_rng([seed, 5])
    for attribute in shapes.ATTRIBUTES:
        rows = [i for i, s in enumerate(open_sets) if attribute in s]
        if not rows:
            continue
        present = list(dict.fromkeys(prompts[i] for i in rows))
        weights = prompt_weights(len(present), n, rng)
        coverage[attribute] = _coverage(attribute, rows, prompts, generated, real, weights, present)
    open_rows = sum(bool(s) for s in open_sets)
    note = (f"coverage over the {open_rows} rows whose prompt leaves an attribute open" if open_rows else
            "no row's prompt leaves an attribute open (world.eval_open_prompts = 0?): no coverage")
    return {"open_rows": open_rows, "rows": len(prompts), "coverage": coverage, "averaged_mode": averaged,
            "note": note}


def open_world_on(params: Params, prompts: Sequence[str]) -> bool:
    """Whether the open-caption metrics are reported: the world draws open captions, or a row's prompt is
    one (the default world adds nothing to the metrics)."""
    world = params.world
    return world.open_share > 0 or world.eval_open_prompts > 0 or any(shapes.is_open(p) for p in prompts)


def distribution_metrics(params: Params, rows: list[dict], videos: torch.Tensor) -> dict:
    """FD and diversity of one method's sampled ``videos`` (one per row of its samples.json) against real
    renders of the same prompts (``compare``; the world, bootstrap size and seed from ``params``), and the
    ``open_world`` block (``open_world_metrics``) where ``open_world_on``."""
    size, frames = params.world.size, params.world.frames
    check_videos(videos, size, frames, "distribution metrics")
    if len(rows) != len(videos):
        raise ValueError(f"distribution metrics: {len(videos)} videos for {len(rows)} rows of samples.json")
    prompts = [r["prompt"] for r in rows]
    open_world = open_world_on(params, prompts)
    if len(videos) < 2:  # one row: nothing to estimate a distribution from, but nothing wrong either
        note = f"not computed: a Fréchet distance needs ≥ 2 sampled videos, the samples have {len(videos)}"
        out = {**dict.fromkeys(METRIC_KEYS), "distribution": {"videos": len(videos), "note": note}}
        if open_world:
            out["open_world"] = {"note": note.replace("a Fréchet distance", "coverage")}
        return out
    n, seed = params.evaluation.bootstrap, params.seed
    real = real_sets(prompts, size, frames, params.world.position_jitter, seed, observe_open=open_world)
    if not open_world:
        return compare(features(videos, size), prompts, real, n, seed)
    generated = observe(videos, size)
    return {**compare(generated.features, prompts, real, n, seed),
            "open_world": open_world_metrics(prompts, generated, real, n, seed)}
