"""Spec of the shapes world: deterministic rendering, captions, and the analytic detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dcm.worlds.shapes import (
    ATTRIBUTES,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SPEEDS,
    TEXTURES,
    Scene,
    all_captions,
    degrade,
    detect,
    frame_margin,
    hq_images,
    matches,
    object_half_extent,
    parse_caption,
    render,
    render_batch,
    sample_scene,
)

SIZE, FRAMES = 32, 8


def _scenes(n: int, seed: int, size: int = SIZE, frames: int = FRAMES) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, size, frames) for _ in range(n)]


def _accuracy(scenes: list[Scene], videos: torch.Tensor, size: int | None = None
              ) -> dict[str, float]:
    """Share of videos whose detected attribute equals the scene's, per attribute."""
    detections = [detect(video, size_hint=size) for video in videos]
    return {
        attribute: float(np.mean([getattr(d, attribute) == getattr(s, attribute)
                                  for d, s in zip(detections, scenes, strict=True)]))
        for attribute in ATTRIBUTES
    }


def test_vocabulary_is_fixed():
    assert SHAPES == ("square", "circle", "triangle")
    assert COLOURS == ("red", "green", "blue", "yellow")
    assert TEXTURES == ("plain", "striped", "checked")
    assert DIRECTIONS == ("left", "right", "up", "down")
    assert SPEEDS == ("slowly", "quickly")


def test_render_is_deterministic_and_in_range():
    scenes = _scenes(16, seed=0)
    first = render_batch(scenes, SIZE, FRAMES)
    second = render_batch(scenes, SIZE, FRAMES)
    assert first.shape == (16, 3, FRAMES, SIZE, SIZE) and first.dtype == torch.float32
    assert torch.equal(first, second)
    assert first.min() >= -1.0 and first.max() <= 1.0
    assert torch.equal(render(scenes[3], SIZE, FRAMES), first[3])
    # the same scenes drawn again from the same seed render identically
    assert torch.equal(render_batch(_scenes(16, seed=0), SIZE, FRAMES), first)
    # objects move: consecutive frames differ; the background itself is static
    video = first[0]
    assert not torch.equal(video[:, 0], video[:, -1])
    corner = video[:, :, :2, :2]  # kept free by the frame margin
    assert torch.equal(corner, corner[:, :1].expand_as(corner))


def test_velocity_and_track_follow_direction_and_speed():
    scene = Scene("square", "red", "plain", "up", "quickly", x0=10.0, y0=20.0, background_seed=1)
    assert scene.velocity(32) == (0.0, -2.0)
    assert scene.velocity(64) == (0.0, -4.0)
    np.testing.assert_allclose(scene.track(3, 32), [[10, 20], [10, 18], [10, 16]])
    slow_right = Scene("circle", "blue", "checked", "right", "slowly", 10.0, 20.0, 1)
    assert slow_right.velocity(32) == (1.0, 0.0)


def test_caption_roundtrip_for_every_combination():
    captions = all_captions()
    assert len(captions) == 3 * 4 * 3 * 4 * 2 == len(set(captions))
    assert captions == sorted(captions) == all_captions()
    rng = np.random.default_rng(0)
    for caption in captions:
        scene = sample_scene(rng, SIZE, FRAMES, caption=caption)
        assert scene.caption == caption
        assert parse_caption(caption) == scene.attributes
    assert Scene("circle", "red", "plain", "left", "slowly", 9.0, 9.0, 0).caption == (
        "a red circle moves left slowly")
    assert Scene("square", "red", "striped", "left", "slowly", 9.0, 9.0, 0).caption == (
        "a red striped square moves left slowly")


def test_parse_caption_names_bad_word_and_allowed_words():
    with pytest.raises(ValueError, match=r"purple.*red, green, blue, yellow"):
        parse_caption("a purple square moves left slowly")
    with pytest.raises(ValueError, match=r"hexagon.*square, circle, triangle"):
        parse_caption("a red striped hexagon moves left slowly")
    with pytest.raises(ValueError, match="sideways"):
        parse_caption("a red square moves sideways slowly")
    with pytest.raises(ValueError):
        parse_caption("a red square")
    with pytest.raises(ValueError):
        Scene("blob", "red", "plain", "left", "slowly", 9.0, 9.0, 0)


@pytest.mark.parametrize("size", [32, 64])
def test_object_stays_inside_frame(size):
    half, margin = object_half_extent(size), frame_margin(size)
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng, size, FRAMES) for _ in range(2000)]
    for scene in scenes:
        centres = scene.pixel_track(FRAMES, size)
        assert centres.min() - half >= margin and centres.max() + half <= size - 1 - margin
    # rendered check: the border ring of every frame is pure (static) background
    videos = render_batch(scenes[:200], size, FRAMES)
    ring = torch.cat([videos[..., :margin, :].flatten(-2), videos[..., -margin:, :].flatten(-2),
                      videos[..., :margin].flatten(-2), videos[..., -margin:].flatten(-2)], -1)
    assert torch.equal(ring, ring[:, :, :1].expand_as(ring))
    assert ring.max() <= -0.2 + 1e-6 and ring.min() >= -0.6 - 1e-6


@pytest.mark.parametrize("size", [16, 32])
def test_position_jitter_keeps_tracks_near_the_centre_and_the_same_stream(size):
    jitter = 1.5
    for seed in range(300):
        free = sample_scene(np.random.default_rng(seed), size, FRAMES)
        near = sample_scene(np.random.default_rng(seed), size, FRAMES, jitter=jitter)
        assert near.attributes == free.attributes and near.background_seed == free.background_seed
        track = near.track(FRAMES, size)
        middle = (track[0] + track[-1]) / 2  # the track's midpoint, (size - 1) / 2 when centred
        assert np.all(np.abs(middle - (size - 1) / 2) <= jitter * size / 32 + 1e-9)
        centres = near.pixel_track(FRAMES, size)
        half, margin = object_half_extent(size), frame_margin(size)
        assert centres.min() - half >= margin and centres.max() + half <= size - 1 - margin
    videos = render_batch([sample_scene(np.random.default_rng(s), size, FRAMES, jitter=jitter)
                           for s in range(100)],
                          size, FRAMES)
    scenes = [sample_scene(np.random.default_rng(s), size, FRAMES, jitter=jitter) for s in range(100)]
    assert all(detect(v, size_hint=size).attributes == sc.attributes
               for v, sc in zip(videos, scenes, strict=True))


def test_detector_accuracy_on_clean_videos_at_least_99_percent():
    scenes = _scenes(500, seed=2)
    videos = render_batch(scenes, SIZE, FRAMES)
    detections = [detect(video) for video in videos]
    accuracy = {
        attribute: float(np.mean([getattr(d, attribute) == getattr(s, attribute)
                                  for d, s in zip(detections, scenes, strict=True)]))
        for attribute in ATTRIBUTES
    }
    print("clean detector accuracy:", accuracy)
    assert all(value >= 0.99 for value in accuracy.values()), accuracy
    track_exact = np.mean([
        d.found.all() and np.allclose(d.track, s.pixel_track(FRAMES, SIZE))
        for d, s in zip(detections, scenes, strict=True)
    ])
    assert track_exact >= 0.99
    assert np.mean([matches(d, s.caption, keys=ATTRIBUTES) for d, s in zip(detections, scenes, strict=True)]
                   ) >= 0.99


@pytest.mark.parametrize("size", [16, 48, 64])
def test_detector_works_at_other_sizes(size):
    scenes = _scenes(40, seed=3, size=size)
    accuracy = _accuracy(scenes, render_batch(scenes, size, FRAMES))
    print(f"size {size} clean detector accuracy:", accuracy)
    assert all(value >= 0.98 for value in accuracy.values()), accuracy


def test_detector_sharpness_drops_for_degraded_video():
    scenes = _scenes(100, seed=4)
    videos = render_batch(scenes, SIZE, FRAMES)
    clean = np.array([detect(video).sharpness for video in videos])
    blurred = np.array([detect(video).sharpness
                        for video in degrade(videos, np.random.default_rng(0), blur=1.0)])
    slightly = np.array([detect(video).sharpness
                         for video in degrade(videos, np.random.default_rng(0), blur=0.5)])
    print(f"sharpness clean {clean.mean():.3f} (min {clean.min():.3f}), blur 0.5 "
          f"{slightly.mean():.3f}, blur 1.0 {blurred.mean():.3f} (max {blurred.max():.3f})")
    assert ((0.0 <= clean) & (clean <= 1.0)).all()
    assert clean.mean() >= 0.97 and clean.min() >= 0.9
    assert blurred.max() < 0.7 and blurred.mean() < 0.6
    assert blurred.mean() < slightly.mean() < clean.mean()


def test_degrade_changes_video_but_keeps_colour_detectable():
    scenes = _scenes(150, seed=5)
    videos = render_batch(scenes, SIZE, FRAMES)
    degraded = degrade(videos, np.random.default_rng(7))
    assert degraded.shape == videos.shape and degraded.dtype == torch.float32
    assert degraded.min() >= -1.0 and degraded.max() <= 1.0
    assert torch.equal(degraded, degrade(videos, np.random.default_rng(7)))
    assert (degraded - videos).abs().mean() > 0.05
    single = degrade(videos[0], np.random.default_rng(7))
    assert single.shape == videos[0].shape
    detections = [detect(video) for video in degraded]
    readable = np.mean([matches(d, s.caption) for d, s in zip(detections, scenes, strict=True)])
    colour = np.mean([d.colour == s.colour for d, s in zip(detections, scenes, strict=True)])
    print(f"degraded videos: colour/shape/direction readable {readable:.3f}, colour {colour:.3f}")
    assert readable >= 0.9 and colour >= 0.95


def test_detect_survives_noise_and_blank_input():
    generator = torch.Generator().manual_seed(0)
    garbage = {
        "black": -torch.ones(3, FRAMES, SIZE, SIZE),
        "grey": torch.zeros(3, FRAMES, SIZE, SIZE),
        "white": torch.ones(3, FRAMES, SIZE, SIZE),
        "uniform noise": torch.rand(3, FRAMES, SIZE, SIZE, generator=generator) * 2 - 1,
        "gaussian noise": torch.randn(3, FRAMES, SIZE, SIZE, generator=generator).clamp(-1, 1),
        "nan": torch.full((3, FRAMES, SIZE, SIZE), float("nan")),
    }
    for name, video in garbage.items():
        det = detect(video)
        assert det.attributes == dict.fromkeys(ATTRIBUTES), name
        assert det.track.shape == (FRAMES, 2) and np.isnan(det.track).all(), name
        assert det.found.shape == (FRAMES,) and not det.found.any(), name
        assert det.sharpness == 0.0, name
        assert det.caption is None and not matches(det, "a red square moves left slowly")
    # a single frame: attributes are readable, motion is not
    scene = Scene("triangle", "green", "checked", "down", "quickly", 15.0, 15.0, 3)
    still = detect(render(scene, SIZE, 1))
    assert (still.shape, still.colour, still.texture) == ("triangle", "green", "checked")
    assert still.direction is None and still.speed is None


def test_hq_images_shape_and_determinism():
    images = hq_images(12, seed=3, size=SIZE)
    assert images.shape == (12, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert torch.equal(images, hq_images(12, seed=3, size=SIZE))
    assert not torch.equal(images, hq_images(12, seed=4, size=SIZE))
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert hq_images(2, seed=0, size=64).shape == (2, 3, 64, 64)
