"""Object storage over the wire: a real S3-protocol server (moto_server) for input listing, manifests,
decode, Parquet output, s3:// models, fail-fast checks, and no credential leaks."""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, RunConfig
from tests.conftest import run_cli
from tests.conftest_s3 import ACCESS_KEY, SECRET_KEY, moto_server, s3  # noqa: F401  (pytest fixtures)

ARGS = ("--num-frames", "4", "--max-new-tokens", "3", "--batch-size", "2")


@pytest.fixture
def bucket_with_videos(s3, corpus):
    """A bucket with three good videos, a broken file and a non-video file under videos/."""
    videos, broken = corpus
    b = s3.new_bucket()
    for case in ("h264", "vp9", "odd_98x62"):
        s3.upload(videos[case].path, b, f"videos/{videos[case].path.name}")
    s3.upload(broken["text"], b, "videos/sub/broken_text.mp4")
    s3.client().put_object(Bucket=b, Key="videos/notes.txt", Body=b"not listed: not a video suffix")
    return b


def test_discover_lists_prefix_and_reads_manifest_from_s3(s3, bucket_with_videos, corpus):
    from pipeline.discover import discover_inputs

    b = bucket_with_videos
    cfg = RunConfig(input=f"s3://{b}/videos", output=f"s3://{b}/out", model="m")
    uris = [v.uri for v in discover_inputs(cfg)]
    assert uris == sorted(uris) and len(uris) == 4
    assert all(u.startswith(f"s3://{b}/videos/") for u in uris)
    assert f"s3://{b}/videos/sub/broken_text.mp4" in uris and not any(u.endswith(".txt") for u in uris)
    assert [v.uri for v in discover_inputs(cfg.model_copy(update={"input": f"s3://{b}/videos/"}))] == uris

    s3.client().put_object(Bucket=b, Key="lists/m.jsonl", Body="\n".join(json.dumps(x) for x in [
        {"uri": "../videos/" + corpus[0]["h264"].path.name},           # relative to the manifest
        {"uri": f"s3://{b}/videos/missing.mp4", "prompt": "What is shown?"},
    ]).encode())
    got = discover_inputs(cfg.model_copy(update={"input": f"s3://{b}/lists/m.jsonl"}))
    assert [v.uri for v in got] == [f"s3://{b}/lists/../videos/{corpus[0]['h264'].path.name}",
                                    f"s3://{b}/videos/missing.mp4"]
    assert got[1].prompts[0][1] == "What is shown?"


def _restart_decode_children() -> None:
    """Decode child processes come from multiprocessing's forkserver, which keeps the environment it was
    started with; an earlier test may have started it before this test set the AWS variables. (A Ray
    worker's environment is fixed when it starts, so the pipeline itself does not meet this.)"""
    import multiprocessing.forkserver as mpf

    from pipeline.decode import shutdown_decode_pool

    shutdown_decode_pool()
    stop = getattr(getattr(mpf, "_forkserver", None), "_stop", None)
    if stop is not None:
        stop()


def test_decode_from_bucket_matches_local_decode(s3, bucket_with_videos, corpus, monkeypatch, request):
    """s3fs objects reach decord as a file-like object (one read of the whole object), or above
    IN_MEMORY_MAX_BYTES through a temporary file; both give the frames a local decode gives."""
    import pipeline.decode as decode
    from pipeline.decode import DecodeError, SamplingSpec, decode_video
    from pipeline.storage import get_fs

    _restart_decode_children()
    request.addfinalizer(_restart_decode_children)  # later tests get children without this test's AWS env

    case = corpus[0]["vp9"]
    uri = f"s3://{bucket_with_videos}/videos/{case.path.name}"
    spec = SamplingSpec(num_frames=5, max_pixels=64 * 64)
    local = decode_video(str(case.path), spec)
    fs, _ = get_fs(uri)
    in_child = decode_video(uri, spec, filesystem=fs, timeout_s=60)  # the pipeline's way: child process
    assert np.array_equal(in_child.frames, local.frames) and in_child.timestamps == local.timestamps

    reads = []
    real_open = type(fs).open

    def spy_open(self, path, mode="rb", **kw):
        f = real_open(self, path, mode, **kw)
        real_read = f.read
        f.read = lambda *a: reads.append(a) or real_read(*a)
        return f

    monkeypatch.setattr(type(fs), "open", spy_open)
    in_proc = decode_video(uri, spec, filesystem=fs)
    assert np.array_equal(in_proc.frames, local.frames)
    assert reads == [()]  # decord reads the object once, whole (a single GET), not with seeks
    monkeypatch.setattr(decode, "IN_MEMORY_MAX_BYTES", 1)  # big objects: streamed to a temp file
    before = set(os.listdir(tempfile.gettempdir()))
    via_tmp = decode_video(uri, spec, filesystem=fs)
    assert np.array_equal(via_tmp.frames, local.frames)
    assert not {p for p in set(os.listdir(tempfile.gettempdir())) - before if p.startswith("framescribe-")}
    with pytest.raises(DecodeError) as e:
        decode_video(f"s3://{bucket_with_videos}/videos/missing.mp4", spec, filesystem=fs)
    assert e.value.error_type == "not_found"


def test_parquet_parts_on_s3_read_back_by_pyarrow_and_boto3_and_compacted(s3):
    from datetime import datetime, timezone

    from pipeline.output import compact_duplicates, conform, read_rows, write_part

    b = s3.new_bucket()
    out = f"s3://{b}/labels/run1"
    now = datetime.now(timezone.utc)
    rows = [{"video_id": f"v{i}", "prompt_id": "p", "labeling_hash": "h", "uri": f"s3://{b}/v{i}.mp4",
             "status": "ok" if i else "error", "text": f"caption {i}", "created_at": now} for i in range(3)]
    write_part(conform(pa.Table.from_pylist(rows)), out)
    write_part(conform(pa.Table.from_pylist([{**rows[0], "status": "ok", "text": "retried"}])), out)
    objects = s3.objects(b, "labels/run1/")
    assert len(objects) == 2 and all(k.rsplit("/", 1)[-1].startswith("part-") for k in objects)
    independent = pa.concat_tables([pq.read_table(io.BytesIO(v)) for v in objects.values()])
    assert independent.num_rows == 4 == read_rows(out).num_rows

    # another process (a Ray worker) commits a part after this one listed the prefix: it is seen
    s3.client().put_object(Bucket=b, Key=f"labels/run1/part-{'e' * 24}.parquet",
                           Body=next(v for k, v in objects.items() if k.endswith(".parquet")))
    assert read_rows(out).num_rows == 4 + pq.read_table(io.BytesIO(next(iter(objects.values())))).num_rows
    rep = compact_duplicates(out)
    assert rep.duplicates_removed == 1 + pq.read_table(io.BytesIO(next(iter(objects.values())))).num_rows
    objects = s3.objects(b, "labels/run1/")
    assert not [k for k in objects if "_tmp-" in k]
    back = pa.concat_tables([pq.read_table(io.BytesIO(v)) for v in objects.values()]).to_pylist()
    assert sorted((r["video_id"], r["status"], r["text"]) for r in back) == [
        ("v0", "ok", "retried"), ("v1", "ok", "caption 1"), ("v2", "ok", "caption 2")]
    assert sorted(read_rows(out).column("video_id").to_pylist()) == ["v0", "v1", "v2"]


def test_model_from_s3_is_fetched_once_per_node_atomically(s3, tiny_qwen, tmp_path, monkeypatch):
    import fsspec

    from actors import loading

    b = s3.new_bucket()
    uri = s3.upload_dir(tiny_qwen, b, "models/tiny")
    monkeypatch.setenv("FRAMESCRIBE_CACHE", str(tmp_path / "cache"))
    loading.check_model_available(uri, storage_options={})
    got, errors = [], []

    def fetch():
        try:
            got.append(loading.fetch_model_dir(uri + "/"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(4)]  # actors on one node start together
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(got)) == 1
    dest = got[0]
    models = tmp_path / "cache" / "models"
    assert [p.name for p in models.iterdir()] == [dest.name]  # no .partial-* left behind
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in Path(tiny_qwen).iterdir())
    assert (dest / "config.json").read_bytes() == (Path(tiny_qwen) / "config.json").read_bytes()

    with pytest.raises(loading.ModelLoadError, match="no config.json"):
        loading.check_model_available(f"s3://{b}/models/none", storage_options={})

    def no_network(*a, **kw):
        raise AssertionError("a cached model must not be fetched again")

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_network)
    assert loading.fetch_model_dir(uri) == dest


def test_unknown_bucket_and_bad_credentials_fail_fast_naming_the_field(s3, bucket_with_videos, tiny_qwen,
                                                                       tmp_path, capsys):
    import ray

    from pipeline.cli import execute

    ray_was_up = ray.is_initialized()  # another test module may have started the in-process Ray already

    b = bucket_with_videos
    base = dict(input=f"s3://{b}/videos", output=f"s3://{b}/out", model=str(tiny_qwen))
    cases = [
        (dict(input="s3://no-such-bucket-fs/videos"), "input: bucket 'no-such-bucket-fs'", "does not exist"),
        (dict(output="s3://no-such-bucket-out/labels"), "output: bucket 'no-such-bucket-out'", "does not create"),
        (dict(model="s3://no-such-bucket-model/m"), "model: bucket 'no-such-bucket-model'", "does not exist"),
        (dict(input=f"s3://{b}/nothing-here"), "input:", "does not exist"),
    ]
    for override, field_msg, reason in cases:
        assert execute(RunConfig(**{**base, **override})) == 2
        err = capsys.readouterr().err.replace("\n", "")
        assert field_msg in err and reason in err, err
    buckets = {x["Name"] for x in s3.client().list_buckets()["Buckets"]}
    assert "no-such-bucket-out" not in buckets  # an output bucket is never created
    assert not s3.objects(b, "out/")            # nothing written, not even the write probe

    s3.set_auth(True)  # every key is unknown now: 403 on every request
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        assert execute(RunConfig(**base)) == 2
        err = capsys.readouterr().err.replace("\n", "")
        assert "input: access to" in err and "denied" in err and "AWS_ACCESS_KEY_ID" in err, err
        assert SECRET_KEY not in err
        r = run_cli("run", "--input", base["input"], "--output", base["output"], "--model", base["model"],
                    timeout=120)  # the real entry point: exit code 2, before any Ray work
        assert r.returncode == 2, r.stderr[-2000:]
        assert "input: access to" in r.stderr.replace("\n", "") and SECRET_KEY not in r.stdout + r.stderr
        assert "Started a local Ray instance" not in r.stdout + r.stderr
    finally:
        s3.set_auth(False)
    assert ray.is_initialized() == ray_was_up  # failing fast never starts Ray


def _assert_no_secret_under(root: Path, *secrets: str) -> None:
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            for s in secrets:
                assert s.encode() not in data, f"{s!r} found in {p}"


@pytest.mark.slow
def test_cli_s3_in_and_out_with_s3_model_manifest_resume_and_no_leaks(s3, bucket_with_videos, corpus, tiny_qwen,
                                                                      tmp_path):
    b = bucket_with_videos
    model = s3.upload_dir(tiny_qwen, b, "models/tiny-qwen")
    names = sorted(k.split("videos/", 1)[1] for k in s3.objects(b, "videos/") if not k.endswith(".txt"))
    s3.client().put_object(Bucket=b, Key="manifest.txt", Body="\n".join(  # one URI twice: still one row
        [f"s3://{b}/videos/{n}" for n in names] + [f"s3://{b}/videos/gone.mp4", f"s3://{b}/videos/{names[0]}"]
    ).encode())
    ray_tmp = Path(tempfile.mkdtemp(prefix="fsr", dir="/tmp"))  # short: Ray's socket paths have a limit
    cache = tmp_path / "cache"
    env = {"RAY_TMPDIR": str(ray_tmp), "FRAMESCRIBE_CACHE": str(cache)}
    out = f"s3://{b}/labels"
    try:
        r = run_cli("run", "--input", f"s3://{b}/manifest.txt", "--output", out, "--model", model, *ARGS, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        objects = s3.objects(b, "labels/")
        parts = {k: v for k, v in objects.items() if k.endswith(".parquet")}
        rows = pa.concat_tables([pq.read_table(io.BytesIO(v)) for v in parts.values()]).to_pylist()
        assert len(rows) == len(names) + 1                       # one row per video, the missing one too
        by = {row["uri"].rsplit("/", 1)[-1]: row for row in rows}
        assert by["gone.mp4"]["status"] == "error" and by["gone.mp4"]["error_type"] == "not_found"
        assert by["broken_text.mp4"]["error_type"] == "not_a_video"
        good = [n.rsplit("/", 1)[-1] for n in names if "broken" not in n]
        assert all(by[n]["status"] == "ok" and by[n]["frames_sampled"] == 4 for n in good), rows
        assert {row["model"] for row in rows} == {model}
        from pipeline.output import read_rows

        assert read_rows(out).num_rows == len(rows)             # pyarrow over s3fs agrees with boto3
        # the model was fetched once into this node's cache, completely
        fetched = list((cache / "models").iterdir())
        assert len(fetched) == 1 and (fetched[0] / "config.json").is_file()
        # no credentials (nor the endpoint) in rows, state json, CLI output or Ray's logs
        state = [json.loads(v) for k, v in objects.items() if "/_framescribe/" in k and k.endswith(".json")]
        assert len(state) == 1 and state[0]["rows"] == len(rows) == state[0]["videos_total"]
        assert state[0]["videos_skipped"] == 0 and state[0]["duplicates_removed"] == 0
        endpoint = s3.endpoint.split("//", 1)[1]
        for blob in [*objects.values(), r.stdout.encode(), r.stderr.encode()]:
            assert SECRET_KEY.encode() not in blob and ACCESS_KEY.encode() not in blob
        for blob in [*parts.values(), *(v for k, v in objects.items() if k.endswith(".json"))]:
            assert endpoint.encode() not in blob
        _assert_no_secret_under(ray_tmp, SECRET_KEY, ACCESS_KEY)

        # the same videos found by listing the prefix: all labeled already, nothing written, no Ray
        r2 = run_cli("run", "--input", f"s3://{b}/videos/", "--output", out, "--model", model, *ARGS, env=env)
        assert r2.returncode == 0, r2.stderr[-3000:]
        assert "nothing to do" in r2.stdout and f"{len(names)} already labeled" in r2.stdout
        assert "Started a local Ray instance" not in r2.stdout + r2.stderr
        after = s3.objects(b, "labels/")
        new = {k: v for k, v in after.items() if k not in objects}
        assert len(new) == 1 and "/_framescribe/" in next(iter(new))   # only the second run's state file
        state2 = json.loads(next(iter(new.values())))
        assert state2["rows"] == 0 and state2["videos_skipped"] == len(names) == state2["videos_total"]
        assert {k: v for k, v in after.items() if k.endswith(".parquet")} == parts
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
