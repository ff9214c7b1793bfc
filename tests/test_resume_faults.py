"""Surviving faults with the real CLI: a driver killed with SIGKILL mid-run, a model actor that dies,
a decoder that hangs; then resume, --retry-errors and --overwrite. Every (video, prompt) ends with
exactly one row."""
from __future__ import annotations

import json
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

N_VIDEOS = 12
FAST = ("--num-frames", "2", "--max-new-tokens", "3", "--batch-size", "1")


@pytest.fixture(scope="module")
def small_videos(tmp_path_factory) -> Path:
    from pipeline.sample_videos import make_moving_shapes, write_video

    d = tmp_path_factory.mktemp("small")
    for i in range(N_VIDEOS):
        write_video(d / f"clip_{i:02d}.mp4", make_moving_shapes(4, 64, 64, seed=100 + i), fps=4)
    return d


@pytest.fixture
def ray_tmp():
    """Ray's temp dir for the CLI runs of one test (short: Ray's socket paths have a length limit)."""
    d = tempfile.mkdtemp(prefix="fsr", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _keys(out) -> Counter:
    t = read_rows(str(out))
    return Counter(zip(t["video_id"].to_pylist(), t["prompt_id"].to_pylist()))


def _states(out) -> list[dict]:
    files = sorted((Path(out) / "_framescribe").glob("run-*.json"), key=lambda p: p.stat().st_mtime)
    return [json.loads(p.read_text()) for p in files]


def _group_processes(pgid: int) -> dict[int, str]:
    """pid -> name of the live (not zombie) processes of a process group (Linux /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            if int(rest[2]) == pgid and rest[0] != "Z":  # fields after the name: state, ppid, pgrp
                found[int(entry)] = name
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_driver_sigkill_mid_run_then_rerun_gives_every_row_exactly_once(tmp_path, tiny_qwen, small_videos,
                                                                         ray_tmp):
    out = tmp_path / "labels"
    # --part-rows 4: a part is committed every 4 rows (not 1000), so the kill lands between parts
    args = ["run", "--input", str(small_videos), "--output", str(out), "--model", str(tiny_qwen), *FAST,
            "--part-rows", "4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": ray_tmp}
    log = tmp_path / "killed.log"
    with open(log, "wb") as f:
        # own session: the driver's pid is the process group id of everything it starts (Ray included)
        driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env,
                                  stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("part-*.parquet")):
            assert driver.poll() is None, "the run ended before it could be killed:\n" + log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.kill(driver.pid, signal.SIGKILL)  # the driver only: Ray's own processes are left to fend for themselves
        driver.wait(30)
        time.sleep(1.0)
        committed = read_rows(str(out)).num_rows
        assert 0 < committed < N_VIDEOS, committed  # killed mid-run, whole parts only
        left = _group_processes(driver.pid)
        print(f"killed driver after {committed} rows; left running: {sorted(left.values())}")

        # the rerun starts while whatever the killed run left is still there: it must not care
        r = run_cli(*args, env={"RAY_TMPDIR": ray_tmp})
        assert r.returncode == 0, r.stderr[-3000:]
        keys = _keys(out)
        assert len(keys) == N_VIDEOS and set(keys.values()) == {1}, keys   # none lost, none twice
        state = _states(out)[-1]
        assert state["videos_skipped"] >= committed - state["duplicates_removed"]
        assert state["rows"] == N_VIDEOS - state["videos_skipped"]
        assert all(r["status"] == "ok" for r in read_rows(str(out)).to_pylist())
        assert f"({state['videos_skipped']} already labeled, skipped)" in r.stdout
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid in _group_processes(driver.pid):  # only what the killed driver started
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_actor_crash_and_hanging_decoder_then_retry_errors_and_overwrite(tmp_path, tiny_qwen, small_videos,
                                                                          ray_tmp):
    videos = tmp_path / "in"
    videos.mkdir()
    for p in sorted(small_videos.iterdir())[:5]:
        shutil.copy(p, videos / p.name)
    for name in ("hang_a.mp4", "hang_b.mp4"):
        shutil.copy(next(small_videos.iterdir()), videos / name)
    out = tmp_path / "labels"
    marker = tmp_path / "actor-crashed"
    args = ["run", "--input", str(videos), "--output", str(out), "--model", str(tiny_qwen), *FAST,
            "--decode-timeout-s", "3"]
    env = {"RAY_TMPDIR": ray_tmp}

    # 1. the model actor dies once at its second batch (test hook), the decoder hangs on two files
    r = run_cli(*args, env={**env, "FRAMESCRIBE_TEST_ACTOR_CRASH_ONCE": str(marker),
                            "FRAMESCRIBE_TEST_DECODE_HANG_SUBSTR": "hang_"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker.exists(), "the actor crash hook did not fire"
    rows = {Path(x["uri"]).name: x for x in read_rows(str(out)).to_pylist()}
    assert len(rows) == 7 and set(_keys(out).values()) == {1}
    hung = {"hang_a.mp4", "hang_b.mp4"}
    for name in hung:
        assert rows[name]["status"] == "error" and rows[name]["error_type"] == "decode_timeout", rows[name]
        assert "3s" in rows[name]["error_message"]
    assert all(x["status"] == "ok" for name, x in rows.items() if name not in hung)
    first = _states(out)[-1]
    assert first["videos_ok"] == 5 and first["videos_error"] == 2

    # 2. --retry-errors redoes the error rows only, now two to a part (batch size is not part of the
    #    labeling config): compaction drops the old error rows, one row per key is left (the ok one)
    r = run_cli(*args, "--retry-errors", "--batch-size", "2", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    second = _states(out)[-1]
    rows2 = {Path(x["uri"]).name: x for x in read_rows(str(out)).to_pylist()}
    assert len(rows2) == 7 and set(_keys(out).values()) == {1}
    assert all(rows2[n]["status"] == "ok" and rows2[n]["run_id"] == second["run_id"] for n in hung)
    assert {x["run_id"] for n, x in rows2.items() if n not in hung} == {first["run_id"]}
    assert second["rows"] == 2 and second["videos_skipped"] == 5 and second["duplicates_removed"] == 2
    assert "duplicates removed" in r.stdout

    # 3. --overwrite starts over: every row is new
    r = run_cli(*args, "--overwrite", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    third = _states(out)[-1]
    rows3 = read_rows(str(out)).to_pylist()
    assert len(rows3) == 7 and {x["run_id"] for x in rows3} == {third["run_id"]}
    assert third["rows"] == 7 and third["videos_skipped"] == 0
