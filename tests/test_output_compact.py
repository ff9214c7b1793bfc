"""Exactly-once output: `compact_duplicates` keeps one row per key, rewrites only affected parts
atomically, and heals a compaction that was killed halfway. Local filesystem, no Ray."""
from __future__ import annotations

import os
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.output as output
from pipeline.output import OUTPUT_SCHEMA, compact_duplicates, conform, part_name, read_rows, write_part

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _rows(specs, lh="h1"):
    """specs: (video, prompt, status, minutes after T0[, text])"""
    return conform(pa.Table.from_pylist([
        {"video_id": v, "prompt_id": p, "labeling_hash": lh, "status": s, "uri": f"/v/{v}.mp4",
         "text": (spec[4] if len(spec) > 4 else (f"{v}-{p}" if s == "ok" else None)),
         "error_type": None if s == "ok" else "corrupt", "created_at": T0 + timedelta(minutes=m)}
        for spec in specs for (v, p, s, m) in [spec[:4]]]))


def _parts(d):
    return sorted(p for p in os.listdir(d) if p.endswith(".parquet"))


def _keys(d):
    t = read_rows(str(d))
    return Counter(zip(t["video_id"].to_pylist(), t["prompt_id"].to_pylist(), t["labeling_hash"].to_pylist()))


def _assert_names_deterministic(d):
    for name in _parts(d):
        assert name == part_name(pq.read_table(d / name)), name


def test_no_duplicates_is_a_no_op(tmp_path):
    write_part(_rows([("a", "p", "ok", 0), ("b", "p", "error", 0)]), str(tmp_path))
    write_part(_rows([("c", "p", "ok", 0)]), str(tmp_path))
    before = {p: (tmp_path / p).stat().st_mtime_ns for p in _parts(tmp_path)}
    rep = compact_duplicates(str(tmp_path))
    assert rep.duplicates_removed == rep.parts_rewritten == rep.parts_deleted == 0
    assert {p: (tmp_path / p).stat().st_mtime_ns for p in _parts(tmp_path)} == before
    assert compact_duplicates(str(tmp_path / "missing")).duplicates_removed == 0


def test_keeps_ok_over_error_then_newest_and_rewrites_only_affected_parts(tmp_path):
    d = str(tmp_path)
    # first run: a ok, b error, c error, d ok; separate part untouched throughout
    write_part(_rows([("a", "p", "ok", 0), ("b", "p", "error", 0)]), d)
    write_part(_rows([("c", "p", "error", 0)]), d)
    untouched = write_part(_rows([("d", "p", "ok", 0)]), d).rsplit("/", 1)[-1]
    # retry run: b now ok; c fails again (newer error); an older ok row for another labeling hash
    write_part(_rows([("b", "p", "ok", 5), ("c", "p", "error", 5, None)]), d)
    write_part(_rows([("a", "p", "error", 9)]), d)  # a newer error never beats an ok row
    write_part(_rows([("a", "p", "ok", 0)], lh="h2"), d)  # other labeling config: a different key
    rep = compact_duplicates(d)
    assert rep.duplicates_removed == 3
    keys = _keys(tmp_path)
    assert set(keys.values()) == {1} and len(keys) == 5
    t = read_rows(d).to_pylist()
    by = {(r["video_id"], r["labeling_hash"]): r for r in t}
    assert by[("a", "h1")]["status"] == "ok" and by[("a", "h1")]["created_at"] == T0
    assert by[("b", "h1")]["status"] == "ok"
    assert by[("c", "h1")]["status"] == "error" and by[("c", "h1")]["created_at"] == T0 + timedelta(minutes=5)
    assert untouched in _parts(tmp_path)
    _assert_names_deterministic(tmp_path)
    assert compact_duplicates(d).duplicates_removed == 0  # idempotent
    assert not [p for p in os.listdir(d) if p.startswith("_tmp-")]


def test_duplicate_key_inside_one_part(tmp_path):
    write_part(_rows([("a", "p", "error", 0), ("a", "p", "ok", 0), ("b", "p", "ok", 0)]), str(tmp_path))
    rep = compact_duplicates(str(tmp_path))
    assert rep.duplicates_removed == 1 and rep.parts_rewritten == 1
    assert [r["status"] for r in read_rows(str(tmp_path)).to_pylist() if r["video_id"] == "a"] == ["ok"]
    assert len(_parts(tmp_path)) == 1
    _assert_names_deterministic(tmp_path)


def test_compaction_killed_between_write_and_delete_heals(tmp_path, monkeypatch):
    d = str(tmp_path)
    write_part(_rows([("a", "p", "ok", 0), ("b", "p", "error", 0), ("c", "p", "ok", 0)]), d)
    write_part(_rows([("e", "p", "error", 0)]), d)
    write_part(_rows([("b", "p", "ok", 3), ("e", "p", "ok", 3)]), d)
    expected = {("a", "p", "h1"), ("b", "p", "h1"), ("c", "p", "h1"), ("e", "p", "h1")}

    class Killed(BaseException):
        pass

    real_write = output.write_part

    def write_then_die(*a, **kw):
        real_write(*a, **kw)
        raise Killed  # the process dies after the new part is committed, before the old one is deleted

    monkeypatch.setattr(output, "write_part", write_then_die)
    with pytest.raises(Killed):
        compact_duplicates(d)
    monkeypatch.undo()
    keys = _keys(tmp_path)
    assert set(keys) == expected                  # nothing lost at the crash point
    assert max(keys.values()) == 2                # a, c live in the old and the new part
    compact_duplicates(d)
    keys = _keys(tmp_path)
    assert set(keys) == expected and set(keys.values()) == {1}
    assert {r["video_id"]: r["status"] for r in read_rows(d).to_pylist()} == {"a": "ok", "b": "ok", "c": "ok",
                                                                             "e": "ok"}
    _assert_names_deterministic(tmp_path)


def test_stale_temp_objects_are_removed_fresh_ones_kept(tmp_path):
    old, fresh = tmp_path / f"_tmp-{'a' * 32}.inprogress", tmp_path / f"_tmp-{'b' * 32}.inprogress"
    users = tmp_path / "_tmp-mine.inprogress"  # not framescribe's name pattern: the user's, never touched
    for p in (old, fresh, users):
        p.write_bytes(b"x")
    past = time.time() - 2 * 3600
    os.utime(old, (past, past))
    os.utime(users, (past, past))
    rep = compact_duplicates(str(tmp_path))
    assert rep.stale_tmp_removed == 1 and not old.exists() and fresh.exists() and users.exists()
    assert read_rows(str(tmp_path)).num_rows == 0 and read_rows(str(tmp_path)).schema == OUTPUT_SCHEMA
