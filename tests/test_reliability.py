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
from tests.conftest_s3 import moto_server, s3  # noqa: F401  (pytest fixtures)
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.slow

FAST = ("--num-frames", "2", "--max-new-tokens", "3")
N_CLUSTER = 12


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


def _dead_port() -> int:
    import socket

    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stale_cluster_file(ray_tmp: str, port: int) -> None:
    """What a stopped `ray start --head` leaves: `<RAY_TMPDIR>/ray/ray_current_cluster` naming a dead GCS."""
    Path(ray_tmp, "ray").mkdir(exist_ok=True)
    Path(ray_tmp, "ray", "ray_current_cluster").write_text(f"127.0.0.1:{port}")


def test_an_address_that_does_not_answer_fails_fast(tmp_path, tiny_qwen, six_videos, ray_tmp):
    """--address HOST:PORT and --address auto (a stale ray_current_cluster file, left by a stopped
    `ray start`) fail with exit 2 naming the address, in seconds; nothing waits on a dead GCS."""
    port = _dead_port()
    _stale_cluster_file(ray_tmp, port)
    base = ["run", "--input", str(six_videos), "--output", str(tmp_path / "o"), "--model", str(tiny_qwen)]
    for address in (f"127.0.0.1:{port}", "auto", f"ray://127.0.0.1:{port}"):
        t0 = time.monotonic()
        r = run_cli(*base, "--address", address, env={"RAY_TMPDIR": ray_tmp}, timeout=120)
        assert r.returncode == 2, (address, r.stdout[-1000:], r.stderr[-2000:])
        assert f"127.0.0.1:{port}" in r.stderr and "no Ray cluster answers" in r.stderr, r.stderr[-2000:]
        assert time.monotonic() - t0 < 60
    r = run_cli(*base, env={"RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": f"127.0.0.1:{port}"}, timeout=120)
    assert r.returncode == 2 and "RAY_ADDRESS" in r.stderr, r.stderr[-2000:]


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                rest = stat[stat.rindex(")") + 2:].split()
                if int(rest[2]) == pgid and rest[0] != "Z":
                    alive.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return alive


def test_stale_cluster_file_is_ignored_and_sigterm_stops_a_run(tmp_path, tiny_qwen, six_videos, ray_tmp):
    """Without --address a run starts its own Ray even when a stale ray_current_cluster file points at a
    dead cluster; SIGTERM while a decode hangs stops it (and the Ray it started) within seconds."""
    _stale_cluster_file(ray_tmp, _dead_port())
    out = tmp_path / "labels"
    batches = tmp_path / "batches.jsonl"  # the model actor logs each batch (FRAMESCRIBE_BATCH_LOG)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": ray_tmp,
           "FRAMESCRIBE_TEST_DECODE_HANG_SUBSTR": "clip_05", "FRAMESCRIBE_BATCH_LOG": str(batches)}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "run.log"
    with open(log, "wb") as f:
        driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--input", str(six_videos),
                                   "--output", str(out), "--model", str(tiny_qwen), *FAST, "--batch-size", "1",
                                   "--decode-timeout-s", "600"], cwd=REPO, env=env, stdout=f,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        def labeled() -> int:
            return len(batches.read_text().splitlines()) if batches.exists() else 0

        while labeled() < 5:  # every video but the hanging one: mid-run, one decode stuck
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        t0 = time.monotonic()
        os.kill(driver.pid, signal.SIGTERM)
        rc = driver.wait(60)
        stopped = time.monotonic() - t0
        assert rc != 0 and "interrupted" in log.read_text(), log.read_text()[-3000:]
        deadline = time.monotonic() + 30
        while _group_alive(driver.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _group_alive(driver.pid), "processes of the stopped run are still alive"
        print(f"SIGTERM to exit: {stopped:.1f} s (rc {rc}), {read_rows(str(out)).num_rows} rows committed")
        assert rc == 130 and stopped < 60
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid in _group_alive(driver.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_storage_faults_end_ok_after_retries_or_on_the_next_run(s3, tiny_qwen, six_videos, tmp_path, ray_tmp):
    """Input, model and output on the S3-protocol server behind a proxy that answers 25 % of requests with
    503 SlowDown, resets 10 % of connections and slows 5 % (seeded). One object is blacked out (every GET
    503) during the first run: its row says retryable, and the second run retries it by itself."""
    from pipeline.sample_videos import make_broken_files

    b = s3.new_bucket()
    s3.upload_dir(six_videos, b, "videos")
    broken = make_broken_files(tmp_path / "broken")
    for name in ("truncated", "text"):
        s3.upload(broken[name], b, f"videos/broken_{name}.mp4")
    model = s3.upload_dir(tiny_qwen, b, "models/tiny-qwen")
    env = {"RAY_TMPDIR": ray_tmp, "FRAMESCRIBE_CACHE": str(tmp_path / "cache"),
           "AWS_MAX_ATTEMPTS": "3"}  # botocore's own retry setting (standard mode backoff), bounded for the test
    args = ["run", "--input", f"s3://{b}/videos/", "--output", f"s3://{b}/labels", "--model", model, *FAST,
            "--batch-size", "4", "--decode-timeout-s", "120"]
    with FaultProxy(s3.endpoint, seed=14, slowdown=0.25, reset=0.10, slow=0.05, slow_s=0.3) as proxy:
        proxy.blackout = {"/videos/clip_03.mp4"}
        r1 = run_cli(*args, "--s3-endpoint", proxy.endpoint, env=env, timeout=400)
        first = dict(proxy.counts)
        assert r1.returncode == 0, r1.stdout[-2000:] + r1.stderr[-3000:]
        rows1 = {Path(x["uri"]).name: x for x in read_rows(f"s3://{b}/labels").to_pylist()}
        assert len(rows1) == 8
        assert rows1["clip_03.mp4"]["status"] == "error" and rows1["clip_03.mp4"]["retryable"] is True
        assert rows1["clip_03.mp4"]["error_type"] == "read_error" and rows1["clip_03.mp4"]["run_attempt"] == 1
        proxy.blackout = set()
        r2 = run_cli(*args, "--s3-endpoint", proxy.endpoint, env=env, timeout=400)  # no flag: retries by itself
        assert r2.returncode == 0, r2.stdout[-2000:] + r2.stderr[-3000:]
    print(f"faults injected: run 1 {first}, both runs {dict(proxy.counts)}")
    assert first["slowdown"] > 0 and first["reset"] > 0 and first["slow"] > 0 and first["blackout"] > 0
    t = read_rows(f"s3://{b}/labels")
    keys = Counter(zip(t["video_id"].to_pylist(), t["prompt_id"].to_pylist()))
    assert len(keys) == 8 and set(keys.values()) == {1}, keys          # nothing lost, nothing twice
    rows = {Path(x["uri"]).name: x for x in t.to_pylist()}
    for i in range(6):
        assert rows[f"clip_{i:02d}.mp4"]["status"] == "ok", rows[f"clip_{i:02d}.mp4"]
    assert rows["clip_03.mp4"]["run_attempt"] == 2
    assert rows["broken_truncated.mp4"]["error_type"] == "corrupt" and not rows["broken_truncated.mp4"]["retryable"]
    assert rows["broken_text.mp4"]["error_type"] == "not_a_video" and not rows["broken_text.mp4"]["retryable"]
    assert "1 already labeled" not in r2.stdout and "(7 already labeled, skipped)" in r2.stdout


def _children_named(ppid: int, needle: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                rest = stat[stat.rindex(")") + 2:].split()
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if int(rest[1]) == ppid and rest[0] != "Z" and needle in cmd:
                    found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return found


@pytest.fixture
def three_node_cluster(ray_tmp):
    """A head (no CPUs: it only schedules) and two 1-CPU worker nodes on this machine."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                             "temp_dir": ray_tmp})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]  # room for the model actor and a decode task
    cluster.wait_for_nodes()
    yield cluster, workers
    cluster.shutdown()


def test_node_loss_and_driver_kill_on_a_three_node_cluster(tmp_path, tiny_qwen, three_node_cluster, ray_tmp):
    """A worker node hosting the model actor (and decode tasks) is removed mid-run: the run completes with one
    row per (video, prompt). Then a driver on the same cluster is SIGKILLed mid-run and the run started again."""
    from pipeline.sample_videos import make_moving_shapes, write_video

    cluster, workers = three_node_cluster
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(N_CLUSTER):
        write_video(videos / f"c_{i:02d}.mp4", make_moving_shapes(8, 64, 64, seed=300 + i), fps=4)
    base = ["run", "--input", str(videos), "--model", str(tiny_qwen), *FAST, "--batch-size", "1",
            "--address", cluster.address, "--decode-memory-mb", "128"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)

    def start(out, log):
        with open(log, "wb") as f:
            return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *base, "--output", str(out)], cwd=REPO,
                                    env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_parts(proc, out, log, n):
        deadline = time.monotonic() + 300
        while len(list(out.glob("part-*.parquet"))) < n:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)

    # 1. node loss
    out, log = tmp_path / "labels", tmp_path / "node-loss.log"
    driver = start(out, log)
    try:
        wait_parts(driver, out, log, 1)
        hosts = [w for w in workers if _children_named(w.all_processes["raylet"][0].process.pid, "VideoCaptioner")]
        assert len(hosts) == 1, "the model actor was not found on a worker node"
        assert driver.poll() is None and len(list(out.glob("part-*.parquet"))) < N_CLUSTER
        cluster.remove_node(hosts[0], allow_graceful=False)
        rc = driver.wait(300)
        assert rc == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    t = read_rows(str(out))
    keys = Counter(zip(t["video_id"].to_pylist(), t["prompt_id"].to_pylist()))
    assert len(keys) == N_CLUSTER and set(keys.values()) == {1}, keys
    assert set(t["status"].to_pylist()) == {"ok"}, t.select(["uri", "error_type", "error_message"]).to_pylist()

    # 2. driver killed mid-run on the (now two-node) cluster, then the run again
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    out, log = tmp_path / "labels2", tmp_path / "driver-kill.log"
    driver = start(out, log)
    try:
        wait_parts(driver, out, log, 1)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
    committed = read_rows(str(out)).num_rows
    r = run_cli(*base, "--output", str(out), env={"RAY_TMPDIR": ray_tmp}, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    t = read_rows(str(out))
    keys = Counter(zip(t["video_id"].to_pylist(), t["prompt_id"].to_pylist()))
    assert len(keys) == N_CLUSTER and set(keys.values()) == {1}, keys
    assert set(t["status"].to_pylist()) == {"ok"}
    print(f"driver killed after {committed} rows; the rerun completed the other {N_CLUSTER - committed}")


def test_plan_keeps_decode_out_of_the_model_actor_and_bounds_retries(ray_local, tmp_path, tiny_qwen, capsys):
    """compute= strategies; decode (memory reserved) is its own task operator, never fused into the actor."""
    import warnings

    from pipeline.config import RunConfig
    from pipeline.discover import VideoInput
    from pipeline.run import build_dataset, model_task_retries

    cfg = RunConfig(input=str(tmp_path), output=str(tmp_path / "o"), model=str(tiny_qwen), num_gpus_per_actor=0,
                    batch_size=4, model_retries=3, decode_memory_mb=256, decode_concurrency=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_dataset(cfg, [VideoInput(str(tmp_path / "a.mp4"), [("p", "Describe.")])], "run", "hash")
    ours = [str(w.message) for w in caught if "concurrency" in str(w.message) or "ray_remote_args" in str(w.message)]
    assert not ours  # neither the concurrency= nor the remote-args deprecation warning reaches the user
    ds.explain()
    plan = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[Map(decode_row)]" in plan
    assert "ActorPoolMapOperator[MapBatches(VideoCaptioner)]" in plan
    assert "decode_row)->MapBatches" not in plan and "Map(decode_row)->" not in plan
    ops = ds._logical_plan.dag
    model_op, decode_op = ops, ops.input_dependencies[0]
    assert decode_op.ray_remote_args.get("memory") == 256 * 1024 * 1024
    assert model_op.ray_remote_args["max_task_retries"] == model_task_retries(cfg) == 1 + 4 * 2 + 20
    assert model_op.ray_remote_args["max_restarts"] == -1
