"""pipeline.decode: frame sampling, resize budget, decode of many codecs/edge cases, error classes,
timeout/crash protection, fsspec byte streams. Videos are synthesized per session (tests/conftest_videos.py)."""
from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import tempfile
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.decode import (HANG_ENV, DecodeError, DecodedVideo, SamplingSpec, decode_video, resize_to_budget,
                             sample_frame_indices)
from pipeline.sample_videos import make_demo_videos, make_moving_shapes, write_video

try:
    from conftest_videos import BROKEN_EXPECTED, CODEC_CASES, FPS, build_corpus, red_fraction
except ImportError:  # tests/ imported as a package
    from tests.conftest_videos import BROKEN_EXPECTED, CODEC_CASES, FPS, build_corpus, red_fraction


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="session")
def videos(corpus):
    return corpus[0]


@pytest.fixture(scope="session")
def broken(corpus):
    return corpus[1]


def spec(**kw) -> SamplingSpec:
    return SamplingSpec(**kw)


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------

class TestSampling:
    def test_fixed_count_evenly_spaced(self):
        idx = sample_frame_indices(100, 10.0, spec(num_frames=8))
        assert len(idx) == 8
        assert idx == sorted(idx) and len(set(idx)) == 8
        gaps = np.diff(idx)
        assert gaps.min() >= 12 and gaps.max() <= 13  # 100 / 8 = 12.5
        assert idx[0] == 6 and idx[-1] == 93  # centres of the 8 segments

    def test_exact_count_takes_every_frame(self):
        assert sample_frame_indices(8, 8.0, spec(num_frames=8)) == list(range(8))

    def test_short_video_repeats_frames_to_keep_count(self):
        idx = sample_frame_indices(3, 8.0, spec(num_frames=8))
        assert len(idx) == 8 and idx == sorted(idx)
        counts = np.bincount(idx)
        assert set(idx) == {0, 1, 2} and counts.max() - counts.min() <= 1

    def test_single_frame_video(self):
        assert sample_frame_indices(1, 30.0, spec(num_frames=4)) == [0, 0, 0, 0]

    def test_window(self):
        idx = sample_frame_indices(100, 10.0, spec(num_frames=8, start=2.0, end=4.0))
        assert len(idx) == 8 and all(20 <= i < 40 for i in idx)
        assert len(set(idx)) == 8

    def test_window_clamped_to_video(self):
        idx = sample_frame_indices(100, 10.0, spec(num_frames=4, start=8.0, end=100.0))
        assert len(idx) == 4 and all(80 <= i < 100 for i in idx)
        idx = sample_frame_indices(100, 10.0, spec(num_frames=4, end=1.0))
        assert all(0 <= i < 10 for i in idx)

    @pytest.mark.parametrize("start", [10.0, 12.5])
    def test_window_past_end(self, start):
        with pytest.raises(DecodeError) as ei:
            sample_frame_indices(100, 10.0, spec(num_frames=4, start=start))
        assert ei.value.error_type == "clip_out_of_range"

    def test_fps_mode(self):
        assert sample_frame_indices(100, 10.0, spec(num_frames=None, fps=1.0)) == list(range(0, 100, 10))
        assert sample_frame_indices(100, 10.0, spec(num_frames=None, fps=1.0, start=2.0, end=5.0)) == [20, 30, 40]

    def test_fps_mode_capped_and_thinned_evenly(self):
        idx = sample_frame_indices(1000, 10.0, spec(num_frames=None, fps=2.0, max_frames=10))  # 200 -> 10
        assert len(idx) == 10 and idx == sorted(idx)
        gaps = np.diff(idx)
        assert gaps.min() >= 95 and gaps.max() <= 105

    def test_fps_mode_faster_than_video_repeats(self):
        idx = sample_frame_indices(10, 5.0, spec(num_frames=None, fps=10.0, max_frames=100))  # 2 s
        assert len(idx) == 20 and set(idx) == set(range(10))

    def test_fps_mode_at_least_one_frame(self):
        assert len(sample_frame_indices(2, 30.0, spec(num_frames=None, fps=0.1))) == 1

    def test_vfr_timestamps_drive_the_window(self):
        # frames 0..9 in the first 0.1 s, frames 10..19 one per second from 1 s to 10 s
        ts = np.concatenate([np.arange(10) * 0.01, 1.0 + np.arange(10)])
        avg = 20 / 11.0
        idx = sample_frame_indices(20, avg, spec(num_frames=4, start=5.0), timestamps=ts)
        assert all(i >= 13 for i in idx)  # frame 13 is shown from 4 s to 5 s; the window starts at 5 s
        # evenly spaced in time, not in frame index: most samples land on the slow second half
        idx = sample_frame_indices(20, avg, spec(num_frames=10), timestamps=ts)
        assert sum(i >= 10 for i in idx) >= 9
        # (n, 2) start/end pairs as decord returns them work too
        pairs = np.stack([ts, np.append(ts[1:], ts[-1] + 1 / avg)], axis=1)
        assert sample_frame_indices(20, avg, spec(num_frames=10), timestamps=pairs) == idx

    def test_spec_validation_and_from_config(self):
        with pytest.raises(ValueError):
            SamplingSpec(num_frames=None, fps=None)
        with pytest.raises(ValueError):
            SamplingSpec(start=3.0, end=2.0)
        cfg = SimpleNamespace(num_frames=16, fps=None, max_frames=32, start=1.0, end=None, max_pixels=1000)
        assert SamplingSpec.from_config(cfg) == SamplingSpec(16, None, 32, 1.0, None, 1000)
        cfg.fps = 2.0  # a given fps selects fps mode even though the config always carries num_frames
        assert SamplingSpec.from_config(cfg).num_frames is None

    def test_from_run_config(self):
        config = pytest.importorskip("pipeline.config")
        cfg = config.RunConfig(input="in", output="out", model="m", num_frames=4, max_pixels=28 * 28 * 16)
        s = SamplingSpec.from_config(cfg)
        assert (s.num_frames, s.fps, s.max_pixels) == (4, None, 28 * 28 * 16)


# ------------------------------------------------------------------------------------------------
# resize
# ------------------------------------------------------------------------------------------------

class TestResize:
    def test_downscale_keeps_aspect_and_budget(self):
        frames = np.zeros((2, 1080, 1920, 3), np.uint8)
        frames[..., 0] = 200
        out = resize_to_budget(frames, 224 * 224)
        t, h, w, c = out.shape
        assert (t, c) == (2, 3) and out.dtype == np.uint8
        assert h * w <= 224 * 224 and h * w > 0.95 * 224 * 224
        assert abs(w / h - 1920 / 1080) < 0.02
        assert np.all(out[..., 0] == 200) and np.all(out[..., 1] == 0)

    def test_within_budget_unchanged(self):
        frames = np.random.default_rng(0).integers(0, 255, (3, 100, 120, 3), dtype=np.uint8)
        assert resize_to_budget(frames, 224 * 224) is frames

    def test_never_upscales_small_frames(self):
        frames = np.zeros((1, 16, 20, 3), np.uint8)
        assert resize_to_budget(frames, 224 * 224).shape == (1, 16, 20, 3)

    @pytest.mark.parametrize("shape,budget", [((480, 640), 28 * 28), ((40, 4000), 224 * 224), ((4000, 40), 224 * 224),
                                              ((721, 1283), 10_000)])
    def test_min_side_and_budget(self, shape, budget):
        out = resize_to_budget(np.zeros((1, *shape, 3), np.uint8), budget)
        h, w = out.shape[1:3]
        assert h >= 28 and w >= 28 and h * w <= budget
        assert h <= shape[0] and w <= shape[1]


# ------------------------------------------------------------------------------------------------
# decode: good videos
# ------------------------------------------------------------------------------------------------

def _check_similar(decoded: np.ndarray, reference: np.ndarray, tol: float = 25.0):
    diff = np.abs(decoded.astype(np.int16) - reference.astype(np.int16)).mean()
    assert diff < tol, f"decoded frame differs from the encoded one by {diff:.1f} on average"


@pytest.mark.parametrize("case", list(CODEC_CASES))
def test_codecs(videos, case):
    if case not in videos:
        pytest.skip(f"encoder for {case} not in this PyAV build")
    v = videos[case]
    d = decode_video(str(v.path), spec(num_frames=8))
    assert isinstance(d, DecodedVideo)
    assert d.frames.shape == (8, 96, 128, 3) and d.frames.dtype == np.uint8
    assert (d.width, d.height, d.n_frames_total) == (128, 96, 16)
    assert d.fps == pytest.approx(FPS, rel=0.01) and d.duration_s == pytest.approx(2.0, abs=0.02)
    assert d.indices == [1, 3, 5, 7, 9, 11, 13, 15]
    assert d.timestamps == pytest.approx([i / FPS for i in d.indices], abs=0.002)
    assert d.decode_ms > 0
    for frame, i in zip(d.frames, d.indices):
        assert red_fraction(frame) > 0.03, "the moving shape's colour is missing"
        _check_similar(frame, v.frames[i])


def test_one_frame_video(videos):
    d = decode_video(str(videos["one_frame"].path), spec(num_frames=8))
    assert d.frames.shape == (8, 64, 64, 3) and d.n_frames_total == 1 and d.indices == [0] * 8
    assert np.array_equal(d.frames[0], d.frames[-1])
    _check_similar(d.frames[0], videos["one_frame"].frames[0])


def test_video_shorter_than_num_frames(videos):
    d = decode_video(str(videos["short"].path), spec(num_frames=8))
    assert d.frames.shape[0] == 8 and d.n_frames_total == 3
    assert sorted(set(d.indices)) == [0, 1, 2]
    for frame, i in zip(d.frames, d.indices):
        _check_similar(frame, videos["short"].frames[i])


@pytest.mark.parametrize("case,hw", [("odd_98x62", (62, 98)), ("odd_97x63", (63, 97)), ("portrait", (128, 72))])
def test_sizes(videos, case, hw):
    d = decode_video(str(videos[case].path), spec(num_frames=4))
    assert d.frames.shape == (4, *hw, 3) and (d.height, d.width) == hw
    _check_similar(d.frames[0], videos[case].frames[d.indices[0]])


# decord2 3.4 fails on these valid h264 sizes (4-channel frames, then "The size must exactly match")
@pytest.mark.parametrize("hw", [(32, 32), (48, 48), (64, 96)])
def test_small_h264_falls_back_to_pyav(tmp_path, hw):
    frames = make_moving_shapes(6, *hw, seed=hw[0])
    path = str(write_video(tmp_path / f"small_{hw[1]}x{hw[0]}.mp4", frames, fps=6))
    try:
        decode_video(path, spec(num_frames=3), decoders=("decord",))
        decord_works = True
    except DecodeError as e:
        assert e.error_type == "corrupt"
        decord_works = False
    d = decode_video(path, spec(num_frames=3), timeout_s=60)
    assert d.frames.shape == (3, *hw, 3) and (d.height, d.width) == hw
    assert d.decoder == ("decord" if decord_works else "pyav")
    for frame, i in zip(d.frames, d.indices):
        _check_similar(frame, frames[i])


@pytest.mark.parametrize("case", ["h264", "odd_97x63", "vfr", "long"])
def test_pyav_decoder_matches_decord(videos, case):
    """The fallback gives the same frames, times and geometry as decord2 where decord2 works."""
    kw = dict(num_frames=5) if case != "long" else dict(num_frames=4, start=2.0, end=6.0)
    a = decode_video(str(videos[case].path), spec(**kw), decoders=("decord",))
    b = decode_video(str(videos[case].path), spec(**kw), decoders=("pyav",))
    assert (a.decoder, b.decoder) == ("decord", "pyav")
    assert b.indices == a.indices and b.timestamps == pytest.approx(a.timestamps, abs=1e-3)
    assert (b.width, b.height, b.n_frames_total) == (a.width, a.height, a.n_frames_total)
    assert b.duration_s == pytest.approx(a.duration_s, abs=1e-3) and b.fps == pytest.approx(a.fps, rel=1e-3)
    for fa, fb in zip(a.frames, b.frames):
        _check_similar(fb, fa, tol=3.0)


@pytest.mark.parametrize("name", sorted(BROKEN_EXPECTED))
def test_broken_files_keep_their_reason_after_the_fallback(broken, name):
    with pytest.raises(DecodeError) as e:
        decode_video(str(broken[name]), spec(num_frames=2), decoders=("pyav",))
    assert e.value.error_type == BROKEN_EXPECTED[name]


def test_rotation_metadata_is_applied(videos):
    """Stored 128x72 landscape with rotate=90: comes out 72 wide, 128 tall, turned clockwise."""
    v = videos["rotated90"]
    d = decode_video(str(v.path), spec(num_frames=4))
    assert d.frames.shape == (4, 128, 72, 3) and (d.width, d.height) == (72, 128)
    for frame, i in zip(d.frames, d.indices):
        _check_similar(frame, np.rot90(v.frames[i], k=-1))
    # the green marker from the stored top-left corner is now top-right
    corner = d.frames[0, :8, -8:].reshape(-1, 3).mean(0)
    assert corner[1] > 180 and corner[0] < 80


def test_vfr_timestamps(videos):
    v = videos["vfr"]
    d = decode_video(str(v.path), spec(num_frames=6))
    assert d.n_frames_total == 12
    assert d.timestamps == pytest.approx([v.timestamps[i] for i in d.indices], abs=0.002)
    # a window given in seconds follows the real (irregular) times
    start = v.timestamps[6]
    d = decode_video(str(v.path), spec(num_frames=3, start=start))
    assert min(d.indices) >= 6 and min(d.timestamps) >= start - 0.002


def test_unicode_file_name(videos):
    d = decode_video(str(videos["unicode"].path), spec(num_frames=2))
    assert d.frames.shape == (2, 64, 64, 3)
    # fsspec takes file:// paths literally (no percent-decoding), as the rest of the pipeline does
    assert decode_video(f"file://{videos['unicode'].path}", spec(num_frames=2)).frames.shape == (2, 64, 64, 3)


def test_window_and_fps_mode_on_real_video(videos):
    path = str(videos["long"].path)  # 80 frames, 10 s
    d = decode_video(path, spec(num_frames=8, start=2.0, end=4.0))
    assert len(d.frames) == 8 and all(2.0 <= t < 4.0 for t in d.timestamps)
    d = decode_video(path, spec(num_frames=None, fps=2.0))
    assert len(d.frames) == 20 and d.timestamps[:3] == pytest.approx([0.0, 0.5, 1.0])
    d = decode_video(path, spec(num_frames=None, fps=8.0, max_frames=32))
    assert len(d.frames) == 32
    with pytest.raises(DecodeError) as ei:
        decode_video(path, spec(start=12.0))
    assert ei.value.error_type == "clip_out_of_range" and "long_10s.mp4" in ei.value.message


def test_resize_in_decode_keeps_original_size(videos):
    d = decode_video(str(videos["h264"].path), spec(num_frames=2, max_pixels=28 * 28 * 4))
    h, w = d.frames.shape[1:3]
    assert h * w <= 28 * 28 * 4 and min(h, w) >= 28
    assert (d.width, d.height) == (128, 96)


def test_demo_videos_decode(tmp_path):
    paths = make_demo_videos(tmp_path, n=4, seed=3)
    assert len(paths) == 4 and len({p.suffix + p.stem.split("_")[-1] for p in paths}) == 4
    for p in paths:
        d = decode_video(str(p), spec(num_frames=4))
        assert d.frames.shape == (4, 128, 128, 3) and red_fraction(d.frames[0]) > 0.03


def test_moving_shapes_deterministic():
    a, b = make_moving_shapes(4, 32, 48, seed=1), make_moving_shapes(4, 32, 48, seed=1)
    assert a.shape == (4, 32, 48, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, make_moving_shapes(4, 32, 48, seed=2))
    assert not np.array_equal(a[0], a[-1])  # it moves


# ------------------------------------------------------------------------------------------------
# decode: errors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(BROKEN_EXPECTED))
def test_broken_files(broken, name):
    with pytest.raises(DecodeError) as ei:
        decode_video(str(broken[name]), spec())
    assert ei.value.error_type == BROKEN_EXPECTED[name], ei.value.message
    assert broken[name].name in ei.value.message


def test_missing_file(tmp_path):
    with pytest.raises(DecodeError) as ei:
        decode_video(str(tmp_path / "nope.mp4"), spec())
    assert ei.value.error_type == "not_found" and "nope.mp4" in ei.value.message


def test_directory_and_unknown_protocol(tmp_path):
    with pytest.raises(DecodeError) as ei:
        decode_video(str(tmp_path), spec())
    assert ei.value.error_type == "not_a_video"
    with pytest.raises(DecodeError) as ei:
        decode_video("nosuchproto://bucket/x.mp4", spec())
    assert ei.value.error_type == "read_error"


def test_decode_error_pickles():
    e = pickle.loads(pickle.dumps(DecodeError("corrupt", "x.mp4: bad")))
    assert (e.error_type, e.message, str(e)) == ("corrupt", "x.mp4: bad", "x.mp4: bad")


# ------------------------------------------------------------------------------------------------
# fsspec byte streams
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def memfs():
    import fsspec

    fs = fsspec.filesystem("memory")
    yield fs
    try:
        fs.rm("/framescribe-test", recursive=True)
    except FileNotFoundError:
        pass


def test_memory_filesystem(videos, memfs):
    v = videos["h264"]
    memfs.pipe("/framescribe-test/clip.mp4", v.path.read_bytes())
    local = decode_video(str(v.path), spec(num_frames=4))
    d = decode_video("memory://framescribe-test/clip.mp4", spec(num_frames=4))
    assert np.array_equal(d.frames, local.frames)
    d = decode_video("memory://framescribe-test/clip.mp4", spec(num_frames=4), filesystem=memfs)
    assert np.array_equal(d.frames, local.frames)
    with pytest.raises(DecodeError) as ei:
        decode_video("memory://framescribe-test/missing.mp4", spec(), filesystem=memfs)
    assert ei.value.error_type == "not_found"


def test_large_remote_object_goes_through_temp_file(videos, memfs, monkeypatch):
    import pipeline.decode as dec

    monkeypatch.setattr(dec, "IN_MEMORY_MAX_BYTES", 0)
    memfs.pipe("/framescribe-test/big.webm", videos["vp9"].path.read_bytes())
    before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("framescribe-")}
    d = decode_video("memory://framescribe-test/big.webm", spec(num_frames=3))
    assert d.frames.shape == (3, 96, 128, 3)
    after = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("framescribe-")}
    assert after <= before, "temporary copy was not removed"


# ------------------------------------------------------------------------------------------------
# child process: timeout, crash, same results
# ------------------------------------------------------------------------------------------------

def test_child_decode_matches_in_process(videos, broken, memfs):
    path = str(videos["h264"].path)
    a = decode_video(path, spec(num_frames=5))
    b = decode_video(path, spec(num_frames=5), timeout_s=60)
    assert np.array_equal(a.frames, b.frames) and a.indices == b.indices and a.timestamps == b.timestamps
    for name in ("truncated", "audio_only", "text", "empty"):
        with pytest.raises(DecodeError) as ei:
            decode_video(str(broken[name]), spec(), timeout_s=60)
        assert ei.value.error_type == BROKEN_EXPECTED[name]
    # the memory filesystem is process-local: its bytes are shipped to the child
    memfs.pipe("/framescribe-test/c.mp4", videos["h264"].path.read_bytes())
    c = decode_video("memory://framescribe-test/c.mp4", spec(num_frames=5), filesystem=memfs, timeout_s=60)
    assert np.array_equal(a.frames, c.frames)


def test_timeout_kills_hanging_decoder_and_recovers(videos, monkeypatch):
    path = str(videos["h264"].path)
    decode_video(path, spec(num_frames=2), timeout_s=60)  # warm a worker so startup is not timed
    monkeypatch.setenv(HANG_ENV, "codec_h264")
    t0 = time.monotonic()
    with pytest.raises(DecodeError) as ei:
        decode_video(path, spec(num_frames=2), timeout_s=1.5)
    elapsed = time.monotonic() - t0
    assert ei.value.error_type == "decode_timeout" and "codec_h264" in ei.value.message
    assert 1.4 <= elapsed < 1.5 + 5
    # other uris are unaffected, and the pool works again afterwards
    d = decode_video(str(videos["short"].path), spec(num_frames=2), timeout_s=60)
    assert d.frames.shape == (2, 64, 64, 3)
    monkeypatch.delenv(HANG_ENV)
    assert decode_video(path, spec(num_frames=2), timeout_s=60).frames.shape == (2, 96, 128, 3)


def test_crashing_decoder_is_reported_as_corrupt(videos, monkeypatch):
    path = str(videos["short"].path)
    decode_video(path, spec(num_frames=2), timeout_s=60)
    monkeypatch.setenv(HANG_ENV, "short.mp4")
    result = {}

    def run():
        try:  # decord only: with the default chain a crashed decoder is followed by PyAV (hooked to hang too)
            decode_video(path, spec(num_frames=2), timeout_s=60, decoders=("decord",))
        except DecodeError as e:
            result["error"] = e

    th = threading.Thread(target=run)
    th.start()
    time.sleep(1.0)
    children = [p for p in multiprocessing.active_children() if p.name == "framescribe-decode"]
    assert children
    for p in children:  # simulate a decoder segfault (idle workers die too; the pool replaces them)
        os.kill(p.pid, signal.SIGSEGV)
    th.join(30)
    assert not th.is_alive()
    err = result["error"]
    assert err.error_type == "corrupt" and "crashed" in err.message and "SIGSEGV" in err.message
    monkeypatch.delenv(HANG_ENV)
    assert decode_video(path, spec(num_frames=2), timeout_s=60).frames.shape == (2, 64, 64, 3)
