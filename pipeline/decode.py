"""Video decode for labeling: open a video from any fsspec filesystem, sample a bounded set of frames,
resize them to a pixel budget, and turn every failure into a `DecodeError` with a stable `error_type`.

Only the sampled frames are decoded (`decord.VideoReader.get_batch`), so memory is bounded by
`num_frames`/`max_frames` and `max_pixels`, not by the video length.

Behaviour worth knowing:
- Rotation: decord2 (>= 3.4) applies the container's display matrix ("rotate" tag), so a phone video
  stored landscape with rotate=90 comes out portrait. `width`/`height` are the decoded size in that
  displayed orientation, before `resize_to_budget`.
- Times are seconds from the first frame (a stream whose first pts is 0.5 s starts at 0.0 here).
- Truncated mp4: with the moov atom at the end (the muxer default) the index is lost and the file
  cannot be opened -> "corrupt". With the moov atom first (faststart) decord indexes only the packets
  that are present; decoding the cut packet fails -> "corrupt" as well (no partial result).
- `timeout_s`: the decode runs in a reusable child process that is killed when it takes too long or
  dies (a decoder segfault); see `decode_video`.
"""
from __future__ import annotations

import io
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors import s3_retry
from pipeline.decode_pool import ChildDied, ChildPool, ChildTimeout, ChildUnavailable

ERROR_TYPES = ("not_found", "empty_file", "not_a_video", "no_video_stream", "corrupt", "decode_timeout",
               "clip_out_of_range", "read_error")

# Remote objects up to this size are handed to decord as a file-like object (decord reads it into
# memory); bigger ones are copied to a temporary file first (removed after), so memory stays bounded.
IN_MEMORY_MAX_BYTES = 256 * 1024 * 1024
# Remote objects bigger than this are decoded with ranged reads (pipeline.decode_ranged): only the index
# and the sampled frames' GOPs are fetched. Smaller ones are fetched whole (one GET beats many ranges).
RANGED_MIN_BYTES = 32 * 1024 * 1024
_MIN_SIDE = 28
_FALLBACK_FPS = 25.0  # only when the container reports no usable frame rate and no timestamps

# Test hook: when set, a child decode of a uri containing this substring sleeps forever (simulated hang).
HANG_ENV = "FRAMESCRIBE_TEST_DECODE_HANG_SUBSTR"


class DecodeError(Exception):
    """A video that could not be decoded; `error_type` is one of `ERROR_TYPES`, `message` names the file."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.message = message

    def __reduce__(self):  # keeps both fields when sent back from the decode child process
        return (type(self), (self.error_type, self.message))

    def __repr__(self) -> str:
        return f"DecodeError({self.error_type!r}, {self.message!r})"


@dataclass(frozen=True)
class SamplingSpec:
    """Which frames to take from each video, decided before decoding.

    Fixed-count mode (`num_frames` set): `num_frames` frames evenly spaced in time over the window.
    fps mode (`num_frames` None, `fps` set): one frame every 1/fps seconds, at most `max_frames`.
    `max_frames` only caps fps mode. The window is [start, end) in seconds from the first frame.
    """

    num_frames: int | None = 8
    fps: float | None = None
    max_frames: int = 32
    start: float | None = None
    end: float | None = None
    max_pixels: int = 224 * 224

    def __post_init__(self):
        if self.num_frames is None and self.fps is None:
            raise ValueError("SamplingSpec needs num_frames or fps")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.start is not None and self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be greater than start ({self.start})")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")

    @classmethod
    def from_config(cls, cfg: Any) -> "SamplingSpec":
        """From a `RunConfig` (or anything with the same attributes).

        Setting `fps` selects fps mode: the config always carries a `num_frames` (default 8) and the
        CLI cannot clear it, so a given `fps` wins over `num_frames` here.
        """
        fps = getattr(cfg, "fps", None)
        return cls(num_frames=None if fps is not None else getattr(cfg, "num_frames", 8), fps=fps,
                   max_frames=getattr(cfg, "max_frames", 32), start=getattr(cfg, "start", None),
                   end=getattr(cfg, "end", None), max_pixels=getattr(cfg, "max_pixels", 224 * 224))


@dataclass
class DecodedVideo:
    frames: np.ndarray          # (T, H, W, 3) uint8, resized to the pixel budget
    timestamps: list[float]     # seconds (from the first frame) of each sampled frame
    duration_s: float
    fps: float                  # average frame rate
    width: int                  # decoded size (displayed orientation) before resizing
    height: int
    n_frames_total: int
    decode_ms: float
    indices: list[int] = field(default_factory=list)  # frame index of each sampled frame
    decoder: str = "decord"     # which decoder produced the frames (see DECODERS)


# ----------------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------------

def _frame_intervals(n: int, avg_fps: float, timestamps) -> tuple[np.ndarray, np.ndarray, float]:
    """(starts, ends, fps) per frame in seconds from the first frame; frame i is shown over [s_i, e_i)."""
    fps = float(avg_fps) if avg_fps is not None and math.isfinite(avg_fps) and avg_fps > 0 else None
    if timestamps is not None:
        ts = np.asarray(timestamps, dtype=np.float64)
        starts = ts[:, 0] if ts.ndim == 2 else ts.reshape(-1)
        if len(starts) == n and np.all(np.isfinite(starts)) and np.all(np.diff(starts) >= 0):
            starts = starts - starts[0]
            last_end = None
            if ts.ndim == 2 and ts.shape[1] >= 2 and math.isfinite(ts[-1, 1]):
                last_end = float(ts[-1, 1] - ts[0, 0])
            if last_end is None or last_end <= starts[-1]:
                if fps:
                    step = 1.0 / fps
                elif n > 1:
                    step = float(np.median(np.diff(starts))) or 1.0 / _FALLBACK_FPS
                else:
                    step = 1.0 / _FALLBACK_FPS
                last_end = float(starts[-1] + step)
            ends = np.append(starts[1:], last_end)
            if fps is None:
                fps = n / last_end if last_end > 0 else _FALLBACK_FPS
            return starts, ends, fps
    fps = fps or _FALLBACK_FPS
    starts = np.arange(n, dtype=np.float64) / fps
    return starts, starts + 1.0 / fps, fps


def sample_frame_indices(n_frames: int, avg_fps: float, spec: SamplingSpec,
                         timestamps: np.ndarray | None = None) -> list[int]:
    """Frame indices to decode, in display order (non-decreasing).

    `timestamps`: per-frame presentation times in seconds, shape (n,) starts or (n, 2) [start, end]
    as `decord.VideoReader.get_frame_timestamp` gives; with them the window and the spacing follow
    real time (correct for variable frame rate). Without them frame i is at i / avg_fps.

    Window [start, end) keeps the frames shown during it, clamped to the video; a window that begins
    at or after the end of the video raises DecodeError("clip_out_of_range").

    Fixed-count mode: the window is cut into `num_frames` equal time segments and the frame shown at
    the centre of each is taken. A window with fewer frames than requested therefore repeats frames
    (each frame about equally often): the count stays fixed, and with it the model's token budget.
    With a variable frame rate a frame shown for longer than one segment can also be taken twice.

    fps mode: one frame every 1/fps seconds from the window start; more than `max_frames` such times
    are thinned evenly (centres of `max_frames` equal groups). Frames repeat when fps exceeds the
    video's frame rate.
    """
    if n_frames <= 0:
        raise DecodeError("corrupt", "video has no frames")
    starts, ends, _fps = _frame_intervals(n_frames, avg_fps, timestamps)
    duration = float(ends[-1])
    ws = float(spec.start) if spec.start is not None else 0.0
    we = float(spec.end) if spec.end is not None else math.inf
    if ws >= duration:
        raise DecodeError("clip_out_of_range",
                          f"clip start {ws:g}s is at or past the end of the video ({duration:.3f}s)")
    if we <= ws:
        raise DecodeError("clip_out_of_range", f"clip window [{ws:g}, {we:g}) is empty")
    we = min(we, duration)
    inside = np.nonzero((starts < we) & (ends > ws))[0]
    if len(inside) == 0:  # only zero-length frames overlap the window: take the frame shown at ws
        inside = np.array([max(0, int(np.searchsorted(starts, ws, side="right")) - 1)])
    lo, hi = int(inside[0]), int(inside[-1])

    if spec.num_frames is not None:
        k = spec.num_frames
        times = ws + (np.arange(k) + 0.5) * (we - ws) / k
    else:
        count = max(1, math.ceil((we - ws) * spec.fps - 1e-9))
        times = ws + np.arange(count) / spec.fps
        if count > spec.max_frames:
            pick = np.floor((np.arange(spec.max_frames) + 0.5) * count / spec.max_frames).astype(int)
            times = times[pick]
    idx = np.searchsorted(starts, times, side="right") - 1
    return [int(i) for i in np.clip(idx, lo, hi)]


# ----------------------------------------------------------------------------------------------------
# resize
# ----------------------------------------------------------------------------------------------------

def budget_size(height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """(h, w) for `resize_to_budget`: aspect kept, h*w <= max_pixels, never upscaled, sides >= 28.

    Frames already within budget keep their size (also when a side is below 28: no upscaling; the
    model's processor handles tiny frames). When shrinking, neither side goes below 28; for extreme
    aspect ratios (beyond max_pixels/28 : 28) the long side is cut further so the budget still holds,
    which changes the aspect ratio.
    """
    if height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    h = min(height, max(_MIN_SIDE, int(height * scale)))
    w = min(width, max(_MIN_SIDE, int(width * scale)))
    if h * w > max_pixels:  # a side was clamped to 28: shrink the other one to fit the budget
        if h <= w:
            w = min(width, max(_MIN_SIDE, max_pixels // h))
        else:
            h = min(height, max(_MIN_SIDE, max_pixels // w))
    return h, w


def resize_to_budget(frames: np.ndarray, max_pixels: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, h, w, 3) uint8 with `budget_size`; antialiased (PIL) downscale."""
    from PIL import Image

    frames = np.asarray(frames)
    if frames.ndim != 4:
        raise ValueError(f"frames must be (T, H, W, C), got shape {frames.shape}")
    t, height, width = frames.shape[:3]
    h, w = budget_size(height, width, max_pixels)
    if (h, w) == (height, width):
        return frames
    out = np.empty((t, h, w, frames.shape[3]), dtype=np.uint8)
    for i in range(t):
        img = Image.fromarray(np.ascontiguousarray(frames[i]))
        out[i] = np.asarray(img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=3.0))
    return out


# ----------------------------------------------------------------------------------------------------
# decode in this process
# ----------------------------------------------------------------------------------------------------

_decord_mod = None


def _import_decord():
    """`import decord`, without the CUDA libraries it does not need.

    On import, decord2 (3.4) dlopens every shared library of the `nvidia-*` pip packages it finds (torch
    installs cuBLAS, cuDNN, NCCL, ...): about 650 MiB of RSS in every process that decodes, for a decoder
    that runs on the CPU here. Hiding the `nvidia` package during the import skips that (RSS after the
    import: ~40 MiB); a CUDA build of decord2 that cannot load without them is imported the normal way.
    """
    import sys

    if "decord" in sys.modules:
        return sys.modules["decord"]
    hide = "nvidia" not in sys.modules
    if hide:
        sys.modules["nvidia"] = None  # importlib.util.find_spec("nvidia") -> None
    try:
        import decord
    except Exception:
        for name in [m for m in sys.modules if m == "decord" or m.startswith("decord.")]:
            del sys.modules[name]
        if hide:
            sys.modules.pop("nvidia", None)
            hide = False
        import decord
    finally:
        if hide:
            sys.modules.pop("nvidia", None)
    return decord


def decord_module():
    global _decord_mod
    if _decord_mod is None:
        decord = _import_decord()

        # Failures come back as DecodeError; FFmpeg's own log lines would only repeat them on stderr.
        decord.logging.set_level(decord.logging.QUIET)
        _decord_mod = decord
    return _decord_mod


def _resolve(uri: str, filesystem):
    if filesystem is None:
        import fsspec

        try:
            return fsspec.core.url_to_fs(uri)
        except Exception as e:
            raise DecodeError("read_error", f"{uri}: cannot open a filesystem for it: {type(e).__name__}: {e}") from None
    try:
        return filesystem, filesystem._strip_protocol(uri)
    except Exception:
        return filesystem, uri


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _looks_like_container(head: bytes) -> bool:
    """True when the first bytes carry a known video container signature."""
    if len(head) >= 8 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot", b"uuid"):
        return True  # ISO BMFF / QuickTime
    if head.startswith((b"\x1a\x45\xdf\xa3", b"FLV", b"OggS", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3",
                        b"\x30\x26\xb2\x75\x8e\x66\xcf\x11")):
        return True  # Matroska/WebM, FLV, Ogg, MPEG-PS, MPEG-1/2 video, ASF/WMV
    if head.startswith(b"RIFF") and head[8:12] in (b"AVI ", b"AVIX"):
        return True
    return len(head) >= 1 and head[0] == 0x47 and len(head) > 188 and head[188] == 0x47  # MPEG-TS


def _read_head(fs, path: str, data: bytes | None, n: int = 512) -> bytes:
    if data is not None:
        return bytes(data[:n])
    try:
        with fs.open(path, "rb") as f:
            return f.read(n)
    except Exception:
        return b""


def _read_local_head(path: str, n: int = 512) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _short(exc: BaseException, limit: int = 200) -> str:
    """decord's C++ messages without the "[12:00:00] /project/src/...cc:92: " location prefixes."""
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+?:\d+: ", "", str(exc)).strip()
    text = text.splitlines()[-1] if text else ""
    return f"{type(exc).__name__}: {text[-limit:]}"


def _classify_open_error(uri: str, exc: BaseException, head: bytes) -> DecodeError:
    text = str(exc)
    if "cannot find video stream" in text or "Could not find video stream" in text:
        return DecodeError("no_video_stream", f"{uri}: the file has no video stream (audio only?)")
    if "Invalid frame count" in text:
        return DecodeError("corrupt", f"{uri}: the video stream has no frames")
    if isinstance(exc, (MemoryError, OSError)):
        return DecodeError("read_error", f"{uri}: {_short(exc)}")
    if _looks_like_container(head):
        return DecodeError("corrupt", f"{uri}: looks like a video container but cannot be opened "
                                      f"(truncated or damaged, e.g. the mp4 index is missing)")
    return DecodeError("not_a_video", f"{uri}: not a video file FFmpeg can read")


# Decoders tried in this order; the next one runs only when the previous one called the file corrupt or
# not a video (decord2 3.4 fails on some valid small h264 sizes, e.g. 32x32, 48x48, 96x64).
DECODERS = ("decord", "pyav")
_FALLBACK_ON = ("corrupt", "not_a_video")


@dataclass
class _Frames:
    """What one decoder produced: the unique sampled frames and the per-frame timing of the whole video."""
    batch: np.ndarray       # (len(unique), H, W, 3) uint8, displayed orientation
    unique: list[int]
    indices: list[int]
    starts: np.ndarray
    ends: np.ndarray
    fps: float
    n: int


def _sample(uri: str, n: int, avg_fps: float, ts, spec: SamplingSpec):
    try:
        indices = sample_frame_indices(n, avg_fps, spec, ts)
    except DecodeError as e:  # add the file name
        raise DecodeError(e.error_type, f"{uri}: {e.message}") from None
    starts, ends, fps = _frame_intervals(n, avg_fps, ts)
    return indices, starts, ends, fps


def _decode_decord(uri: str, src, spec: SamplingSpec, head: bytes) -> _Frames:
    """decord2: `src` is a local path or a file-like object (decord2 reads it into memory)."""
    decord = decord_module()
    try:
        vr = decord.VideoReader(src, ctx=decord.cpu(0))
    except (PermissionError, ConnectionError, TimeoutError) as e:
        raise DecodeError("read_error", f"{uri}: {type(e).__name__}: {e}") from None
    except BaseException as e:  # decord raises RuntimeError / DECORDError / AssertionError
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise _classify_open_error(uri, e, head) from None
    try:
        n = len(vr)
        avg_fps = float(vr.get_avg_fps())
        try:
            ts = np.asarray(vr.get_frame_timestamp(np.arange(n)), dtype=np.float64)
        except Exception:
            ts = None
        indices, starts, ends, fps = _sample(uri, n, avg_fps, ts, spec)
        unique = sorted(set(indices))
        batch = vr.get_batch(unique).asnumpy()
    except DecodeError:
        raise
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise DecodeError("corrupt", f"{uri}: decoding frames failed (truncated or damaged stream?): "
                                     f"{_short(e)}") from None
    finally:
        del vr
    if batch.ndim != 4 or batch.shape[0] != len(unique) or batch.shape[3] != 3:
        raise DecodeError("corrupt", f"{uri}: decoder returned {batch.shape} for {len(unique)} frames")
    return _Frames(batch, unique, indices, starts, ends, fps, n)


def _decode_pyav(uri: str, src, spec: SamplingSpec, head: bytes) -> _Frames:
    """PyAV (FFmpeg): timing from the demuxed packets (no decoding), then one decode pass that keeps only
    the sampled frames, turned by the stream's display rotation like decord2 does."""
    import av

    try:
        container = av.open(src, mode="r")
    except (PermissionError, ConnectionError, TimeoutError) as e:
        raise DecodeError("read_error", f"{uri}: {type(e).__name__}: {e}") from None
    except Exception as e:
        raise _classify_open_error(uri, e, head) from None
    try:
        if not container.streams.video:
            raise DecodeError("no_video_stream", f"{uri}: the file has no video stream (audio only?)")
        stream = container.streams.video[0]
        try:
            times = sorted((p.pts, p.duration or 0) for p in container.demux(stream) if p.pts is not None)
            if not times:
                raise DecodeError("corrupt", f"{uri}: the video stream has no frames")
            tb = float(stream.time_base)
            ts = np.array([[pts * tb, (pts + dur) * tb] for pts, dur in times], dtype=np.float64)
            avg_fps = float(stream.average_rate) if stream.average_rate else float("nan")
            indices, starts, ends, fps = _sample(uri, len(times), avg_fps, ts, spec)
            unique = sorted(set(indices))
            wanted, got = set(unique), {}
            container.seek(0)
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    arr = frame.to_ndarray(format="rgb24")
                    rot = int(getattr(frame, "rotation", 0) or 0)  # counter-clockwise degrees
                    got[i] = np.rot90(arr, k=rot // 90) if rot % 360 else arr
                    if len(got) == len(wanted):
                        break
        except DecodeError:
            raise
        except Exception as e:
            raise DecodeError("corrupt", f"{uri}: decoding frames failed (truncated or damaged stream?): "
                                         f"{_short(e)}") from None
        if len(got) != len(unique):
            raise DecodeError("corrupt", f"{uri}: the stream ended after {i + 1 if times else 0} of "
                                         f"{len(times)} frames")
        return _Frames(np.stack([np.ascontiguousarray(got[i]) for i in unique]), unique, indices, starts, ends,
                       fps, len(times))
    finally:
        container.close()


_DECODE_FNS = {"decord": _decode_decord, "pyav": _decode_pyav}


def _storage_call(uri: str, what: str, fn, *args):
    """fn(*args) on the storage: a missing object is `not_found`, anything else a `read_error`."""
    try:
        return fn(*args)
    except FileNotFoundError:
        raise DecodeError("not_found", f"{uri}: no such file") from None
    except Exception as e:
        raise DecodeError("read_error", f"{uri}: {what}{type(e).__name__}: {e}") from None


def _decode_in_process(uri: str, spec: SamplingSpec, filesystem=None, data: bytes | None = None,
                       decoders: tuple[str, ...] = DECODERS) -> DecodedVideo:
    t0 = time.perf_counter()
    fs = path = None
    if data is None:
        fs, path = _resolve(uri, filesystem)
        info = _storage_call(uri, "cannot stat: ", fs.info, path)
        if info.get("type") == "directory":
            raise DecodeError("not_a_video", f"{uri}: is a directory")
        size = info.get("size")
    else:
        size = len(data)
    if size == 0:
        raise DecodeError("empty_file", f"{uri}: file is empty (0 bytes)")

    if data is None and not _is_local(fs) and size is not None and size > RANGED_MIN_BYTES:
        from pipeline.decode_ranged import decode_ranged, open_ranged

        try:
            with open_ranged(fs, path, size) as f:
                return decode_ranged(uri, f, spec)
        except FileNotFoundError:
            raise DecodeError("not_found", f"{uri}: no such file") from None
        except (PermissionError, ConnectionError, TimeoutError) as e:
            raise DecodeError("read_error", f"{uri}: {type(e).__name__}: {e}") from None

    tmp_path = None
    try:
        # The byte stream: local files by path (FFmpeg reads only the parts it needs); other filesystems
        # through a file-like object, or, above IN_MEMORY_MAX_BYTES, a temporary file removed below.
        if data is None and not _is_local(fs) and (size is None or size > IN_MEMORY_MAX_BYTES):
            def copy_to_tmp():
                nonlocal tmp_path
                suffix = os.path.splitext(path)[1][:16]
                with fs.open(path, "rb") as src, tempfile.NamedTemporaryFile(
                        prefix="framescribe-", suffix=suffix, delete=False) as dst:
                    tmp_path = dst.name
                    shutil.copyfileobj(src, dst, 8 * 1024 * 1024)

            _storage_call(uri, "", copy_to_tmp)
        head = None
        first_error: DecodeError | None = None
        for name in decoders:
            try:
                if data is not None:
                    got = _DECODE_FNS[name](uri, io.BytesIO(data), spec, bytes(data[:512]))
                elif tmp_path is not None or _is_local(fs):
                    local = tmp_path or path
                    head = head if head is not None else _read_local_head(local)
                    got = _DECODE_FNS[name](uri, local, spec, head)
                else:
                    head = head if head is not None else _read_head(fs, path, None)
                    with fs.open(path, "rb") as f:
                        got = _DECODE_FNS[name](uri, f, spec, head)
            except FileNotFoundError:
                raise DecodeError("not_found", f"{uri}: no such file") from None
            except DecodeError as e:
                if e.error_type not in _FALLBACK_ON:
                    raise
                first_error = first_error or e
                continue
            except (PermissionError, ConnectionError, TimeoutError) as e:
                raise DecodeError("read_error", f"{uri}: {type(e).__name__}: {e}") from None
            break
        else:  # every decoder failed: the first one's reason (decord's classification) stands
            assert first_error is not None
            if len(decoders) > 1:
                first_error = DecodeError(first_error.error_type,
                                          f"{first_error.message} (also failed with {', '.join(decoders[1:])})")
            raise first_error
    finally:
        if tmp_path is not None:
            try:
                os.unlink(tmp_path)
            except OSError:
                pass

    batch = got.batch
    height, width = int(batch.shape[1]), int(batch.shape[2])
    try:
        small = resize_to_budget(batch, spec.max_pixels)
    except MemoryError as e:
        raise DecodeError("read_error", f"{uri}: out of memory while resizing: {e}") from None
    pos = {i: k for k, i in enumerate(got.unique)}
    frames = np.ascontiguousarray(small[[pos[i] for i in got.indices]])
    return DecodedVideo(frames=frames, timestamps=[round(float(got.starts[i]), 6) for i in got.indices],
                        duration_s=float(got.ends[-1]), fps=float(got.fps), width=width, height=height,
                        n_frames_total=int(got.n), decode_ms=(time.perf_counter() - t0) * 1000.0,
                        indices=list(got.indices), decoder=name)


# ----------------------------------------------------------------------------------------------------
# decode in a child process (timeout / crash protection): pipeline.decode_pool runs it
# ----------------------------------------------------------------------------------------------------

def _warm_up() -> None:
    s3_retry.install()
    decord_module()


_POOL = ChildPool(warm_up=_warm_up, name="framescribe-decode")


def shutdown_decode_pool() -> None:
    """Stop the idle decode child processes (they also exit with this process)."""
    _POOL.shutdown()


def _decode_in_child(uri: str, spec: SamplingSpec, filesystem, timeout_s: float,
                     decoders: tuple[str, ...] = DECODERS) -> DecodedVideo:
    data = None
    if filesystem is not None and type(filesystem).__name__ == "MemoryFileSystem":
        # fsspec's memory filesystem lives in this process only: read the bytes here and ship them.
        fs, path = _resolve(uri, filesystem)
        data = _storage_call(uri, "", fs.cat_file, path)
        filesystem = None
    hang_substr = os.environ.get(HANG_ENV)
    try:
        return _POOL.call(_decode_in_process, (uri, spec, filesystem, data, decoders), timeout_s,
                          hang=bool(hang_substr) and hang_substr in uri)
    except ChildTimeout:
        raise DecodeError("decode_timeout", f"{uri}: decoding took longer than {timeout_s:g}s; "
                                            "decoder process killed") from None
    except ChildDied as e:
        if len(decoders) > 1:  # one decoder crashing does not make the file corrupt: the next one tries
            try:
                return _decode_in_child(uri, spec, filesystem, timeout_s, decoders[1:])
            except DecodeError as later:
                if later.error_type not in _FALLBACK_ON:
                    raise
        raise DecodeError("corrupt", f"{uri}: decoder crashed ({e})") from None
    except ChildUnavailable as e:
        raise DecodeError("read_error", f"{uri}: {e}") from None


# ----------------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------------

def decode_video(uri: str, spec: SamplingSpec, *, filesystem=None, timeout_s: float | None = None,
                 decoders: tuple[str, ...] = DECODERS) -> DecodedVideo:
    """Decode the sampled frames of `uri`; raises only DecodeError.

    filesystem: an fsspec filesystem (None: inferred from the uri; local paths, file://, s3://, ...).
    timeout_s: None decodes in this process. Otherwise the decode runs in a child process from a small
    per-process pool (forkserver, safe for threaded callers such as Ray workers); past `timeout_s` the
    child is killed and replaced and DecodeError("decode_timeout") is raised; a child that dies (a
    decoder segfault) gives DecodeError("corrupt", "decoder crashed ...") once every decoder failed.
    decoders: tried in order (default decord2, then PyAV); the next one runs only when the previous one
    called the file corrupt or not a video (or crashed); `DecodedVideo.decoder` names the one that worked.
    """
    unknown = [d for d in decoders if d not in _DECODE_FNS]
    if unknown or not decoders:
        raise ValueError(f"decoders must be a non-empty subset of {DECODERS}, got {decoders}")
    try:
        if timeout_s is None:
            return _decode_in_process(uri, spec, filesystem, None, tuple(decoders))
        return _decode_in_child(uri, spec, filesystem, float(timeout_s), tuple(decoders))
    except DecodeError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        raise DecodeError("read_error", f"{uri}: {type(e).__name__}: {e}") from None
