"""The "shapes world": a deterministic text-to-video task with known ground truth.

A coloured, optionally textured shape moves in a straight line over a static, dark-grey textured
background.  Captions name five attributes ("a red striped square moves left slowly"); an analytic
detector reads them back from a video, so generated videos can be scored without a learned model.
Opt-in *open* captions ("a striped shape moves left") leave some attributes unnamed and the world draws
them uniformly per seed: a prompt with several right answers (``grammar``); ``averaged_mode`` reads a
video for what a sampler that averages those answers draws (blended colours, ghosts, smears).

Geometry is defined at a reference frame size of 32 px and scales with ``size``: at 32 px the object
is 11 px across, texture bands are 2 px wide and the speeds are 1 ("slowly") and 2 ("quickly")
px/frame.  Videos are float32 in [-1, 1] with layout (channel, time, height, width).

Three modules: ``grammar`` (captions), ``render`` (scenes, rendering, degradation) and ``detect``
(the analytic detector); their public names are re-exported here (``from dcm.worlds import shapes``).
"""

from __future__ import annotations

from dcm.worlds.shapes.detect import (  # noqa: F401
    CORNER_THRESHOLD,
    EDGE_THRESHOLD,
    FOOTPRINT_THRESHOLD,
    MIN_MIXED_NEIGHBOURS,
    MIN_SHARE_NEAR_OBJECT,
    MIN_SOLID_SHARE,
    MIXED_SHARE_THRESHOLD,
    PALETTE,
    PURE_DISTANCE,
    SATURATION_THRESHOLD,
    SMOOTH_SATURATION_THRESHOLD,
    SQUARE_CORNER_OCCUPANCY,
    STILL_THRESHOLD_AT_REFERENCE,
    TEXTURE_CONTRAST_THRESHOLD,
    TRIANGLE_WIDENING_THRESHOLD,
    VALUE_FLOOR,
    AveragedMode,
    Detection,
    averaged_mode,
    detect,
    matches,
)
from dcm.worlds.shapes.grammar import (  # noqa: F401
    ATTRIBUTES,
    COLOURS,
    DIRECTIONS,
    OPEN_CAPTION_STREAM,
    OPEN_SHAPE_WORD,
    SHAPES,
    SPEEDS,
    TEXTURES,
    VOCABULARY,
    all_captions,
    coarsen_caption,
    is_open,
    make_caption,
    open_attributes_of,
    open_caption,
    open_captions,
    open_sets,
    parse_caption,
    parse_open_caption,
)
from dcm.worlds.shapes.render import (  # noqa: F401
    BACKGROUND_GRAIN_AMPLITUDE,
    BACKGROUND_GREY,
    BACKGROUND_PATTERN_AMPLITUDE,
    BACKGROUND_RANGE,
    BACKGROUND_TINT_AMPLITUDE,
    BAND_WIDTH_AT_REFERENCE,
    COLOUR_RGB,
    DARKEN,
    DIRECTION_UNIT,
    HALF_EXTENT_AT_REFERENCE,
    MARGIN_AT_REFERENCE,
    REFERENCE_SIZE,
    SPEED_PX_PER_FRAME_AT_REFERENCE,
    Scene,
    band_width,
    degrade,
    frame_margin,
    hq_images,
    hq_stills,
    object_half_extent,
    render,
    render_batch,
    sample_scene,
    shape_template,
    speed_px_per_frame,
)
