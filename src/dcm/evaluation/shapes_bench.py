"""shapes-bench: VBench-style dimensions computed analytically from the shapes world's ground truth.

Every sampled video is read back by ``shapes.detect`` and compared with the row's true scene and its
clean render.  Each dimension is a score in [0, 1] (1 = as good as the clean render):

Quality group:

- ``subject_consistency``: found-fraction × (1 − cv of object area − mean colour drift of the object);
- ``background_consistency``: 1 − mean |x_t − x_0| / 2 over pixels that are static background in the
  truth;
- ``temporal_flickering``: VBench's (255 − MAE of consecutive frames)/255 on those static pixels;
- ``motion_smoothness``: 1 / (1 + RMS residual, px, of the track around a constant-velocity fit);
- ``dynamic_degree``: 1 if the object moves (median displacement ≥ half the prompted speed) else 0;
- ``imaging_quality``: edge/texture sharpness relative to a clean render (``Detection.sharpness``).

Semantic group: ``object_class``, ``color``, ``motion_direction``, ``speed``, ``texture``: 1 if the
detected shape / colour / motion direction / speed / texture equals the prompt's, else 0.

Open captions (``world.open_share``, docs/shapes-world.md): an attribute the prompt leaves open has no
single right value, so its semantic dimension scores 1 when the detector reads any value of it (the
coverage of its values over seeds is ``distribution.open_world_metrics``'); the static background then
also leaves out the pixels the generated object covers (it may move elsewhere than the seed's scene),
and an open speed takes "slowly" as the prompted speed of ``dynamic_degree``.  Full captions score as
before, bit for bit.

Aggregation follows VBench (``scoring.aggregate``): dynamic degree weight 0.5, others 1;
Quality = weighted mean of the quality group, Semantic of the semantic group, Total = (4Q + S)/5.
Adapted Min/Max: every shapes-bench dimension is already a [0, 1] score against the clean render, so
Min = 0 and Max = 1 (no calibration against VBench's empirical ranges, which do not transfer).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dcm.evaluation.scoring import Dimension
from dcm.worlds import shapes

_Q, _S = "quality", "semantic"
SHAPES_BENCH: dict[str, Dimension] = {
    "subject_consistency": Dimension(0.0, 1.0, 1.0, _Q),
    "background_consistency": Dimension(0.0, 1.0, 1.0, _Q),
    "temporal_flickering": Dimension(0.0, 1.0, 1.0, _Q),
    "motion_smoothness": Dimension(0.0, 1.0, 1.0, _Q),
    "dynamic_degree": Dimension(0.0, 1.0, 0.5, _Q),
    "imaging_quality": Dimension(0.0, 1.0, 1.0, _Q),
    "object_class": Dimension(0.0, 1.0, 1.0, _S),
    "color": Dimension(0.0, 1.0, 1.0, _S),
    "motion_direction": Dimension(0.0, 1.0, 1.0, _S),
    "speed": Dimension(0.0, 1.0, 1.0, _S),
    "texture": Dimension(0.0, 1.0, 1.0, _S),
}


def _object_masks(video: np.ndarray) -> np.ndarray:
    """(T, H, W) foreground masks: saturated pixels (objects are saturated, the background is grey)."""
    rgb = (video.transpose(1, 2, 3, 0) + 1) / 2  # (T, H, W, 3) in [0, 1]
    return (rgb.max(-1) - rgb.min(-1)) > 0.25


def _static_background(clean: np.ndarray, video: np.ndarray | None = None) -> np.ndarray:
    """(H, W) pixels that never change in the clean render: the static background; with ``video`` (an
    open caption's sample), less the pixels its object covers in any frame, grown by one pixel."""
    static = (clean.max(axis=1) - clean.min(axis=1)).max(axis=0) < 1e-6
    if video is None:
        return static
    covered = np.pad(_object_masks(video).any(axis=0), 1)
    h, w = static.shape
    grown = np.zeros_like(static)
    for i in range(3):
        for j in range(3):
            grown |= covered[i:i + h, j:j + w]
    return static & ~grown


def subject_consistency(video: np.ndarray, det: shapes.Detection) -> float:
    masks = _object_masks(video)
    found = det.found & (masks.sum((1, 2)) > 0)
    if found.sum() < 2:
        return 0.0
    areas = masks.sum((1, 2))[found].astype(np.float64)
    colours = np.stack([video[:, t][:, masks[t]].mean(axis=1) for t in np.flatnonzero(found)])
    drift = np.abs(colours - colours.mean(0)).mean()
    return float(np.clip(found.mean() * (1 - areas.std() / areas.mean() - drift), 0, 1))


def background_consistency(video: np.ndarray, clean: np.ndarray, open_caption: bool = False) -> float:
    static = _static_background(clean, video if open_caption else None)
    if not static.any():
        return 1.0
    diff = np.abs(video[:, 1:] - video[:, :1])[:, :, static]
    return float(np.clip(1 - diff.mean() / 2, 0, 1))


def temporal_flickering(video: np.ndarray, clean: np.ndarray, open_caption: bool = False) -> float:
    static = _static_background(clean, video if open_caption else None)
    frames = np.round((np.clip(video, -1, 1) + 1) * 127.5)
    mae = np.abs(np.diff(frames, axis=1))[:, :, static].mean() if static.any() else 0.0
    return float((255 - mae) / 255)


def motion_smoothness(det: shapes.Detection) -> float:
    t = np.flatnonzero(det.found)
    if len(t) < 3:
        return 0.0
    track = det.track[t]
    residual = [track[:, k] - np.polyval(np.polyfit(t, track[:, k], 1), t) for k in (0, 1)]
    rms = float(np.sqrt(np.mean(np.square(residual))))
    return 1.0 / (1.0 + rms)


def dynamic_degree(det: shapes.Detection, scene: shapes.Scene, size: int, open_speed: bool = False) -> float:
    t = np.flatnonzero(det.found)
    if len(t) < 2:
        return 0.0
    steps = np.linalg.norm(np.diff(det.track[t], axis=0), axis=1) / np.diff(t)
    expected = (shapes.speed_px_per_frame(shapes.SPEEDS[0], size) if open_speed
                else float(np.hypot(*scene.velocity(size))))
    return float(np.median(steps) >= 0.5 * expected)


def score_video(video: torch.Tensor, scene: shapes.Scene, size: int, frames: int,
                open_attributes: Sequence[str] = ()) -> dict[str, float]:
    """All shapes-bench dimensions of one generated video (3, T, H, W) in [-1, 1] against its scene;
    ``open_attributes``: those the row's caption leaves open (module docstring)."""
    det = shapes.detect(video)
    v = video.float().numpy()
    clean = shapes.render(scene, size, frames).numpy()
    truth = scene.attributes
    is_open = bool(open_attributes)

    def semantic(attribute: str) -> float:
        found = getattr(det, attribute)
        return float(found is not None if attribute in open_attributes else found == truth[attribute])

    return {
        "subject_consistency": subject_consistency(v, det),
        "background_consistency": background_consistency(v, clean, is_open),
        "temporal_flickering": temporal_flickering(v, clean, is_open),
        "motion_smoothness": motion_smoothness(det),
        "dynamic_degree": dynamic_degree(det, scene, size, "speed" in open_attributes),
        "imaging_quality": float(det.sharpness),
        "object_class": semantic("shape"),
        "color": semantic("colour"),
        "motion_direction": semantic("direction"),
        "speed": semantic("speed"),
        "texture": semantic("texture"),
    }


def psnr(video: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR (dB) on the [-1, 1] range (peak-to-peak 2): trajectory fidelity against teacher-50."""
    mse = float(torch.mean((video.float() - reference.float()) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)
