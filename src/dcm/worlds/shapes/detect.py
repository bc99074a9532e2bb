"""The shapes world's analytic detector: reads colour, shape, texture, direction and speed back from a
video."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dcm.worlds.shapes.grammar import ATTRIBUTES, COLOURS, SPEEDS, make_caption, parse_open_caption
from dcm.worlds.shapes.render import (
    BACKGROUND_RANGE,
    COLOUR_RGB,
    DARKEN,
    _scale,
    band_width,
    object_half_extent,
    shape_template,
    speed_px_per_frame,
)

# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------

# Detector thresholds (saturation is texture-invariant: bright and darkened parts alike ~0.85).
SATURATION_THRESHOLD = 0.6  # objects ~0.85, background ~0.05; high enough to cut blurred rims
EDGE_THRESHOLD = 0.45  # halfway between background and object saturation, for edge location
SMOOTH_SATURATION_THRESHOLD = 0.3  # same on 5-px plus averages: rejects isolated noisy pixels
VALUE_FLOOR = 0.1  # floor on the HSV value when dividing, so near-black pixels are unsaturated
TRIANGLE_WIDENING_THRESHOLD = 0.2  # (lower - upper half mean row width) / widest row; clean 0.55
CORNER_THRESHOLD = 1.4  # |u| + |v| beyond which a box corner lies outside the inscribed disc
SQUARE_CORNER_OCCUPANCY = 0.5  # share of box-corner pixels set: square ~1, disc ~0
TEXTURE_CONTRAST_THRESHOLD = 0.15  # brightness change one band apart: textures ~0.65, plain <0.1
MIN_SHARE_NEAR_OBJECT = 0.6  # share of foreground that must lie near its median pixel
MIN_SOLID_SHARE = 0.2  # share of object pixels with all 4 neighbours set: shapes 0.3-0.8, noise <0.1
STILL_THRESHOLD_AT_REFERENCE = 0.3  # px/frame below which the object does not move


@dataclass
class Detection:
    """Attributes read back from a video; None where undecidable."""

    shape: str | None
    colour: str | None
    texture: str | None
    direction: str | None
    speed: str | None
    track: np.ndarray  # (frames, 2) detected centres (x, y), NaN where no object was found
    sharpness: float  # edge crispness in [0, 1]: ~1 for a clean render, lower the blurrier
    found: np.ndarray  # (frames,) bool

    @property
    def attributes(self) -> dict[str, str | None]:
        """The five caption attributes as a dict."""
        return {attribute: getattr(self, attribute) for attribute in ATTRIBUTES}

    @property
    def caption(self) -> str | None:
        """The caption of the detected attributes, or None if any is missing."""
        if any(value is None for value in self.attributes.values()):
            return None
        return make_caption(**self.attributes)


def _pad_frames(images: np.ndarray, replicate: bool = False) -> np.ndarray:
    """(T, H, W) images with a 1-px border of zeros (or replicated edge pixels); faster than np.pad."""
    t, h, w = images.shape
    padded = np.zeros((t, h + 2, w + 2), dtype=images.dtype)
    padded[:, 1:-1, 1:-1] = images
    if replicate:
        padded[:, 0, 1:-1], padded[:, -1, 1:-1] = images[:, 0], images[:, -1]
        padded[:, :, 0], padded[:, :, -1] = padded[:, :, 1], padded[:, :, -2]
    return padded


def _neighbour_count(mask: np.ndarray) -> np.ndarray:
    """Number of set pixels in each 3x3 neighbourhood (itself included) of (T, H, W) masks."""
    padded = _pad_frames(mask.astype(np.int16))
    h, w = mask.shape[1:]
    return sum(padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3))


def _erode4(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbours are all in the mask (outside the frame counts as empty)."""
    padded = _pad_frames(mask)
    return (mask & padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1]
            & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:])


def _open3x3(mask: np.ndarray) -> np.ndarray:
    """Morphological opening of one (H, W) mask with a 3x3 square: removes parts thinner than 3 px."""
    eroded = _neighbour_count(mask[None])[0] == 9
    return _neighbour_count(eroded[None])[0] > 0


def _clean_mask(mask: np.ndarray) -> np.ndarray:
    """Drop isolated noise pixels but keep thin object parts (apex, corners) next to solid ones."""
    core = mask & (_neighbour_count(mask) >= 4)
    return mask & (_neighbour_count(core) > 0)


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV-like saturation (max - min) / max over the channel axis 0; texture-invariant."""
    high, low = rgb.max(axis=0), rgb.min(axis=0)
    return (high - low) / np.maximum(high, VALUE_FLOOR)


def _hue_vector(rgb: np.ndarray) -> np.ndarray:
    """Unit vector of the mean-free RGB colour: brightness- and greyness-invariant hue."""
    centred = rgb - rgb.mean(axis=-1, keepdims=True)
    return centred / np.maximum(np.linalg.norm(centred, axis=-1, keepdims=True), 1e-8)


_COLOUR_HUES = _hue_vector(np.array([COLOUR_RGB[c] for c in COLOURS]))


def _classify_shape(mask: np.ndarray) -> str:
    """Shape of one frame's mask: wider at the bottom = triangle, else filled box corners = square.

    The triangle test compares the mean row width of the lower and upper halves (about 0.55 of
    the widest row for a clean triangle, 0 for the symmetric shapes); it averages over many
    pixels, so it survives blur and noise.  For the square test the mask is opened (3x3) and rows
    and columns holding a single pixel are trimmed from its box, so stray pixels do not stretch
    it; the corners are where |u| + |v| > 1.4 in box coordinates scaled to [-1, 1]: a disc leaves
    them empty, a square (even blurred) fills them.
    """
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    widths = mask[top:bottom + 1].sum(axis=1).astype(np.float64)
    half_height = widths.size // 2
    lower, upper = widths[widths.size - half_height:], widths[:half_height]
    if half_height and (lower.mean() - upper.mean()) / widths.max() > TRIANGLE_WIDENING_THRESHOLD:
        return "triangle"
    opened = _open3x3(mask)
    if opened.sum() >= 0.5 * rows.size:  # drop 1-px noise tendrils; a square is unchanged by it
        mask = opened
    row_counts, col_counts = mask.sum(axis=1), mask.sum(axis=0)
    solid_rows, solid_cols = np.nonzero(row_counts >= 2)[0], np.nonzero(col_counts >= 2)[0]
    if solid_rows.size:
        top, bottom = solid_rows.min(), solid_rows.max()
    if solid_cols.size:
        left, right = solid_cols.min(), solid_cols.max()
    grid_rows, grid_cols = np.mgrid[top:bottom + 1, left:right + 1]
    u = (grid_cols - (left + right) / 2) / ((right - left + 1) / 2)
    v = (grid_rows - (top + bottom) / 2) / ((bottom - top + 1) / 2)
    corners = np.abs(u) + np.abs(v) > CORNER_THRESHOLD
    if not corners.any():
        return "circle"
    occupancy = mask[top:bottom + 1, left:right + 1][corners].mean()
    return "square" if occupancy > SQUARE_CORNER_OCCUPANCY else "circle"


def _majority(votes: list[str]) -> str | None:
    """Most common vote (ties go to the alphabetically first word), None if no votes."""
    if not votes:
        return None
    values, counts = np.unique(np.array(votes), return_counts=True)
    return str(values[np.argmax(counts)])


def _classify_texture(value: np.ndarray, interior: np.ndarray, band: int) -> str | None:
    """Texture from brightness changes one band apart inside the object, along rows and columns.

    Striped (horizontal bands) changes along the vertical axis only, checked along both, plain
    along neither.  Brightness is relative to the object's bright level, so colour does not matter.
    """
    if interior.sum() < 4:
        return None
    bright_level = np.percentile(value[interior], 90)
    relative = value / max(bright_level, VALUE_FLOOR)

    def mean_change(axis: int) -> float:
        n = relative.shape[axis]
        if n <= band:
            return 0.0
        first = [slice(None)] * 3
        second = [slice(None)] * 3
        first[axis], second[axis] = slice(0, n - band), slice(band, n)
        both = interior[tuple(first)] & interior[tuple(second)]
        if not both.any():
            return 0.0
        return float(np.abs(relative[tuple(second)] - relative[tuple(first)])[both].mean())

    vertical, horizontal = mean_change(1), mean_change(2)
    strong, weak = max(vertical, horizontal), min(vertical, horizontal)
    if strong < TEXTURE_CONTRAST_THRESHOLD:
        return "plain"
    return "checked" if weak > 0.5 * strong else "striped"


def _plus_average(image: np.ndarray) -> np.ndarray:
    """Mean of each pixel and its four neighbours in (T, H, W) images (edge pixels replicated)."""
    padded = _pad_frames(image, replicate=True)
    return (padded[:, 1:-1, 1:-1] + padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1]
            + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]) / 5


def _edge_sharpness(saturation: np.ndarray, mask: np.ndarray, region: np.ndarray) -> float:
    """Share of the object/background step taken in one pixel at the object boundary, in [0, 1].

    For every boundary pair (inside pixel p, outside 4-neighbour q = p + e) it compares the
    one-pixel jump s(p) - s(q) with the wider step s(p - 2e) - s(q + 2e) on the saturation map,
    where textures are invisible; summed over all pairs, so noise averages out.  The boundary is
    located on a 5-pixel plus-shaped average of s, which keeps the choice of p and q from favouring
    pixels whose own noise happens to push them across the threshold (that would inflate the jump).
    A clean render gives ~1 and more blur gives less (``degrade`` with blur 1 px stays under 0.7,
    tests/test_shapes_world.py); noise alone barely lowers it: it measures blur, not noise.
    """
    smooth_inside = (_plus_average(saturation) > EDGE_THRESHOLD) & region
    inside, outside = smooth_inside & mask, ~smooth_inside & ~mask
    jump = step = 0.0
    for axis in (1, 2):
        for direction in (1, -1):  # outward direction e along this axis
            s, m_in, m_out = (np.moveaxis(a, axis, 0)[::direction]
                              for a in (saturation, inside, outside))
            length = s.shape[0] - 5
            # index k .. k+5 = p - 2e, p - e, p, q, q + e, q + 2e
            s_at, in_at, out_at = ([a[k:k + length] for k in range(6)] for a in (s, m_in, m_out))
            pairs = in_at[0] & in_at[1] & in_at[2] & out_at[3] & out_at[4] & out_at[5]
            if pairs.any():
                jump += float((s_at[2] - s_at[3])[pairs].sum())
                step += float((s_at[0] - s_at[5])[pairs].sum())
    if step <= 1e-6:
        return 0.0
    return float(np.clip(jump / step, 0.0, 1.0))


def _object_in_frame(mask: np.ndarray, size: int) -> np.ndarray | None:
    """The object's part of one frame's (H, W) foreground mask, or None if it holds no object.

    Keeps the pixels in a window around the median foreground pixel (dropping stray noise far
    away), then requires most foreground to lie there and a solid blob of plausible object size.
    """
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    half = object_half_extent(size)
    reach = 1.6 * half + 1  # the median pixel of every shape lies well within this of its edges
    near = (np.abs(rows - np.median(rows)) <= reach) & (np.abs(cols - np.median(cols)) <= reach)
    if near.sum() < MIN_SHARE_NEAR_OBJECT * rows.size:
        return None  # foreground scattered over the frame: noise, not an object
    object_mask = np.zeros_like(mask)
    object_mask[rows[near], cols[near]] = True
    area = near.sum()
    extent = 2 * half + 1
    if not (0.4 * shape_template("triangle", size).sum() <= area <= 1.6 * extent * extent):
        return None
    if _erode4(object_mask[None])[0].sum() < MIN_SOLID_SHARE * area:
        return None  # speckle rather than a solid shape
    return object_mask


def detect(video: torch.Tensor, size_hint: int | None = None) -> Detection:
    """Read the caption attributes back from a (3, T, H, W) video in [-1, 1].

    Foreground = pixels with high HSV saturation after removing the video's median (background)
    colour cast: objects are saturated in their bright and darkened (0.35x) parts alike, while the
    background is dark grey, so the darkened texture needs no morphological closing.  Isolated
    noisy pixels are dropped (they must also be saturated on a 5-pixel average, and have
    saturated neighbours); a frame counts as found when its foreground is one solid blob of
    plausible object size.  The colour is the hue of the brightest object pixels; shape, texture,
    motion and sharpness are described in their helpers.  ``size_hint`` is the frame size the
    scene geometry was defined at (object size, band width, speeds); default: the video width.
    Never raises on garbage content: undecidable attributes are None, missing centres NaN.
    """
    array = torch.as_tensor(video).detach().to("cpu", torch.float32).numpy()
    if array.ndim != 4 or array.shape[0] != 3:
        raise ValueError(f"expected a (3, T, H, W) video, got shape {tuple(array.shape)}")
    frames, width = array.shape[1], array.shape[3]
    size = size_hint or width
    half, band = object_half_extent(size), band_width(size)

    rgb = np.clip((np.nan_to_num(array) + 1.0) / 2.0, 0.0, 1.0)  # (3, T, H, W) in [0, 1]
    background_rgb = np.median(rgb.reshape(3, -1), axis=1)
    rgb = rgb - (background_rgb - background_rgb.mean())[:, None, None, None]  # remove colour cast
    saturation = _saturation(rgb)
    smooth_saturation = _saturation(np.stack([_plus_average(channel) for channel in rgb]))
    saturated = saturation > SATURATION_THRESHOLD
    confident = _clean_mask(saturated & (smooth_saturation > SMOOTH_SATURATION_THRESHOLD))
    mask = saturated & (_neighbour_count(confident) > 0)  # restores thin dark corner pixels

    found = np.zeros(frames, dtype=bool)
    raw_centres = np.full((frames, 2), np.nan)
    shape_votes: list[str] = []
    for t in range(frames):
        object_mask = _object_in_frame(mask[t], size)
        if object_mask is None:
            mask[t] = False
            continue
        mask[t] = object_mask
        found[t] = True
        rows, cols = np.nonzero(object_mask)
        raw_centres[t] = cols.mean(), rows.mean()
        shape_votes.append(_classify_shape(object_mask))

    shape = _majority(shape_votes)
    track = raw_centres.copy()
    if shape is not None:  # report the shape's centre, not its centroid (they differ for triangles)
        template_rows, template_cols = np.nonzero(shape_template(shape, size))
        track -= np.array([template_cols.mean() - half, template_rows.mean() - half])

    colour = texture = None
    if found.any():
        object_rgb = rgb[:, mask].T  # (N, 3)
        value = object_rgb.max(axis=1)
        brightest = object_rgb[value >= np.percentile(value, 75)]
        hue = _hue_vector(np.median(brightest, axis=0))
        colour = COLOURS[int(np.argmax(_COLOUR_HUES @ hue))]
        texture = _classify_texture(rgb.max(axis=0), _erode4(mask), band)

    direction, speed = _motion(track, found, size)
    near_object = _neighbour_count(_neighbour_count(mask) > 0) > 0  # mask grown by 2 px
    sharpness = _edge_sharpness(saturation, mask, near_object) if found.any() else 0.0
    return Detection(shape=shape, colour=colour, texture=texture, direction=direction,
                     speed=speed, track=track, sharpness=sharpness, found=found)


def _motion(track: np.ndarray, found: np.ndarray, size: int) -> tuple[str | None, str | None]:
    """Direction and speed from the median displacement per frame over all pairs of found frames.

    The median over all frame pairs (Theil-Sen slope) is robust to single bad frames and to the
    per-frame rounding of sub-pixel positions.
    """
    times = np.nonzero(found)[0]
    if times.size < 2:
        return None, None
    i, j = np.triu_indices(times.size, k=1)
    slopes = (track[times[j]] - track[times[i]]) / (times[j] - times[i])[:, None]
    vx, vy = np.median(slopes, axis=0)
    if max(abs(vx), abs(vy)) < STILL_THRESHOLD_AT_REFERENCE * _scale(size):
        return None, None
    if abs(vx) >= abs(vy):
        direction, magnitude = ("right" if vx > 0 else "left"), abs(vx)
    else:
        direction, magnitude = ("down" if vy > 0 else "up"), abs(vy)
    speed = min(SPEEDS, key=lambda word: abs(speed_px_per_frame(word, size) - magnitude))
    return direction, speed


def matches(det: Detection, caption: str, keys: Sequence[str] = ("colour", "shape", "direction")
            ) -> bool:
    """Whether the detection agrees with ``caption`` on every attribute in ``keys``; an attribute an open
    caption leaves unnamed agrees with any value the detector reads (not with None)."""
    wanted = parse_open_caption(caption)
    return all(getattr(det, key) is not None if wanted[key] is None else getattr(det, key) == wanted[key]
               for key in keys)


# --------------------------------------------------------------------------------------------
# Averaged modes: blended colours, ghosts and smears
# --------------------------------------------------------------------------------------------

# A clean render has two kinds of pixel only: background grey (chroma ~0.02, grey level inside
# BACKGROUND_RANGE) and one of the 8 palette colours (each colour bright or DARKEN-ed).  A sample that
# averages modes (two colours, two positions) or is blurred has pixels between them.
PURE_DISTANCE = 0.12  # RGB distance ([0, 1] units) within which a pixel counts as background or palette
MIN_MIXED_NEIGHBOURS = 3  # off-background pixels with fewer such pixels in their 3x3 are noise
MIXED_SHARE_THRESHOLD = 0.25  # mixed share of the object's pixels above which a video is flagged
FOOTPRINT_THRESHOLD = 1.5  # a frame's off-background area (÷ the square's) above which it is flagged
PALETTE = np.array([[brightness * channel for channel in COLOUR_RGB[colour]]
                    for colour in COLOURS for brightness in (1.0, DARKEN)])  # (8, 3)


@dataclass
class AveragedMode:
    """What a video shows of averaged modes (``averaged_mode``)."""

    mixed_share: float  # share of off-background pixels whose colour is no palette colour: 0 when clean
    footprint: float  # largest per-frame off-background area ÷ the square object's: clean ≤ 1
    object_pixels: int  # off-background pixels over all frames (0: nothing but background)

    @property
    def flagged(self) -> bool:
        """Whether the video looks like an average of modes or a smear (module constants)."""
        return self.mixed_share > MIXED_SHARE_THRESHOLD or self.footprint > FOOTPRINT_THRESHOLD


def averaged_mode(video: torch.Tensor, size_hint: int | None = None) -> AveragedMode:
    """Read a (3, T, H, W) video in [-1, 1] for averaged modes: blended colours, ghosts, smears.

    After removing the video's colour cast (as ``detect`` does), each pixel's distance to the
    background is its chroma (distance from the grey axis) combined with how far its grey level lies
    outside ``BACKGROUND_RANGE``, and its distance to the object is the distance to the nearest of the
    8 palette colours (4 colours, bright and darkened).  Pixels farther than ``PURE_DISTANCE`` from
    the background (with ≥ ``MIN_MIXED_NEIGHBOURS`` such pixels around them, so isolated noise does
    not count) are the object's; those of them also farther than that from every palette colour are
    *mixed*: the mean of two palette colours (red + green, or blue + yellow's grey blob brighter than
    any background), a half-intensity ghost (palette + background), or a blurred rim or texture band.
    A clean render has none (its pixels are exact palette or background values); Gaussian noise of
    0.04 per channel ([0, 1] units) leaves the share under 0.11.  The footprint (largest per-frame
    object area ÷ the square's) sees two objects or a wide smear even where their colours are pure.
    ``flagged``: mixed share > ``MIXED_SHARE_THRESHOLD`` or footprint > ``FOOTPRINT_THRESHOLD``.
    """
    array = torch.as_tensor(video).detach().to("cpu", torch.float32).numpy()
    if array.ndim != 4 or array.shape[0] != 3:
        raise ValueError(f"expected a (3, T, H, W) video, got shape {tuple(array.shape)}")
    size = size_hint or array.shape[3]
    rgb = np.clip((np.nan_to_num(array) + 1.0) / 2.0, 0.0, 1.0)
    background_rgb = np.median(rgb.reshape(3, -1), axis=1)
    pixels = np.moveaxis(rgb - (background_rgb - background_rgb.mean())[:, None, None, None], 0, -1)
    grey = pixels.mean(axis=-1)  # (T, H, W)
    chroma = np.linalg.norm(pixels - grey[..., None], axis=-1)
    low, high = BACKGROUND_RANGE
    outside = np.maximum(0.0, np.maximum(grey - high, low - grey))
    off_background = np.hypot(chroma, outside) > PURE_DISTANCE
    off_background &= _neighbour_count(off_background) >= MIN_MIXED_NEIGHBOURS
    to_palette = np.linalg.norm(pixels[..., None, :] - PALETTE, axis=-1).min(axis=-1)
    mixed = off_background & (to_palette > PURE_DISTANCE)
    count = int(off_background.sum())
    square = (2 * object_half_extent(size) + 1) ** 2
    return AveragedMode(mixed_share=float(mixed.sum() / count) if count else 0.0,
                        footprint=float(off_background.sum(axis=(1, 2)).max() / square),
                        object_pixels=count)
