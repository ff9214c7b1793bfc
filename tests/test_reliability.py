"""Failures at scale end as rows: a poison video that kills the model process every time, retryable errors
that the next run retries by itself, a Ray address that does not answer, SIGTERM mid-run, the plan that keeps
decode out of the model actor. Real CLI, real local Ray, real videos, Parquet read back with pyarrow."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline.output import read_rows
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow

FAST = ("--num-frames", "2", "--max-new-tokens", "3")


@pytest.fixture(scope="module")
def six_videos(tmp_path_factory) -> Path:
    from pipeline.sample_videos import make_moving_shapes, write_video

    d = tmp_path_factory.mktemp("six")
    for i in range(6):
        write_video(d / f"clip_{i:02d}.mp4", make_moving_shapes(4, 64, 64, seed=200 + i), fps=4)
    return d


@pytest.fixture
def ray_tmp():
    d = tempfile.mkdtemp(prefix="fsr", dir="/tmp")  # short: Ray's socket paths have a length limit
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _rows(out) -> list[dict]:
    return read_rows(str(out)).to_pylist()


def test_poison_video_ends_as_model_crash_rows_and_the_rest_is_labeled(tmp_path, tiny_qwen, six_videos, ray_tmp):
    """FRAMESCRIBE_TEST_CRASH_ON kills the model process whenever clip_02 is in its batch: bounded retries,
    the crash isolated to clip_02 (its batch-mates labeled), exit 0."""
    out = tmp_path / "labels"
    t0 = time.monotonic()
    r = run_cli("run", "--input", str(six_videos), "--output", str(out), "--model", str(tiny_qwen), *FAST,
                "--batch-size", "3", "--prompt", "Describe this video.",
                env={"RAY_TMPDIR": ray_tmp, "FRAMESCRIBE_TEST_CRASH_ON": "clip_02"}, timeout=300)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = _rows(out)
    assert Counter((x["video_id"], x["prompt_id"]) for x in rows).most_common(1)[0][1] == 1
    by_uri = {Path(x["uri"]).name: x for x in rows}
    assert len(by_uri) == 6
    poison = by_uri.pop("clip_02.mp4")
    assert poison["status"] == "error" and poison["error_type"] == "model_crash"
    assert "died in 2 attempts" in poison["error_message"] and poison["retryable"] is False
    assert {x["status"] for x in by_uri.values()} == {"ok"}, {k: x["error_type"] for k, x in by_uri.items()}
    assert not list((out / "_framescribe" / "attempts").rglob("*.json"))  # the ledger is cleared at the end
    print(f"poison run: {took:.1f} s")
    assert "model_crash: 1" in r.stdout
