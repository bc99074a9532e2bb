"""The "shapes world": a deterministic text-to-video task with known ground truth.

A coloured, optionally textured shape moves in a straight line over a static, dark-grey textured
background.  Captions name five attributes ("a red striped square moves left slowly"); an analytic
detector reads them back from a video, so generated videos can be scored without a learned model.

Geometry is defined at a reference frame size of 32 px and scales with ``size``: at 32 px the object
is 11 px across, texture bands are 2 px wide and the speeds are 1 ("slowly") and 2 ("quickly")
px/frame.  Videos are float32 in [-1, 1] with layout (channel, time, height, width).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("square", "circle", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
TEXTURES = ("plain", "striped", "checked")
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slowly", "quickly")

ATTRIBUTES = ("shape", "colour", "texture", "direction", "speed")
VOCABULARY = {
    "shape": SHAPES,
    "colour": COLOURS,
    "texture": TEXTURES,
    "direction": DIRECTIONS,
    "speed": SPEEDS,
}

# Object colours in [0, 1] RGB: saturated and far apart in hue.
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


def _check_word(attribute: str, word: str) -> None:
    """Raise ValueError naming the bad word and the allowed ones."""
    allowed = VOCABULARY[attribute]
    if word not in allowed:
        raise ValueError(f"unknown {attribute} {word!r}; allowed: {', '.join(allowed)}")


def make_caption(shape: str, colour: str, texture: str, direction: str, speed: str) -> str:
    """Caption of the attributes; the texture word is omitted for "plain"."""
    texture_word = "" if texture == "plain" else f"{texture} "
    return f"a {colour} {texture_word}{shape} moves {direction} {speed}"


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


def parse_caption(caption: str) -> dict[str, str]:
    """Inverse of ``Scene.caption``: the five attributes (texture "plain" when no texture word)."""
    words = caption.strip().lower().split()
    if len(words) not in (6, 7):
        raise ValueError(
            f"cannot parse caption {caption!r}: expected "
            "'a <colour> [<texture>] <shape> moves <direction> <speed>'"
        )
    if words[0] != "a":
        raise ValueError(f"caption {caption!r} must start with 'a', got {words[0]!r}")
    if words[-3] != "moves":
        raise ValueError(f"caption {caption!r}: expected 'moves', got {words[-3]!r}")
    texture = words[2] if len(words) == 7 else "plain"
    parsed = {
        "shape": words[-4],
        "colour": words[1],
        "texture": texture,
        "direction": words[-2],
        "speed": words[-1],
    }
    for attribute in ATTRIBUTES:
        _check_word(attribute, parsed[attribute])
    return parsed


def all_captions() -> list[str]:
    """Every caption of the world (288), sorted."""
    combos = itertools.product(SHAPES, COLOURS, TEXTURES, DIRECTIONS, SPEEDS)
    return sorted(make_caption(*combo) for combo in combos)


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
    """
    attributes = {attribute: VOCABULARY[attribute][rng.integers(len(VOCABULARY[attribute]))]
                  for attribute in ATTRIBUTES}
    if caption is not None:
        attributes = parse_caption(caption)
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


def hq_images(n: int, seed: int, size: int, jitter: float | None = None) -> torch.Tensor:
    """(n, 3, size, size) clean single frames of random scenes (the high-quality still images)."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, size, frames=1, jitter=jitter) for _ in range(n)]
    return render_batch(scenes, size, frames=1)[:, :, 0]


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
    sharpness: float  # edge crispness in [0, 1]: ~1 for a clean render, ~0.53 after degrade()
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
    """Most common vote (ties broken by vocabulary order), None if no votes."""
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
    A clean render gives ~1 (>= 0.98); ``degrade`` with blur 1 px gives ~0.53 (0.4-0.65), with
    blur 0.5 px ~0.87.  Strong noise alone barely lowers it: it measures blur, not noise.
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
    """Whether the detection agrees with ``caption`` on every attribute in ``keys``."""
    wanted = parse_caption(caption)
    return all(getattr(det, key) == wanted[key] for key in keys)
