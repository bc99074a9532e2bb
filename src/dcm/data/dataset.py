"""The real families' data files (``data.prompts``, ``data.videos``, ``evaluation.prompts``): parsing, the
bad-row report, and the clip policy that turns a video into ``frames`` × ``height`` × ``width`` in [-1, 1].

Prompt files: one prompt a line (``.txt``, blank lines skipped), or ``.jsonl`` / ``.csv`` rows with a
``prompt`` column and an optional ``id`` (default: the row number).  Video sets: a folder holding
``captions.jsonl`` or ``captions.csv`` (``video, caption`` rows), or else a ``<name>.txt`` caption beside
each video; or a ``.jsonl`` / ``.csv`` manifest of ``video, caption`` rows.  Video paths are relative to the
folder (or the manifest's folder) and must lie under it, so that DVC, which tracks that folder
(``dataset_root``), sees every video.  A row's id is its ``id`` column, else its video path without suffix.

Every problem of a file is collected and reported at once (``DatasetError``: the key, the file, each bad
row with its number, id and what is wrong), never the first one alone.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcm.config import ConfigError

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi")
MANIFESTS = ("captions.jsonl", "captions.csv")
TABLE_SUFFIXES = (".jsonl", ".csv")
MAX_LISTED = 50  # bad rows named in one report (the count says how many more)


class DatasetError(ConfigError):
    """Every bad row of one data file, by row: number, id, value and what is allowed."""

    def __init__(self, key: str, value: str, problems: Sequence[str], allowed: str):
        self.problems = list(problems)
        listed = self.problems[:MAX_LISTED]
        more = len(self.problems) - len(listed)
        detail = "\n  ".join(listed) + (f"\n  … and {more} more" if more else "")
        super().__init__(key, value, f"{allowed}; {len(self.problems)} bad row(s):\n  {detail}")


@dataclass(frozen=True)
class PromptRow:
    id: str
    prompt: str


@dataclass(frozen=True)
class VideoRow:
    id: str
    video: str  # the path as written (relative to the set's root)
    path: Path  # resolved
    caption: str
    line: int  # row number in its file, from 1 (a folder of .txt captions: the video's position)


def local_path(value: str) -> Path:
    return Path(os.path.expanduser(value))


# ------------------------------------------------------------------------------------ tables


def _table(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """(row number, mapping) of a .jsonl or .csv file, and the rows that do not parse."""
    rows, problems = [], []
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                problems.append(f"row {number}: not JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"row {number}: {row!r} is not an object")
                continue
            rows.append((number, row))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for number, row in enumerate(reader, start=2):  # row 1 is the header
            rows.append((number, {k.strip(): v for k, v in row.items() if k is not None}))
    return rows, problems


def _duplicates(ids: Sequence[tuple[int, str]]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for number, row_id in ids:
        if row_id in seen:
            out.append(f"row {number} (id {row_id!r}): duplicate id (first at row {seen[row_id]})")
        else:
            seen[row_id] = number
    return out


# ------------------------------------------------------------------------------------ prompts


def read_prompts(key: str, value: str | None) -> list[PromptRow]:
    """The rows of a prompt file; a DatasetError lists every bad row (empty prompt, duplicate id, a row that
    does not parse)."""
    allowed = "a local prompt file: one prompt a line (.txt), or .jsonl / .csv rows with a `prompt` column"
    if not value:
        raise ConfigError(key, value, allowed)
    path = local_path(value)
    if not path.is_file():
        raise ConfigError(key, value, f"{allowed} (no such file; a local path, never a hub id)")
    if path.suffix not in TABLE_SUFFIXES:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        rows = [PromptRow(str(i), line) for i, line in enumerate(lines, start=1) if line]
        if not rows:
            raise ConfigError(key, value, f"{allowed} (the file has no prompt)")
        return rows
    table, problems = _table(path)
    rows = []
    for number, row in table:
        if "prompt" not in row:
            problems.append(f"row {number}: no `prompt` column (columns: {sorted(row)})")
            continue
        prompt = str(row["prompt"] or "").strip()
        row_id = str(row.get("id") or number).strip()
        if not prompt:
            problems.append(f"row {number} (id {row_id!r}): empty prompt")
        rows.append((number, PromptRow(row_id, prompt)))
    problems += _duplicates([(n, r.id) for n, r in rows])
    if problems or not rows:
        raise DatasetError(key, value, problems or ["the file has no row"], allowed)
    return [r for _, r in rows]


# ------------------------------------------------------------------------------------ videos


def dataset_root(value: str) -> Path:
    """The folder DVC tracks for a video set: the folder itself, or the manifest's folder (by its suffix, so
    the answer does not depend on whether the path exists yet)."""
    path = local_path(value)
    return path.parent if path.suffix in TABLE_SUFFIXES else path


def manifest_of(value: str) -> Path | None:
    """The ``video, caption`` table of a video set (None: a folder of videos with .txt captions)."""
    path = local_path(value)
    if path.suffix in TABLE_SUFFIXES:
        return path
    for name in MANIFESTS:
        if (path / name).is_file():
            return path / name
    return None


def read_videos(key: str, value: str | None) -> list[VideoRow]:
    """The rows of a video set, checked without opening a video: every row has a caption and a video file
    under the set's root, and ids are unique.  A DatasetError lists every bad row."""
    allowed = ("a local folder of videos (captions.jsonl / captions.csv inside, or <name>.txt beside each "
               "video) or a .jsonl / .csv of `video, caption` rows")
    if not value:
        raise ConfigError(key, value, allowed)
    path = local_path(value)
    if not path.exists():
        raise ConfigError(key, value, f"{allowed} (no such file or folder; a local path, never a hub id)")
    if path.is_file() and path.suffix not in TABLE_SUFFIXES:
        raise ConfigError(key, value, allowed)
    root = dataset_root(value).resolve()
    project = Path.cwd().resolve()
    if root == project or project.is_relative_to(root):
        raise ConfigError(key, value, f"{allowed}, in a folder of its own: DVC tracks the folder that holds "
                          f"the videos ({root}), which must not hold the project")
    manifest = manifest_of(value)
    problems: list[str] = []
    rows: list[VideoRow] = []
    if manifest is None:  # a folder of videos, a .txt caption beside each
        videos = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
        for number, video in enumerate(videos, start=1):
            rel = video.relative_to(root).as_posix()
            caption_file = video.with_suffix(".txt")
            caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
            row_id = rel.rsplit(".", 1)[0]
            if not caption_file.is_file():
                problems.append(f"row {number} (id {row_id!r}): no caption file {caption_file.name}")
            elif not caption:
                problems.append(f"row {number} (id {row_id!r}): empty caption in {caption_file.name}")
            rows.append(VideoRow(row_id, rel, video, caption, number))
    else:
        table, problems = _table(manifest)
        for number, row in table:
            missing = [c for c in ("video", "caption") if c not in row]
            if missing:
                problems.append(f"row {number}: no {' and no '.join(missing)} column "
                                f"(columns: {sorted(row)})")
                continue
            rel = str(row["video"] or "").strip()
            caption = str(row["caption"] or "").strip()
            row_id = str(row.get("id") or rel.rsplit(".", 1)[0]).strip()
            where = f"row {number} (id {row_id!r})"
            video = (root / rel).resolve()
            if not rel:
                problems.append(f"{where}: empty video path")
            elif not video.is_relative_to(root):
                problems.append(f"{where}: video {rel!r} lies outside {root} (the folder DVC tracks)")
            elif not video.is_file():
                problems.append(f"{where}: video {rel!r} is missing")
            if not caption:
                problems.append(f"{where}: empty caption")
            rows.append(VideoRow(row_id, rel, video, caption, number))
    problems += _duplicates([(r.line, r.id) for r in rows])
    if problems or not rows:
        raise DatasetError(key, value, problems or ["no video found"], allowed)
    return rows


# ------------------------------------------------------------------------------------ clips


@dataclass(frozen=True)
class ClipPolicy:
    """How a video becomes a clip of the teacher's size (``data`` and ``backbone.real``; DataConfig)."""

    frames: int
    height: int
    width: int
    frame_sampling: str  # stride | fps
    fps: float
    resize: str  # cover_crop | crop_resize
    seed: int

    @classmethod
    def from_params(cls, params) -> ClipPolicy:
        real, data = params.backbone.real, params.data
        return cls(real.frames, real.height, real.width, data.frame_sampling, data.fps, data.resize,
                   params.seed)

    def frame_indices(self, total: int, source_fps: float, row: int) -> list[int] | None:
        """The source frames of the clip (None: too few frames).  stride: ⌊total / frames⌋ apart from frame
        0; fps: resampled to ``fps`` from frame 0, then a window of ``frames`` at a seeded random start."""
        if self.frame_sampling == "stride":
            if total < self.frames:
                return None
            return list(range(0, total, total // self.frames))[: self.frames]
        step = source_fps / self.fps
        resampled = np.arange(0, total, step).astype(int)
        if len(resampled) < self.frames:
            return None
        # FastVideo's temporal crop: a start in [0, max(0, n − frames − 1)], here from (seed, row)
        last_start = max(0, len(resampled) - self.frames - 1)
        start = int(np.random.default_rng([self.seed, row]).integers(0, last_start + 1))
        return resampled[start:start + self.frames].tolist()

    def minimum_frames(self, source_fps: float) -> int:
        """Source frames a clip needs at least."""
        if self.frame_sampling == "stride":
            return self.frames
        return math.ceil((self.frames - 1) * source_fps / self.fps) + 1

    def resize_frames(self, frames: np.ndarray):
        """(F, h, w, 3) uint8 → (3, F, height, width) float tensor in [-1, 1]."""
        import torch  # here: the stage table reads this module's paths without torch

        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # F, 3, h, w
        h, w = x.shape[-2:]
        th, tw = self.height, self.width
        if self.resize == "cover_crop":  # DCM's Wan dataset: cover the target (bicubic), then centre crop
            if w / h > tw / th:
                size = (th, int(w * th / h))
            else:
                size = (int(h * tw / w), tw)
            x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False,
                                                antialias=True)
            top, left = (x.shape[-2] - th) // 2, (x.shape[-1] - tw) // 2
            x = x[..., top:top + th, left:left + tw]
        else:  # FastVideo: centre crop to the target aspect, then resize (bilinear)
            if h / w > th / tw:
                ch, cw = int(w * th / tw), w
            else:
                ch, cw = h, int(h * tw / th)
            top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
            x = x[..., top:top + ch, left:left + cw]
            x = torch.nn.functional.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False,
                                                antialias=True)
        x = (x / 127.5 - 1.0).clamp(-1.0, 1.0)
        return x.permute(1, 0, 2, 3).contiguous()


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    height: int
    width: int


def probe(path: Path) -> VideoInfo:
    """Frame count (exact: ffmpeg counts them), frame rate and size of a video."""
    import imageio.v2 as imageio

    with imageio.get_reader(str(path), format="FFMPEG") as reader:
        meta = reader.get_meta_data()
        total = reader.count_frames()
    width, height = meta["size"]
    return VideoInfo(int(total), float(meta["fps"]), int(height), int(width))


def read_frames(path: Path, indices: Sequence[int]) -> np.ndarray:
    """The frames ``indices`` of a video, (F, h, w, 3) uint8, decoded in one pass."""
    import imageio.v2 as imageio

    wanted, last, kept = set(indices), max(indices), {}
    with imageio.get_reader(str(path), format="FFMPEG") as reader:
        for k, frame in enumerate(reader):
            if k in wanted:
                kept[k] = frame
            if k >= last:
                break
    missing = sorted(wanted - set(kept))
    if missing:
        raise ValueError(f"{path}: frames {missing[:5]} could not be decoded")
    return np.stack([kept[i] for i in indices])


CLIPS_ALLOWED = "every video readable, with enough frames for backbone.real.frames"


def clip_frames(rows: Sequence[VideoRow], policy: ClipPolicy, which: Sequence[int]
                ) -> tuple[dict[int, list[int]], list[tuple[int, str]]]:
    """Rows ``which`` opened (ffmpeg counts the frames; nothing else is decoded): the frames each clip takes,
    and (row position, problem) for every unreadable video and every video with too few frames."""
    frames, problems = {}, []
    for k in which:
        row = rows[k]
        where = f"row {row.line} (id {row.id!r})"
        try:
            info = probe(row.path)
        except Exception as e:  # noqa: BLE001 (any decoder failure is this row's problem)
            problems.append((k, f"{where}: video {row.video!r} is unreadable ({type(e).__name__}: {e})"))
            continue
        chosen = policy.frame_indices(info.frames, info.fps, k)
        if chosen is None:
            problems.append((k, f"{where}: video {row.video!r} has {info.frames} frames at {info.fps:g} fps, "
                                f"fewer than the {policy.minimum_frames(info.fps)} a {policy.frames}-frame "
                                f"clip needs (frame_sampling {policy.frame_sampling})"))
            continue
        frames[k] = chosen
    return frames, problems


def check_clips(key: str, value: str, rows: Sequence[VideoRow], policy: ClipPolicy) -> list[list[int]]:
    """The frames of every clip, or a DatasetError listing every bad video (one process; the stage splits
    the rows over its ranks with ``clip_frames``)."""
    frames, problems = clip_frames(rows, policy, range(len(rows)))
    if problems:
        raise DatasetError(key, value, [p for _, p in sorted(problems)], CLIPS_ALLOWED)
    return [frames[k] for k in range(len(rows))]
