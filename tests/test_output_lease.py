"""One writer per output: every run holds OUT/_framescribe/lease.json while it writes or compacts.

Two real `framescribe run` processes race for one output (local disk and the S3-protocol server): one
labels, the other waits and then finds nothing to do; a run that does not wait exits 4 naming the
holder. A holder killed with SIGKILL is taken over at once on its own host and after expiry elsewhere;
a retry of the same run (same owner id) reclaims its own lease; every exit path releases it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from tests.conftest import REPO
from tests.conftest_s3 import moto_server, s3  # noqa: F401  (pytest fixtures)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _holder(output: str, *, ttl: float, host: str | None = None, owner: str | None = None,
            env: dict | None = None) -> subprocess.Popen:
    """A separate process that takes the output's lease, says so, and sleeps (until killed)."""
    code = textwrap.dedent(f"""
        import socket, sys, time
        if {host!r}:
            socket.gethostname = lambda: {host!r}   # as if it ran on another machine
        from pipeline.lease import hold_output_lease
        with hold_output_lease({output!r}, ttl_s={ttl}, owner={owner!r}, log=lambda m: None, settle_s=0):
            print("held", flush=True)
            time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **(env or {})},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held", p.stderr.read()
    return p


def _kill(p: subprocess.Popen, sig=signal.SIGKILL) -> None:
    p.send_signal(sig)
    p.wait(timeout=30)  # reaped: its pid is gone


def _videos(dest: Path, corpus, names=("h264", "vp9", "mpeg4_avi")) -> Path:
    videos, _ = corpus
    dest.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(videos[n].path, dest / videos[n].path.name)
    return dest


# --- two real runs on one output ------------------------------------------------------------------

def _race(inputs: str, output: str, model: Path, tmp_path: Path, env: dict | None = None, s3_endpoint=None):
    """Hold the lease here, start two waiting runs, release: they race for it for real."""
    from pipeline.lease import hold_output_lease

    args = ["run", "--input", inputs, "--output", output, "--model", str(model), "--max-new-tokens", "4",
            "--num-frames", "4", "--lease-ttl", "20"]
    with hold_output_lease(output, ttl_s=20, owner="test-holder", s3_endpoint=s3_endpoint, log=lambda m: None,
                           settle_s=0):
        # a run that does not wait: exit 4 before any Ray work, naming the holder
        busy = _cli(*args, env=env)
        out, err = busy.communicate(timeout=300)
        assert busy.returncode == 4, err[-3000:]
        msg = _flat(err)
        assert "another run holds the output's lease: owner test-holder" in msg and f"pid {os.getpid()}" in msg
        runs = [_cli(*args, "--wait-lease", env=env) for _ in range(2)]
        deadline = time.monotonic() + 120  # both are waiting before the lease is let go
        for i in range(2):
            while "waiting for the output's lease" not in (line := runs[i].stderr.readline()):
                assert line and time.monotonic() < deadline, f"run {i} is not waiting"
    results = [(r.wait(timeout=600), r.stdout.read(), line + r.stderr.read()) for r in runs]
    for code, out, err in results:
        said = [ln for ln in err.splitlines() if "lease" in ln or "error" in ln.lower()][:20]
        assert code == 0, "\n".join(said) + "\n...\n" + err[-3000:]
    return results


def _check_one_writer(rows: list[dict], results) -> None:
    keys = [(r["video_id"], r["prompt_id"]) for r in rows]
    assert len(keys) == len(set(keys)) == 3                       # one row per (video, prompt)
    assert len({r["run_id"] for r in rows}) == 1                  # written by one of the two runs
    outs = [_flat(out) for _, out, _ in results]
    wrote = [re.search(r"rows written\W+(\d+)", o) for o in outs]
    assert sorted(int(m.group(1)) for m in wrote) == [0, 3], outs   # the winner labeled, the other found it done
    assert sum("nothing to do" in o for o in outs) == 1, outs


@pytest.mark.slow
def test_two_runs_on_one_local_output_one_labels_the_other_waits(tmp_path, tiny_qwen, corpus):
    inputs = _videos(tmp_path / "videos", corpus)
    out = tmp_path / "labels"
    results = _race(str(inputs), str(out), tiny_qwen, tmp_path)
    parts = sorted(out.glob("*.parquet"))
    _check_one_writer(pads.dataset([str(p) for p in parts], format="parquet").to_table().to_pylist(), results)
    lease = json.loads((out / "_framescribe" / "lease.json").read_text())
    assert lease["released"] and lease["owner"] != "test-holder"
    assert len(list((out / "_framescribe").glob("run-*.json"))) == 2   # both ran to the end


@pytest.mark.slow
def test_two_runs_on_one_s3_output_one_labels_the_other_waits(s3, tmp_path, tiny_qwen, corpus):
    import pyarrow.fs as pafs

    bucket = s3.new_bucket()
    inputs = s3.upload_dir(_videos(tmp_path / "videos", corpus), bucket, "videos")
    output = f"s3://{bucket}/labels"
    results = _race(inputs, output, tiny_qwen, tmp_path, env=s3.env, s3_endpoint=s3.endpoint)
    parts = [k for k in s3.objects(bucket, "labels/") if k.endswith(".parquet")]
    assert len(parts) == len(set(parts)) >= 1
    fs = pafs.S3FileSystem(endpoint_override=s3.endpoint, access_key=s3.env["AWS_ACCESS_KEY_ID"],
                           secret_key=s3.env["AWS_SECRET_ACCESS_KEY"], region="us-east-1")
    table = pads.dataset([f"{bucket}/{k}" for k in parts], format="parquet", filesystem=fs).to_table()
    _check_one_writer(table.to_pylist(), results)
    lease = json.loads(s3.objects(bucket, "labels/_framescribe/lease.json")["labels/_framescribe/lease.json"])
    assert lease["released"] and lease["owner"] != "test-holder"


# --- crashed, retried and interrupted holders ---------------------------------------------------

@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out"), None, {}
    s3 = request.getfixturevalue("s3")
    return f"s3://{s3.new_bucket()}/out", s3.endpoint, s3.env


def test_holder_killed_on_this_host_is_taken_over_at_once(output):
    from pipeline.lease import Lease, hold_output_lease

    out, endpoint, env = output
    holder = _holder(out, ttl=600, env=env)
    assert not Lease(out, ttl_s=60, s3_endpoint=endpoint, settle_s=0).acquire()   # alive: refused
    _kill(holder)
    t0 = time.monotonic()
    with hold_output_lease(out, ttl_s=60, s3_endpoint=endpoint, log=lambda m: None, settle_s=0) as lease:
        assert lease.read().owner == lease.owner
    assert time.monotonic() - t0 < 10   # not the 600 s of its TTL


def test_holder_killed_on_another_host_is_taken_over_after_expiry(output):
    from pipeline.lease import LeaseHeld, hold_output_lease

    out, endpoint, env = output
    holder = _holder(out, ttl=4, host="node-b", env=env)
    _kill(holder)
    killed = time.time()
    with pytest.raises(LeaseHeld) as e:
        with hold_output_lease(out, ttl_s=60, s3_endpoint=endpoint, log=lambda m: None, settle_s=0):
            pass
    assert "host node-b" in str(e.value) and f"pid {holder.pid}" in str(e.value)
    expires = e.value.holder.expires_at
    waits: list[str] = []
    with hold_output_lease(out, ttl_s=60, s3_endpoint=endpoint, wait=True, wait_timeout_s=30, log=waits.append,
                           settle_s=0) as lease:
        assert time.time() >= expires and lease.read().owner == lease.owner
    assert any("waiting for the output's lease" in w for w in waits) and time.time() - killed < 30


def test_a_retry_of_the_same_run_reclaims_its_own_lease(output, monkeypatch):
    from pipeline.lease import OWNER_ENV, LeaseHeld, hold_output_lease, lease_owner

    out, endpoint, env = output
    holder = _holder(out, ttl=600, host="node-b", owner="rayjob/framescribe-label", env=env)
    _kill(holder)   # the attempt died with its node; the RayJob retries on a fresh cluster
    with pytest.raises(LeaseHeld):   # another run: still refused
        with hold_output_lease(out, s3_endpoint=endpoint, log=lambda m: None, settle_s=0):
            pass
    monkeypatch.setenv(OWNER_ENV, "rayjob/framescribe-label")
    with hold_output_lease(out, owner=lease_owner(), s3_endpoint=endpoint, log=lambda m: None, settle_s=0) as lease:
        assert lease.owner == "rayjob/framescribe-label"
    monkeypatch.delenv(OWNER_ENV)
    assert lease_owner("r1") == "run:r1" and lease_owner() is None


@pytest.mark.parametrize("how", ["exception", "sigterm"])
def test_lease_is_released_on_every_exit_path(tmp_path, how):
    from pipeline.lease import Lease, hold_output_lease

    out = str(tmp_path / "out")
    if how == "exception":
        with pytest.raises(RuntimeError):
            with hold_output_lease(out, log=lambda m: None):
                raise RuntimeError("boom")
    else:   # pod eviction / `ray job stop`: SIGTERM
        _kill(_holder(out, ttl=600), signal.SIGTERM)
    info = Lease(out).read()
    assert info.released and info.expired(time.time())


def test_a_lost_lease_stops_the_run(tmp_path):
    from pipeline.lease import LeaseInfo, LeaseLost, hold_output_lease

    out = tmp_path / "out"
    # the lost lease interrupts the main thread with SIGINT: start from Python's own handler, unblocked, whatever
    # an earlier test in this process left behind (a full-suite run saw the interrupt never arrive)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        _lose_the_lease_while_holding_it(out, LeaseInfo, LeaseLost, hold_output_lease)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    assert json.loads((out / "_framescribe" / "lease.json").read_text())["owner"] == "thief"   # not released by us


def _lose_the_lease_while_holding_it(out, LeaseInfo, LeaseLost, hold_output_lease):
    with pytest.raises(LeaseLost, match="taken over"):
        with hold_output_lease(str(out), ttl_s=1.5, log=lambda m: None):
            # another run took it over (e.g. this one was paused past its TTL). This write skips the lease's
            # file lock, so a renewal already past its read can overwrite it once: the thief writes again.
            for _ in range(50):
                now = time.time()
                (out / "_framescribe" / "lease.json").write_bytes(
                    LeaseInfo(owner="thief", expires_at=now + 600, acquired_at=now, renewed_at=now).to_json())
                time.sleep(0.2)


def test_a_hub_branch_is_pinned_to_its_commit(tmp_path, monkeypatch):
    """A revision given as a branch resolves to the commit it points to (offline, from a hub cache)."""
    from actors.loading import resolve_revision
    from pipeline.config import RunConfig

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-vl"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "snapshots" / sha / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert resolve_revision("acme/tiny-vl", "main") == sha
    assert resolve_revision("acme/tiny-vl", None) == sha
    assert resolve_revision("acme/tiny-vl", sha) == sha
    (tmp_path / "local-model").mkdir()
    (tmp_path / "local-model" / "config.json").write_text("{}")
    assert resolve_revision(str(tmp_path / "local-model"), "main") == "main"   # a local directory: nothing to pin
    base = dict(input="/v", output="/o", model="acme/tiny-vl")
    assert RunConfig(**base, model_revision="main").labeling_hash() != RunConfig(**base, model_revision=sha).labeling_hash()
    # the head's init container fills the cache the same way (here from the offline cache: the same commit)
    from jobs.fetch_model import main as fetch_main

    cfg = tmp_path / "run.yaml"
    cfg.write_text("input: /v\noutput: /o\nmodel: acme/tiny-vl\nmodel_revision: main\n")
    with pytest.raises(SystemExit) as e:
        fetch_main(["--config", str(cfg)])
    assert (e.value.code or 0) == 0


def test_fetch_model_copies_an_s3_model_into_the_shared_cache_once(s3, tiny_qwen, tmp_path, monkeypatch, capsys):
    from actors.loading import fetch_model_dir
    from jobs.fetch_model import main as fetch_main

    bucket = s3.new_bucket()
    uri = s3.upload_dir(tiny_qwen, bucket, "models/tiny")
    monkeypatch.setenv("FRAMESCRIBE_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"input: /v\noutput: /o\nmodel: {uri}\n")
    with pytest.raises(SystemExit) as e:
        fetch_main(["--config", str(cfg)])
    assert (e.value.code or 0) == 0
    cached = fetch_model_dir(uri)   # what a model actor resolves: already there, no copy
    assert str(cached) in capsys.readouterr().out and (cached / "config.json").is_file()
    assert cached.is_relative_to(tmp_path / "cache")


def test_a_dead_or_zombie_holder_on_this_host_counts_as_gone():
    import socket

    from pipeline.lease import LeaseInfo

    p = subprocess.Popen(["sleep", "60"])
    info = LeaseInfo(owner="x", expires_at=time.time() + 600, acquired_at=0, renewed_at=0,
                     host=socket.gethostname(), pid=p.pid)
    assert not info.process_gone()
    p.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not info.process_gone():   # killed, not reaped yet: a zombie
        assert time.monotonic() < deadline
        time.sleep(0.05)
    p.wait()
    assert info.process_gone()
    elsewhere = LeaseInfo(owner="x", expires_at=0, acquired_at=0, renewed_at=0, host="node-b", pid=p.pid)
    assert not elsewhere.process_gone()   # another host's pid says nothing here
