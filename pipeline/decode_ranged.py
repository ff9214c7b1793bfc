"""Ranged decode of a big object-store video: PyAV reads through a seekable fsspec file (block
cache), seeks to the keyframe before each sampled time and decodes from there, so only the container
index and the GOPs of the sampled frames are fetched, not the whole object.

An mp4 whose index (moov) sits at the end (no faststart) works too: FFmpeg seeks to the end for the
index first, which costs one more ranged request, not the whole object. Small objects do not come
here (`RANGED_MIN_BYTES` in pipeline.decode): one whole GET is cheaper than several ranged ones.
"""
from __future__ import annotations

import math
import time

import numpy as np

from pipeline.decode import DecodedVideo, DecodeError, SamplingSpec, resize_to_budget, sample_frame_indices

MIN_BLOCK, MAX_BLOCK = 32 * 1024, 1024 * 1024
CACHED_BLOCKS = 64  # blocks kept (LRU): the index and the GOP being decoded are not fetched twice


def read_block(size: int | None) -> int:
    """Bytes per ranged request: 1/256 of the object within [32 KiB, 1 MiB] (a 75 MB video: ~290 KiB,
    about one 2-s GOP at 1 Mb/s), so few requests per sampled frame and little read past it."""
    return MAX_BLOCK if not size else max(MIN_BLOCK, min(MAX_BLOCK, size // 256))


def open_ranged(fs, path: str, size: int | None = None):
    """A seekable file that fetches `read_block(size)`-sized blocks on demand and keeps the last
    CACHED_BLOCKS (fsspec block cache; `f.cache.total_requested_bytes` counts the bytes fetched)."""
    return fs.open(path, "rb", block_size=read_block(size), cache_type="blockcache",
                   cache_options={"maxblocks": CACHED_BLOCKS})


def decode_ranged(uri: str, f, spec: SamplingSpec) -> DecodedVideo:
    """Decode the sampled frames of the video in the open file `f`; raises DecodeError."""
    import av

    t0 = time.perf_counter()
    try:
        container = av.open(f, mode="r")
    except Exception as e:
        raise DecodeError("corrupt", f"{uri}: cannot open the container for ranged reads: {type(e).__name__}: {e}") from None
    try:
        if not container.streams.video:
            raise DecodeError("no_video_stream", f"{uri}: the file has no video stream (audio only?)")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        tb = float(stream.time_base)
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if not (fps > 0 and math.isfinite(fps)):
            raise DecodeError("corrupt", f"{uri}: no frame rate in the container index")
        start_pts = stream.start_time or 0
        duration = float(stream.duration * tb) if stream.duration else (container.duration or 0) / 1e6
        n = int(stream.frames) or int(round(duration * fps))
        if n <= 0:
            raise DecodeError("corrupt", f"{uri}: the video stream has no frames")
        indices = sample_frame_indices(n, fps, spec, None)
        frames: dict[int, np.ndarray] = {}
        width = height = 0
        for idx in sorted(set(indices)):
            target = idx / fps
            # seek to the keyframe at or before the target, then decode forward to the target frame
            container.seek(start_pts + int(target / tb), stream=stream, backward=True, any_frame=False)
            got = None
            for frame in container.decode(stream):
                t = (frame.pts - start_pts) * tb if frame.pts is not None else None
                got = frame
                if t is None or t >= target - 0.5 / fps:
                    break
            if got is None:
                raise DecodeError("corrupt", f"{uri}: no frame at {target:.3f} s")
            img = got.to_ndarray(format="rgb24")
            rotation = getattr(got, "rotation", 0) or 0  # display matrix, as decord applies it
            if rotation % 360:
                img = np.ascontiguousarray(np.rot90(img, k=(rotation // 90) % 4))
            height, width = img.shape[:2]
            frames[idx] = img
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError("corrupt", f"{uri}: decoding frames failed (truncated or damaged stream?): "
                                     f"{type(e).__name__}: {e}") from None
    finally:
        container.close()
    batch = np.stack([frames[i] for i in sorted(frames)])
    small = resize_to_budget(batch, spec.max_pixels)
    pos = {i: k for k, i in enumerate(sorted(frames))}
    out = np.ascontiguousarray(small[[pos[i] for i in indices]])
    return DecodedVideo(frames=out, timestamps=[round(i / fps, 6) for i in indices], duration_s=n / fps,
                        fps=fps, width=width, height=height, n_frames_total=n,
                        decode_ms=(time.perf_counter() - t0) * 1000.0, indices=list(indices), decoder="pyav")
