"""Ranged reads: a big video on the S3-protocol server is decoded from the byte ranges its sampled
frames need (faststart or not), and gives the frames a local decode gives."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest_s3 import moto_server, s3  # noqa: F401  (pytest fixtures)


@pytest.fixture(scope="module")
def long_videos(tmp_path_factory):
    from bench.scale import make_long_video

    d = tmp_path_factory.mktemp("long")
    return {fs: make_long_video(d / f"long-{fs}.mp4", seconds=60, fps=10, size=(160, 120), bitrate=300_000,
                                faststart=fs) for fs in (True, False)}


@pytest.mark.parametrize("faststart", [True, False], ids=["faststart", "moov-at-end"])
def test_big_object_is_decoded_from_ranges_not_fetched_whole(s3, long_videos, monkeypatch, faststart):  # noqa: F811
    import pipeline.decode as decode
    import pipeline.decode_ranged as ranged
    from pipeline.decode import SamplingSpec, decode_video
    from pipeline.storage import get_fs

    path = long_videos[faststart]
    bucket = s3.new_bucket()
    uri = s3.upload(path, bucket, f"videos/{path.name}")
    spec = SamplingSpec(num_frames=8, max_pixels=64 * 64)
    local = decode_video(str(path), spec)  # decord, by path

    fetched_bytes = []
    real_open = ranged.open_ranged

    def spy_open(fs, p, size=None):
        f = real_open(fs, p, size)
        real_close = f.close
        f.close = lambda: (fetched_bytes.append(f.cache.total_requested_bytes) if f.cache else None,
                           real_close())
        return f

    monkeypatch.setattr(ranged, "open_ranged", spy_open)
    monkeypatch.setattr(decode, "RANGED_MIN_BYTES", 1)  # this 60-s clip counts as big
    fs, _ = get_fs(uri)
    remote = decode_video(uri, spec, filesystem=fs)
    assert len(fetched_bytes) >= 1, "the ranged path was not taken"
    fetched, size = fetched_bytes[0], path.stat().st_size
    print(f"faststart={faststart}: fetched {fetched} of {size} bytes ({100 * fetched / size:.1f} %)")
    assert fetched < 0.5 * size                        # 8 GOPs of 30 and the index, not the object
    assert remote.indices == local.indices and remote.n_frames_total == local.n_frames_total
    assert remote.timestamps == pytest.approx(local.timestamps, abs=1e-3)
    assert remote.frames.shape == local.frames.shape
    diff = np.abs(remote.frames.astype(int) - local.frames.astype(int)).mean()
    assert diff < 3.0, diff                            # same frames (colour conversion may differ by a step)
