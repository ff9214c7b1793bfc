"""Test video corpus: small synthetic videos (several codecs, edge-case sizes, rotation, VFR, a
non-ASCII name) and broken files, written once per session with `build_corpus(dir)`.

A plain helper module (not a conftest.py): tests import it and wrap `build_corpus` in a fixture.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.sample_videos import (SHAPE_COLOR, available_codecs, make_broken_files, make_moving_shapes,
                                    vfr_timestamps, write_video)

FPS = 8
CODEC_CASES = {  # case name -> (codec, suffix)
    "h264": ("h264", ".mp4"),
    "hevc": ("hevc", ".mp4"),
    "vp9": ("vp9", ".webm"),
    "mpeg4_avi": ("mpeg4", ".avi"),
    "mpeg4_mp4": ("mpeg4", ".mp4"),
    "mjpeg": ("mjpeg", ".avi"),
}
# broken file name -> the DecodeError.error_type decode_video must raise
BROKEN_EXPECTED = {
    "truncated": "corrupt",
    "truncated_faststart": "corrupt",
    "empty": "empty_file",
    "text": "not_a_video",
    "random": "not_a_video",
    "audio_only": "no_video_stream",
}


@dataclass
class VideoCase:
    path: Path
    frames: np.ndarray                    # what was encoded (stored orientation)
    fps: float = FPS
    rotation: int = 0
    timestamps: list[float] | None = None  # presentation times when not i / fps


def build_corpus(root: Path) -> tuple[dict[str, VideoCase], dict[str, Path]]:
    """Write every case under `root`; returns (videos by case name, broken files by name)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cases: dict[str, VideoCase] = {}
    have = set(available_codecs())

    def add(name, frames, filename, codec="h264", fps=FPS, rotation=None, vfr=False):
        path = write_video(root / filename, frames, fps=fps, codec=codec, rotation=rotation, vfr=vfr)
        cases[name] = VideoCase(path, frames, fps, rotation or 0,
                                vfr_timestamps(len(frames), fps) if vfr else None)

    for i, (name, (codec, suffix)) in enumerate(CODEC_CASES.items()):
        if codec in have:
            add(name, make_moving_shapes(16, 96, 128, seed=i), f"codec_{name}{suffix}", codec=codec)
    add("one_frame", make_moving_shapes(1, 64, 64, seed=10), "one_frame.mp4")
    add("short", make_moving_shapes(3, 64, 64, seed=11), "short.mp4")
    add("odd_98x62", make_moving_shapes(8, 62, 98, seed=12), "odd_98x62.mp4")
    add("odd_97x63", make_moving_shapes(8, 63, 97, seed=13), "odd_97x63.mp4")
    add("portrait", make_moving_shapes(8, 128, 72, seed=14), "portrait_72x128.mp4")
    rotated = make_moving_shapes(8, 72, 128, seed=15)
    rotated[:, :12, :12] = (0, 255, 0)  # a green corner marker makes the orientation checkable
    add("rotated90", rotated, "rotated90.mp4", rotation=90)
    add("vfr", make_moving_shapes(12, 64, 64, seed=16), "vfr.mp4", vfr=True)
    add("unicode", make_moving_shapes(8, 64, 64, seed=17), "видео_ß.mp4")
    add("long", make_moving_shapes(80, 48, 64, seed=18), "long_10s.mp4")  # 80 frames = 10 s at 8 fps
    broken = make_broken_files(root / "broken")
    return cases, broken


def red_fraction(frame: np.ndarray) -> float:
    """Fraction of pixels close to the moving shape's colour (`SHAPE_COLOR`, strong red)."""
    f = frame.astype(np.int16)
    r, g, b = SHAPE_COLOR
    close = (np.abs(f[..., 0] - r) < 60) & (np.abs(f[..., 1] - g) < 60) & (np.abs(f[..., 2] - b) < 60)
    return float(close.mean())
