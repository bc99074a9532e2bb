"""Videos on disk: (3, T, H, W) tensors in [-1, 1] ↔ mp4 (imageio-ffmpeg) and uint8 frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] → (T, H, W, 3) uint8."""
    v = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).cpu().numpy()


def write_mp4(path: str | Path, video: torch.Tensor, fps: int = 8, scale: int = 4) -> None:
    """Nearest-neighbour upscaled so a 32-pixel world is visible; yuv444 keeps the colours exact-ish."""
    import imageio.v2 as imageio

    frames = to_uint8(video).repeat(scale, axis=1).repeat(scale, axis=2)
    with imageio.get_writer(str(path), fps=fps, codec="libx264", quality=9, macro_block_size=1,
                            ffmpeg_log_level="error", output_params=["-pix_fmt", "yuv444p"]) as writer:
        for frame in frames:
            writer.append_data(frame)
