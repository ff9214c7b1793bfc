"""Small synthetic videos for `framescribe demo` and for the tests (pure PyAV + numpy).

`make_demo_videos` writes a few short clips in different codecs; `make_broken_files` writes the
kinds of bad input a real corpus contains (truncated, empty, not a video, audio only), so the
decode error paths can be exercised without downloading anything.
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np

# The moving shape is drawn in this colour over a low-saturation background, so a decoded frame can
# be checked for "the shape is there" by looking for strongly red pixels.
SHAPE_COLOR = (230, 30, 30)

# codec name -> (FFmpeg encoder, default suffix, pix_fmt for even sizes, pix_fmt for odd sizes or None)
CODECS = {
    "h264": ("libx264", ".mp4", "yuv420p", "yuv444p"),
    "hevc": ("libx265", ".mp4", "yuv420p", "yuv444p"),
    "vp9": ("libvpx-vp9", ".webm", "yuv420p", "yuv444p"),
    "mpeg4": ("mpeg4", ".avi", "yuv420p", None),  # no 4:4:4 in mpeg4 part 2: odd sizes are padded
    "mjpeg": ("mjpeg", ".avi", "yuvj420p", "yuvj444p"),
}
_CONTAINER_FORMATS = {".mp4": "mp4", ".m4a": "mp4", ".mov": "mov", ".webm": "webm", ".mkv": "matroska", ".avi": "avi"}


def available_codecs() -> list[str]:
    """Codec names `write_video` can use with the installed PyAV build."""
    import av

    return [name for name, (enc, *_rest) in CODECS.items() if enc in av.codecs_available]


def vfr_timestamps(n_frames: int, fps: float = 8) -> list[float]:
    """Deterministic irregular presentation times (seconds) used by `write_video(vfr=True)`.

    Frame gaps cycle through 0.5x, 1x, 2.5x the nominal interval (average slightly above 1/fps),
    quantised to milliseconds.
    """
    gaps = (0.5, 1.0, 2.5)
    t, out = 0.0, []
    for i in range(n_frames):
        out.append(round(t, 3))
        t += gaps[i % len(gaps)] / fps
    return out


def write_video(path, frames: np.ndarray, fps: float = 8, codec: str = "h264", rotation: int | None = None,
                vfr: bool = False, faststart: bool = False) -> Path:
    """Encode `frames` (T, H, W, 3) uint8 RGB to `path`; the container comes from the suffix.

    - odd sizes: encoders that support 4:4:4 chroma (h264, hevc, vp9, mjpeg) switch to it so the
      exact size is kept; mpeg4 pads the frame to even size by repeating the last row/column.
    - rotation: display rotation in degrees clockwise (what phones write as the "rotate" tag, e.g. 90
      for a portrait clip stored landscape), written as the stream's display matrix.
    - vfr: irregular presentation times (see `vfr_timestamps`) instead of a constant frame rate.
    - faststart: mp4/mov only, move the moov atom to the front.
    """
    import av

    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty (T, H, W, 3) uint8 array, got {frames.shape} {frames.dtype}")
    encoder, _, pix_even, pix_odd = CODECS[codec]
    if encoder not in av.codecs_available:
        raise ValueError(f"codec {codec!r} needs the {encoder} encoder, which this PyAV build lacks")
    path = Path(path)
    fmt = _CONTAINER_FORMATS.get(path.suffix.lower())
    _, h, w, _ = frames.shape
    pix_fmt = pix_even
    if h % 2 or w % 2:
        if pix_odd is not None:
            pix_fmt = pix_odd
        else:
            frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            _, h, w, _ = frames.shape

    rate = Fraction(fps).limit_denominator(1000)
    times = vfr_timestamps(len(frames), fps) if vfr else None
    options = {"movflags": "+faststart"} if faststart and fmt in ("mp4", "mov") else {}
    with av.open(str(path), mode="w", format=fmt, options=options) as container:
        stream = container.add_stream(encoder, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if encoder == "libx265":
            stream.options = {"x265-params": "log-level=error"}
        if vfr:
            stream.codec_context.time_base = Fraction(1, 1000)
        else:
            stream.codec_context.time_base = 1 / rate
        if rotation:
            # FFmpeg's display matrix angle is counter-clockwise; the "rotate" tag is clockwise.
            stream.set_display_rotation(-float(rotation))
        for i, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
            if vfr:
                frame.pts, frame.time_base = int(round(times[i] * 1000)), Fraction(1, 1000)
            else:
                frame.pts, frame.time_base = i, 1 / rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_moving_shapes(n_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(n_frames, height, width, 3) uint8: a `SHAPE_COLOR` square moving over a textured background.

    The background is a smooth low-saturation texture (grey/blue, values 60..170) fixed by `seed`;
    the square crosses the frame left to right while bobbing up and down. Deterministic.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    fx, fy, phase = rng.uniform(0.05, 0.2), rng.uniform(0.05, 0.2), rng.uniform(0, 2 * math.pi)
    tex = 0.5 + 0.25 * np.sin(xx * fx + phase) + 0.25 * np.cos(yy * fy - phase)  # 0..1
    tex += rng.normal(0, 0.04, size=tex.shape).astype(np.float32)
    base = 60 + 100 * np.clip(tex, 0, 1)
    bg = np.stack([base * 0.9, base, base * 1.1], axis=-1).clip(0, 255).astype(np.uint8)

    side = max(4, min(height, width) // 4)
    out = np.repeat(bg[None], n_frames, axis=0)
    for t in range(n_frames):
        frac = t / max(1, n_frames - 1)
        x0 = int(round(frac * (width - side)))
        y0 = int(round((height - side) * (0.5 + 0.35 * math.sin(2 * math.pi * frac + phase))))
        y0 = min(max(y0, 0), height - side)
        out[t, y0:y0 + side, x0:x0 + side] = SHAPE_COLOR
    return out


def _texture(height: int, width: int, rng) -> np.ndarray:
    # smooth low-saturation texture with fine noise (values 60..170), as make_moving_shapes' background
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    fx, fy, phase = rng.uniform(0.05, 0.2), rng.uniform(0.05, 0.2), rng.uniform(0, 2 * math.pi)
    tex = 0.5 + 0.25 * np.sin(xx * fx + phase) + 0.25 * np.cos(yy * fy - phase)
    tex += rng.normal(0, 0.04, size=tex.shape).astype(np.float32)
    base = 60 + 100 * np.clip(tex, 0, 1)
    return np.stack([base * 0.9, base, base * 1.1], axis=-1).clip(0, 255).astype(np.uint8)


def make_static_scene(n_frames: int, height: int, width: int, seed: int = 0, objects: int = 2) -> np.ndarray:
    """Still camera and background; `objects` (<= 2) small squares (side = min(h, w) / 16) drift a few pixels
    per frame. Deterministic. The `static` content of `framescribe bench speed`."""
    rng = np.random.default_rng(seed)
    out = np.repeat(_texture(height, width, rng)[None], n_frames, axis=0)
    side = max(2, min(height, width) // 16)
    for k in range(min(objects, 2)):
        x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
        vx, vy = rng.uniform(-1.5, 1.5, size=2)
        for t in range(n_frames):
            x = int(np.clip(x0 + vx * t, 0, width - side))
            y = int(np.clip(y0 + vy * t, 0, height - side))
            out[t, y:y + side, x:x + side] = SHAPE_COLOR if k == 0 else (40, 200, 60)
    return out


def make_panning_scene(n_frames: int, height: int, width: int, seed: int = 0, step: int | None = None) -> np.ndarray:
    """The camera pans across a wider textured scene by `step` pixels every frame (default: width / 32).
    Deterministic. The `panning` content of `framescribe bench speed`."""
    rng = np.random.default_rng(seed)
    step = step or max(1, width // 32)
    scene = _texture(height, width + step * n_frames, rng)
    return np.stack([scene[:, t * step:t * step + width] for t in range(n_frames)])


def make_demo_videos(out_dir, n: int = 4, seed: int = 0) -> list[Path]:
    """`n` short clips (16 frames, 128x128, 8 fps) with moving shapes, cycling through the codecs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    codecs = available_codecs()
    paths = []
    for i in range(n):
        codec = codecs[i % len(codecs)]
        suffix = CODECS[codec][1]
        frames = make_moving_shapes(16, 128, 128, seed=seed + i)
        paths.append(write_video(out_dir / f"demo_{i:02d}_{codec}{suffix}", frames, fps=8, codec=codec))
    return paths


def _write_audio_only(path: Path, codec: str = "aac", seconds: float = 1.0, rate: int = 44100) -> Path:
    import av

    t = np.arange(int(seconds * rate), dtype=np.float32) / rate
    tone = (0.3 * np.sin(2 * math.pi * 440 * t)).astype(np.float32)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        fmt = "fltp" if codec == "aac" else "s16"
        samples = tone if fmt == "fltp" else (tone * 32767).astype(np.int16)
        chunk = 1024
        for start in range(0, len(samples), chunk):
            part = samples[start:start + chunk]
            frame = av.AudioFrame.from_ndarray(part[None, :], format=fmt, layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_broken_files(out_dir, seed: int = 0) -> dict[str, Path]:
    """Files a decoder must reject cleanly; the key is the expected `DecodeError.error_type` family.

    - "truncated": a good h264 mp4 (moov atom at the end, the muxer default) cut in half, so the
      index is lost -> corrupt
    - "truncated_faststart": the same with the moov atom first, cut in half: the index survives but
      the frames in the second half are missing
    - "empty": zero bytes, named .mp4
    - "text": a text file named .mp4
    - "random": random bytes named .mp4
    - "audio_only": an .m4a (mp4) with one AAC audio stream and no video
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = make_moving_shapes(32, 64, 64, seed=seed)
    files: dict[str, Path] = {}

    for name, faststart in (("truncated", False), ("truncated_faststart", True)):
        good = write_video(out_dir / f"_{name}_full.mp4", frames, fps=8, codec="h264", faststart=faststart)
        data = good.read_bytes()
        good.unlink()
        files[name] = out_dir / f"{name}.mp4"
        files[name].write_bytes(data[: len(data) // 2])

    files["empty"] = out_dir / "empty.mp4"
    files["empty"].write_bytes(b"")
    files["text"] = out_dir / "text.mp4"
    files["text"].write_text("This is not a video.\nJust some text pretending to be one.\n" * 20)
    files["random"] = out_dir / "random.mp4"
    files["random"].write_bytes(np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files["audio_only"] = _write_audio_only(out_dir / "audio_only.m4a", codec="aac")
    return files
