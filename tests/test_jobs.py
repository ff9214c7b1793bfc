"""Ray jobs: `framescribe submit` against a real local Ray head (token auth on), `job status|logs`,
`jobs.incremental` over a growing input, and the lease (local flock and S3 conditional writes)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from tests.conftest import run_cli
from tests.conftest_s3 import moto_server, s3  # noqa: F401  (pytest fixtures)

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long messages at 80 columns


def _rows(out: Path) -> list[dict]:
    return pads.dataset(str(out), format="parquet").to_table().to_pylist()


def _videos(dest: Path, corpus, names=("h264", "vp9"), broken=()) -> Path:
    videos, broken_files = corpus
    dest.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(videos[n].path, dest / videos[n].path.name)
    for n in broken:
        shutil.copy(broken_files[n], dest / f"broken_{n}{broken_files[n].suffix}")
    return dest


def _config(path: Path, **kv) -> Path:
    path.write_text("".join(f"{k}: {v}\n" for k, v in kv.items()))
    return path


# --- a real Ray head, token auth on -------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` with the dashboard (job API) and token auth, in its own process group."""
    temp_dir = tempfile.mkdtemp(prefix="fs-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    token = uuid.uuid4().hex
    gcs, dash, client, agent = (_free_port() for _ in range(4))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "HF_HUB_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(
        [RAY, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
         "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp_dir}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        proc.wait(timeout=120)
        assert proc.returncode == 0, (Path(temp_dir) / "ray-start.log").read_text()[-3000:]
        import requests

        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(address + "/api/version", timeout=2).status_code in (200, 401):
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "Ray dashboard did not come up"
            time.sleep(0.5)
        yield address, token
    finally:
        # every process `ray start` spawned is in the process group it led (start_new_session)
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            end = time.monotonic() + grace
            while time.monotonic() < end:
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_submit_wait_labels_on_a_ray_cluster_with_token_auth(ray_head, tmp_path, tiny_qwen, corpus):
    address, token = ray_head
    home = tmp_path / "home"
    home.mkdir()
    inputs = _videos(tmp_path / "videos", corpus, broken=("text",))
    out = tmp_path / "labels"
    cfg = _config(tmp_path / "run.yaml", input=inputs, output=out, model=tiny_qwen, max_new_tokens=4,
                  num_frames=4, pruner="iwp", retention=0.5)
    no_token = {"HOME": str(home), "RAY_AUTH_TOKEN": "", "RAY_AUTH_TOKEN_PATH": "", "RAY_AUTH_MODE": "disabled"}
    with_token = {**no_token, "RAY_AUTH_TOKEN": token}

    # token auth on, no token here: exit 2 and the message says what to set
    r = run_cli("submit", "--address", address, "--config", str(cfg), env=no_token)
    assert r.returncode == 2, r.stderr[-2000:]
    msg = _flat(r.stderr)
    assert "requires token authentication" in msg and "RAY_AUTH_TOKEN" in msg and address in msg

    # a job whose config only fails on the cluster (input missing there): its exit code comes back
    bad = run_cli("submit", "--address", address, "--config", str(cfg), "--input", str(tmp_path / "nowhere"),
                  env=with_token)
    assert bad.returncode == 0, bad.stderr[-2000:]
    bad_id = bad.stdout.strip().splitlines()[-1]

    r = run_cli("submit", "--address", address, "--config", str(cfg), "--wait", env=with_token)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    job_id = r.stdout.strip().splitlines()[-1]
    assert "SUCCEEDED" in r.stderr

    rows = _rows(out)
    assert len(rows) == 3 and len({row["run_id"] for row in rows}) == 1
    assert sorted(row["status"] for row in rows) == ["error", "ok", "ok"]
    assert all(row["pruner"] == "iwp" and row["retention"] == 0.5 for row in rows)

    st = run_cli("job", "status", job_id, "--address", address, env=with_token)
    assert st.returncode == 0 and st.stdout.strip() == "SUCCEEDED", st.stderr
    logs = run_cli("job", "logs", job_id, "--address", address, env=with_token)
    assert logs.returncode == 0 and "rows written" in logs.stdout
    waited = run_cli("job", "status", bad_id, "--address", address, "--wait", env=with_token)
    assert waited.returncode == 2 and waited.stdout.strip() == "FAILED", waited.stdout + waited.stderr
    assert "does not exist" in _flat(waited.stderr)


def test_submit_unreachable_address_exits_2_naming_it(tmp_path):
    cfg = _config(tmp_path / "run.yaml", input="/data/videos", output="/data/labels", model="/models/m")
    address = f"http://127.0.0.1:{_free_port()}"
    r = run_cli("submit", "--address", address, "--config", str(cfg))
    assert r.returncode == 2
    msg = _flat(r.stderr)
    assert f"cannot reach the Ray job API at {address}" in msg and "Connection refused" in msg
    assert "Traceback" not in r.stderr


def test_submit_checks_config_before_contacting_the_cluster(tmp_path):
    address = f"http://127.0.0.1:{_free_port()}"
    cfg = _config(tmp_path / "run.yaml", input="/data/videos", output="/data/labels", model="/models/m")
    r = run_cli("submit", "--address", address, "--config", str(cfg), "--retention", "0.5")
    assert r.returncode == 2 and "retention < 1 needs a pruner" in _flat(r.stderr)
    assert "cannot reach" not in r.stderr
    rel = _config(tmp_path / "rel.yaml", input="videos", output="/data/labels", model="/models/m")
    r = run_cli("submit", "--address", address, "--config", str(rel))
    assert r.returncode == 2 and "relative local path" in _flat(r.stderr)
    r = run_cli("submit", "--address", address, "--config", str(cfg), "--env-from-local", "FRAMESCRIBE_UNSET_VAR_X")
    assert r.returncode == 2 and "FRAMESCRIBE_UNSET_VAR_X is not set" in _flat(r.stderr)
    r = run_cli("submit", "--address", address, "--config", str(cfg), "--incremental", "--overwrite")
    assert r.returncode == 2 and "never overwrites" in _flat(r.stderr)


def test_staged_working_dir_is_source_only_with_the_config(tmp_path):
    from pipeline.config import RunConfig
    from pipeline.submit import SHIPPED_CONFIG, config_yaml, stage_working_dir

    cfg = RunConfig(input="s3://b/v", output="s3://b/o", model="/m", address="ray://x:10001", pruner="iwp",
                    retention=0.5)
    d = stage_working_dir(config_yaml(cfg), tmp_path / "wd")
    assert sorted(p.name for p in d.iterdir()) == sorted(["actors", "iwp", "jobs", "pipeline", SHIPPED_CONFIG])
    assert (d / "jobs" / "label.py").is_file() and not list(d.rglob("__pycache__"))
    shipped = (d / SHIPPED_CONFIG).read_text()
    assert "address" not in shipped
    from pipeline.config import load_config

    assert load_config(d / SHIPPED_CONFIG).labeling_hash() == cfg.labeling_hash()


# --- incremental labeling ------------------------------------------------------------------------

def _incremental(*args: str) -> int:
    from jobs.incremental import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code or 0


def _state(out: Path) -> dict:
    return json.loads((out / "_framescribe" / "incremental-state.json").read_text())


def _plant_lease(out: Path, owner: str, expires_in: float) -> None:
    from pipeline.lease import LeaseInfo

    now = time.time()
    (out / "_framescribe").mkdir(parents=True, exist_ok=True)
    (out / "_framescribe" / "lease.json").write_bytes(
        LeaseInfo(owner=owner, expires_at=now + expires_in, acquired_at=now - 60, renewed_at=now - 60).to_json())


@pytest.mark.slow
def test_incremental_labels_only_new_videos_and_takes_over_an_expired_lease(ray_local, tmp_path, tiny_qwen,
                                                                            corpus):
    inputs = _videos(tmp_path / "videos", corpus, names=("h264", "vp9"))
    out = tmp_path / "labels"
    cfg = _config(tmp_path / "run.yaml", input=inputs, output=out, model=tiny_qwen, max_new_tokens=4, num_frames=4)

    assert _incremental("--config", str(cfg)) == 0
    first = _rows(out)
    assert len(first) == 2
    run1 = first[0]["run_id"]
    assert _state(out)["last_run"]["new"] == 2 and _state(out)["last_run"]["skipped"] == 0

    _videos(inputs, corpus, names=("mpeg4_avi",))                 # the input grows
    _plant_lease(out, "crashed-run", expires_in=-5)               # a dead run's lease, expired
    assert _incremental("--config", str(cfg)) == 0
    rows = _rows(out)
    by_run: dict[str, int] = {}
    for row in rows:
        by_run[row["run_id"]] = by_run.get(row["run_id"], 0) + 1
    assert len(rows) == 3 and by_run[run1] == 2 and sorted(by_run.values()) == [1, 2]
    run2 = next(k for k in by_run if k != run1)
    state = _state(out)
    assert state["last_run"]["run_id"] == run2
    assert (state["last_run"]["new"], state["last_run"]["skipped"], state["last_run"]["errors"]) == (1, 2, 0)
    assert [r["run_id"] for r in state["runs"]] == [run1, run2] and state["totals"] == {"runs": 2, "new": 3}
    lease = json.loads((out / "_framescribe" / "lease.json").read_text())
    assert lease["owner"] != "crashed-run" and lease["released"]   # taken over, then released


def test_incremental_exits_0_while_another_run_holds_the_lease(tmp_path, tiny_qwen, corpus):
    inputs = _videos(tmp_path / "videos", corpus, names=("h264",))
    out = tmp_path / "labels"
    cfg = _config(tmp_path / "run.yaml", input=inputs, output=out, model=tiny_qwen)
    _plant_lease(out, "other-run", expires_in=600)
    r = subprocess.run([sys.executable, "-m", "jobs.incremental", "--config", str(cfg)], cwd=Path(__file__).parents[1],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    msg = _flat(r.stderr)
    assert "another run holds the output's lease: owner other-run" in msg and "exiting 0" in msg
    assert not list(out.glob("*.parquet")) and not (out / "_framescribe" / "incremental-state.json").exists()
    # --wait-lease waits, then gives up after --wait-timeout (still exit 0, still nothing written)
    t0 = time.monotonic()
    assert _incremental("--config", str(cfg), "--wait-lease", "--wait-timeout", "1.5") == 0
    assert 1.0 <= time.monotonic() - t0 < 30 and not list(out.glob("*.parquet"))


def test_incremental_rejects_overwrite(tmp_path):
    cfg = _config(tmp_path / "run.yaml", input=tmp_path, output=tmp_path / "o", model="/m", overwrite="true")
    assert _incremental("--config", str(cfg)) == 2


# --- the lease itself ---------------------------------------------------------------------------

class _Clock:
    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self):
        return self.t


def test_lease_local_exclusive_renew_expire_release(tmp_path):
    from pipeline.lease import Lease

    clock = _Clock()
    a = Lease(str(tmp_path), ttl_s=60, owner="a", clock=clock)
    b = Lease(str(tmp_path), ttl_s=60, owner="b", clock=clock)
    assert a.acquire() and not b.acquire() and b.holder.owner == "a"
    clock.t += 50
    assert a.renew() and not b.acquire()           # renewed: good for another 60 s
    clock.t += 61
    assert b.acquire() and b.holder.owner == "b"   # expired: taken over
    assert not a.renew() and not a.release()       # a lost it and cannot touch b's lease
    assert b.release() and a.acquire()             # released: free at once
    # many contenders at the same moment: exactly one wins
    out = tmp_path / "race"
    wins = []
    barrier = threading.Barrier(8)

    def contend(i):
        lease = Lease(str(out), ttl_s=60, owner=f"c{i}")
        barrier.wait()
        if lease.acquire():
            wins.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1


def test_lease_on_s3_uses_conditional_writes(s3):
    from pipeline.lease import Lease

    bucket = s3.new_bucket()
    clock = _Clock()
    kw = dict(ttl_s=60, settle_s=0, clock=clock)   # settle 0: only the conditional headers can refuse
    a, b, c = (Lease(f"s3://{bucket}/out", owner=o, **kw) for o in "abc")
    assert a.kind == "s3"
    assert a.acquire() and not b.acquire() and b.holder.owner == "a"
    clock.t += 61
    stale = b._read()                              # b and c both see a's expired lease (same ETag)
    assert b.acquire()
    real_read = c._read

    def read_once(seen):
        first = iter([seen])
        return lambda: next(first, None) or real_read()

    c._read = read_once(stale)                     # c decides on what it read before b wrote ...
    assert not c.acquire() and c.holder.owner == "b"   # ... and If-Match rejects its takeover
    c._read = read_once((None, None, False))       # a create-if-absent against an existing lease ...
    assert not c.acquire() and c.holder.owner == "b"   # ... If-None-Match: * rejects it
    del c._read
    assert b.release() and c.acquire() and c.read().owner == "c"
