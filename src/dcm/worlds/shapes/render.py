"""The shapes world's scenes and renderer: geometry at the 32 px reference, scene sampling, rendering,
the high-quality still images and the low-quality degradation."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dcm.worlds.shapes.grammar import (
    ATTRIBUTES,
    SHAPES,
    TEXTURES,
    VOCABULARY,
    _check_word,
    coarsen_caption,
    make_caption,
    parse_open_caption,
)

COLOUR_RGB = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.1),
}
DARKEN = 0.35  # brightness factor of the dark stripes / checks (same hue and saturation)

REFERENCE_SIZE = 32  # frame size at which the pixel constants below are defined
HALF_EXTENT_AT_REFERENCE = 5  # object spans centre ± 5 px, i.e. 11 px across
BAND_WIDTH_AT_REFERENCE = 2  # stripe / check width
SPEED_PX_PER_FRAME_AT_REFERENCE = {"slowly": 1.0, "quickly": 2.0}
MARGIN_AT_REFERENCE = 1  # free pixels kept between the object and the frame border
DIRECTION_UNIT = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}

# Background in [0, 1]: dark grey around 0.3 (i.e. about -0.4 in [-1, 1]), range [0.2, 0.4].
BACKGROUND_GREY = 0.30
BACKGROUND_PATTERN_AMPLITUDE = 0.07
BACKGROUND_GRAIN_AMPLITUDE = 0.025
BACKGROUND_TINT_AMPLITUDE = 0.012
BACKGROUND_RANGE = (0.2, 0.4)


def _scale(size: int) -> float:
    """Ratio of ``size`` to the reference frame size."""
    return size / REFERENCE_SIZE


def _round_half_up(x: np.ndarray | float) -> np.ndarray:
    """Round to the nearest integer, halves upwards (numpy's default rounds halves to even)."""
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5).astype(np.int64)


def object_half_extent(size: int) -> int:
    """Half width of the object in pixels: it spans centre ± this (5 at size 32)."""
    return max(2, int(_round_half_up(HALF_EXTENT_AT_REFERENCE * _scale(size))))


def band_width(size: int) -> int:
    """Width in pixels of one texture stripe / check (2 at size 32)."""
    return max(1, int(_round_half_up(BAND_WIDTH_AT_REFERENCE * _scale(size))))


def speed_px_per_frame(speed: str, size: int) -> float:
    """Displacement per frame in pixels for a speed word."""
    return SPEED_PX_PER_FRAME_AT_REFERENCE[speed] * _scale(size)


def frame_margin(size: int) -> int:
    """Pixels kept free between the object and the frame border by ``sample_scene``."""
    return max(1, int(_round_half_up(MARGIN_AT_REFERENCE * _scale(size))))


# --------------------------------------------------------------------------------------------
# Scenes and captions
# --------------------------------------------------------------------------------------------



@dataclass(frozen=True)
class Scene:
    """One video's ground truth: attributes, start position and background."""

    shape: str
    colour: str
    texture: str
    direction: str
    speed: str
    x0: float  # object centre at frame 0, column in pixels
    y0: float  # object centre at frame 0, row in pixels
    background_seed: int

    def __post_init__(self) -> None:
        for attribute in ATTRIBUTES:
            _check_word(attribute, getattr(self, attribute))

    @property
    def caption(self) -> str:
        """The text prompt describing this scene."""
        return make_caption(self.shape, self.colour, self.texture, self.direction, self.speed)

    @property
    def attributes(self) -> dict[str, str]:
        """The five caption attributes as a dict."""
        return {attribute: getattr(self, attribute) for attribute in ATTRIBUTES}

    def velocity(self, size: int) -> tuple[float, float]:
        """(dx, dy) in pixels per frame; up is decreasing row."""
        unit_x, unit_y = DIRECTION_UNIT[self.direction]
        speed = speed_px_per_frame(self.speed, size)
        return unit_x * speed, unit_y * speed

    def track(self, frames: int, size: int) -> np.ndarray:
        """(frames, 2) exact (sub-pixel) centre positions (x, y)."""
        dx, dy = self.velocity(size)
        t = np.arange(frames, dtype=np.float64)
        return np.stack([self.x0 + dx * t, self.y0 + dy * t], axis=1)

    def pixel_track(self, frames: int, size: int) -> np.ndarray:
        """(frames, 2) integer centres actually drawn (the track rounded to the nearest pixel)."""
        return _round_half_up(self.track(frames, size))


def _start_range(velocity: float, frames: int, size: int) -> tuple[float, float]:
    """Interval of start centres whose whole rounded track keeps the object inside with margin."""
    half = object_half_extent(size)
    margin = frame_margin(size)
    travel = velocity * (frames - 1)
    # 0.5 px of slack on each side so that rounding the centre can never break the margin
    low = margin + half + max(0.0, -travel) + 0.5
    high = size - 1 - margin - half - max(0.0, travel) - 0.5
    return low, high


def sample_scene(
    rng: np.random.Generator, size: int, frames: int, caption: str | None = None,
    jitter: float | None = None,
) -> Scene:
    """A random scene (or one with ``caption``'s attributes) whose track stays inside the frame.

    ``jitter`` (px at the 32 px reference size) narrows where the track may start: within ± jitter
    of the track centred on the frame (still inside the frame); ``None`` allows anywhere it fits.
    The random stream consumed is the same with or without a caption or jitter.  If the track is
    too long to fit (too many frames for the speed), it is centred and the object leaves the frame.
    An open caption (``grammar.parse_open_caption``) fixes the attributes it names; the ones it leaves
    open keep their uniform draws from ``rng``, so each seed gives one of their values.
    """
    attributes = {attribute: VOCABULARY[attribute][rng.integers(len(VOCABULARY[attribute]))]
                  for attribute in ATTRIBUTES}
    if caption is not None:
        named = parse_open_caption(caption)
        attributes.update({a: v for a, v in named.items() if v is not None})
    unit_x, unit_y = DIRECTION_UNIT[attributes["direction"]]
    speed = speed_px_per_frame(attributes["speed"], size)
    start = []
    for velocity in (unit_x * speed, unit_y * speed):
        low, high = _start_range(velocity, frames, size)
        if jitter is not None:
            centred = (size - 1) / 2 - velocity * (frames - 1) / 2
            spread = jitter * _scale(size)
            low, high = max(low, centred - spread), min(high, centred + spread)
        u = rng.random()
        if low <= high:
            start.append(low + u * (high - low))
        else:  # cannot fit: centre the track's midpoint
            start.append((size - 1) / 2 - velocity * (frames - 1) / 2)
    background_seed = int(rng.integers(0, 2**31 - 1))
    return Scene(x0=float(start[0]), y0=float(start[1]), background_seed=background_seed,
                 **attributes)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8192)
def _background(seed: int, size: int) -> np.ndarray:
    """(3, size, size) static background in [0, 1]: smooth dark-grey sinusoids plus 1-px grain."""
    rng = np.random.default_rng(seed)
    coords = np.arange(size, dtype=np.float64) / size
    yy, xx = coords[:, None], coords[None, :]
    pattern = np.zeros((size, size))
    for _ in range(3):
        angle, phase = rng.uniform(0.0, 2 * np.pi, size=2)
        cycles = rng.uniform(0.7, 2.5)
        pattern += np.cos(2 * np.pi * cycles * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    grain = rng.uniform(-1.0, 1.0, size=(size, size))
    grey = (BACKGROUND_GREY + BACKGROUND_PATTERN_AMPLITUDE * pattern / 3
            + BACKGROUND_GRAIN_AMPLITUDE * grain)
    tint = rng.uniform(-BACKGROUND_TINT_AMPLITUDE, BACKGROUND_TINT_AMPLITUDE, size=3)
    background = np.clip(grey[None] + tint[:, None, None], *BACKGROUND_RANGE).astype(np.float32)
    background.flags.writeable = False
    return background


def _shape_masks(dx: np.ndarray, dy: np.ndarray, half: int) -> dict[str, np.ndarray]:
    """Boolean masks of each shape for pixel offsets (dx, dy) from the object centre."""
    inside_box = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    return {
        "square": inside_box,
        "circle": dx * dx + dy * dy <= (half + 0.5) ** 2,
        # apex 1 px wide at the top row, full width at the bottom row
        "triangle": inside_box & (2 * np.abs(dx) <= dy + half),
    }


def _dark_masks(dx: np.ndarray, dy: np.ndarray, half: int, band: int) -> dict[str, np.ndarray]:
    """Where each texture uses the darkened colour (pattern fixed to the object, not the frame)."""
    row_band = np.floor_divide(dy + half, band)
    col_band = np.floor_divide(dx + half, band)
    return {
        "plain": np.zeros(np.broadcast_shapes(dx.shape, dy.shape), dtype=bool),
        "striped": (row_band % 2 == 1) & np.ones_like(dx, dtype=bool),  # horizontal bands
        "checked": (row_band + col_band) % 2 == 1,
    }


@functools.lru_cache(maxsize=64)
def shape_template(shape: str, size: int) -> np.ndarray:
    """(2h+1, 2h+1) boolean mask of ``shape`` centred on its middle pixel."""
    half = object_half_extent(size)
    offsets = np.arange(-half, half + 1)
    template = _shape_masks(offsets[None, :], offsets[:, None], half)[shape]
    template.flags.writeable = False
    return template


@functools.lru_cache(maxsize=64)
def _object_pixels(shape: str, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column offsets (K,) of ``shape``'s pixels and their brightness per texture (3, K)."""
    half, band = object_half_extent(size), band_width(size)
    d_row, d_col = np.nonzero(shape_template(shape, size))
    d_row, d_col = d_row - half, d_col - half
    dark = _dark_masks(d_col, d_row, half, band)
    brightness = np.stack([np.where(dark[t], DARKEN, 1.0) for t in TEXTURES]).astype(np.float32)
    return d_row, d_col, brightness


def _render_chunk(scenes: Sequence[Scene], size: int, frames: int) -> np.ndarray:
    """(B, 3, T, H, W) float32 in [0, 1]: static backgrounds with the objects' pixels scattered in."""
    backgrounds = np.stack([_background(s.background_seed, size) for s in scenes])  # (B, 3, H, W)
    video = np.repeat(backgrounds[:, :, None], frames, axis=2)
    centres = np.stack([scene.pixel_track(frames, size) for scene in scenes])  # (B, T, 2)
    colours = np.array([COLOUR_RGB[s.colour] for s in scenes], dtype=np.float32)  # (B, 3)
    textures = np.array([TEXTURES.index(s.texture) for s in scenes])
    shapes = np.array([s.shape for s in scenes])
    time = np.arange(frames)[None, :, None]
    for shape in SHAPES:
        chosen = np.nonzero(shapes == shape)[0]
        if chosen.size == 0:
            continue
        d_row, d_col, brightness = _object_pixels(shape, size)
        rows = centres[chosen, :, 1, None] + d_row  # (n, T, K)
        cols = centres[chosen, :, 0, None] + d_col
        on_frame = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
        pixel_rgb = brightness[textures[chosen], :, None] * colours[chosen, None, :]  # (n, K, 3)
        pixel_rgb = np.broadcast_to(pixel_rgb[:, None], (*rows.shape, 3))  # (n, T, K, 3)
        video_index = np.broadcast_to(chosen[:, None, None], rows.shape)
        frame_index = np.broadcast_to(time, rows.shape)
        video[video_index[on_frame], :, frame_index[on_frame], rows[on_frame], cols[on_frame]] = (
            pixel_rgb[on_frame])
    return video


def render_batch(scenes: Sequence[Scene], size: int, frames: int) -> torch.Tensor:
    """(B, 3, T, H, W) float32 videos in [-1, 1]."""
    out = torch.empty((len(scenes), 3, frames, size, size), dtype=torch.float32)
    chunk = max(1, 2**22 // max(1, frames * size * size))  # bounds the temporaries (~100 MB)
    for start in range(0, len(scenes), chunk):
        part = _render_chunk(scenes[start:start + chunk], size, frames)
        out[start:start + len(part)] = torch.from_numpy(part * 2.0 - 1.0)
    return out


def render(scene: Scene, size: int, frames: int) -> torch.Tensor:
    """(3, T, H, W) float32 video in [-1, 1] of one scene."""
    return render_batch([scene], size, frames)[0]


def hq_stills(n: int, seed: int, size: int, jitter: float | None = None, open_share: float = 0.0,
              open_attributes: Sequence[str] = ATTRIBUTES) -> tuple[torch.Tensor, list[str]]:
    """(n, 3, size, size) clean single frames of random scenes (the high-quality still images) and their
    captions; ``open_share`` of the captions leave attributes open (``grammar.coarsen_caption`` keyed on
    (seed, i), so the stills themselves are the same whatever the share)."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, size, frames=1, jitter=jitter) for _ in range(n)]
    captions = [coarsen_caption(scene.caption, (seed, i), open_share, open_attributes)
                for i, scene in enumerate(scenes)]
    return render_batch(scenes, size, frames=1)[:, :, 0], captions


def hq_images(n: int, seed: int, size: int, jitter: float | None = None) -> torch.Tensor:
    """``hq_stills`` without the captions."""
    return hq_stills(n, seed, size, jitter)[0]


def _blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """(n, n) matrix of a 1-D Gaussian blur with replicate padding (rows sum to 1)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    matrix = np.zeros((n, n))
    for offset, weight in zip(offsets, kernel, strict=True):
        source = np.clip(np.arange(n) + offset, 0, n - 1)  # replicate the border pixels
        np.add.at(matrix, (np.arange(n), source), weight)
    return torch.from_numpy(matrix.astype(np.float32))


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable spatial Gaussian blur of (..., H, W) images (two matrix products, fast on CPU)."""
    h, w = images.shape[-2:]
    return _blur_matrix(h, sigma) @ images @ _blur_matrix(w, sigma).T


def degrade(
    video: torch.Tensor,
    rng: np.random.Generator,
    blur: float = 1.0,
    noise: float = 0.08,
    colour_shift: float = 0.1,
) -> torch.Tensor:
    """Low-quality variant: Gaussian blur (sigma px), a per-video RGB offset, Gaussian noise.

    Accepts one video (3, T, H, W) or a batch (B, 3, T, H, W); amounts are in [-1, 1] units.
    """
    batched = video.dim() == 5
    videos = (video if batched else video[None]).to(torch.float32)
    b, c = videos.shape[:2]
    out = videos
    if blur > 0:
        out = _gaussian_blur(videos, float(blur))
    if colour_shift > 0:
        shift = rng.uniform(-colour_shift, colour_shift, size=(b, c)).astype(np.float32)
        out = out + torch.from_numpy(shift)[:, :, None, None, None]
    if noise > 0:
        out = out + noise * torch.from_numpy(rng.standard_normal(out.shape, dtype=np.float32))
    out = out.clamp(-1.0, 1.0)
    return out if batched else out[0]


