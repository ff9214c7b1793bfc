"""Output at scale: one listing and one key-column read serve resume, compaction and the summary; small
parts merge into big ones, atomically and exactly once even when the merge is killed halfway."""
from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

import pipeline.output as output
from pipeline.output import OutputIndex, compact, conform, part_name, write_part
from pipeline.storage import Location


def _rows(video_ids, lh="h1", status="ok", run_id="r1"):
    n = len(video_ids)
    return conform(pa.table({"video_id": list(video_ids), "prompt_id": ["p"] * n, "labeling_hash": [lh] * n,
                             "status": [status] * n, "text": [f"text of {v}" for v in video_ids],
                             "run_id": [run_id] * n,
                             "created_at": pa.array([datetime(2026, 1, 1, tzinfo=timezone.utc)] * n,
                                                    pa.timestamp("us", tz="UTC"))}))


def _independent_keys(d) -> Counter:
    t = pads.dataset(str(d), format="parquet").to_table(columns=["video_id", "prompt_id", "labeling_hash"])
    return Counter(zip(*(t[c].to_pylist() for c in t.column_names)))


def _parts(d):
    return sorted(p.name for p in d.glob("*.parquet"))


@pytest.fixture
def count_reads(monkeypatch):
    """Counts key-column reads per part (the index's only way to read a part's rows)."""
    seen: Counter = Counter()
    real = output._part_keys

    def spy(fs, path):
        seen[path.rsplit("/", 1)[-1]] += 1
        return real(fs, path)

    monkeypatch.setattr(output, "_part_keys", spy)
    return seen


def test_one_listing_and_one_key_read_serve_resume_compaction_and_summary(tmp_path, count_reads, monkeypatch):
    for i in range(5):
        write_part(_rows([f"v{i}{j}" for j in range(3)]), str(tmp_path))
    write_part(_rows(["v00"], status="error", run_id="r0"), str(tmp_path))   # a duplicate key
    listings = []
    real_ls = type(Location.resolve(str(tmp_path)).fs).ls
    monkeypatch.setattr(type(Location.resolve(str(tmp_path)).fs), "ls",
                        lambda self, *a, **kw: listings.append(a) or real_ls(self, *a, **kw))
    index = OutputIndex.load(Location.resolve(str(tmp_path)))
    rep = compact(index)
    assert rep.duplicates_removed == 1
    done = index.done_keys("h1", include_errors=False)
    assert done == {(f"v{i}{j}", "p") for i in range(5) for j in range(3)}
    assert len(listings) == 1
    # each original part read once; a rewritten part (new name) once more, nothing else
    assert max(count_reads.values()) == 1
    assert sum(count_reads.values()) == 6 + rep.parts_rewritten

    write_part(_rows(["w1", "w2"], run_id="r2"), str(tmp_path))  # a run writes a part
    before = sum(count_reads.values())
    new = index.refresh()
    assert len(new) == 1 and sum(count_reads.values()) == before + 1  # only the new part is read
    summary = index.rows_of_run("r2", ["video_id", "status"])
    assert sorted(summary["video_id"].to_pylist()) == ["w1", "w2"]
    assert index.done_keys("h2", include_errors=True) == set()


def test_small_parts_merge_into_big_ones_exactly_once(tmp_path):
    d = str(tmp_path)
    for i in range(10):
        write_part(_rows([f"v{i:02d}{j}" for j in range(3)]), d)
    write_part(_rows(["big%03d" % j for j in range(40)]), d)   # already big: left alone
    big = part_name(_rows(["big%03d" % j for j in range(40)]))
    rep = compact(OutputIndex.load(Location.resolve(d)), part_rows=12)
    keys = _independent_keys(tmp_path)
    assert len(keys) == 70 and set(keys.values()) == {1}
    assert rep.parts_merged == 10
    parts = _parts(tmp_path)
    assert big in parts and len(parts) == 1 + rep.parts_written_by_merge
    sizes = sorted(pads.dataset(str(tmp_path / p)).count_rows() for p in parts if p != big)
    assert sizes == [6, 12, 12]                      # 4 + 4 + 2 parts of 3 rows, at most 12 rows each
    assert compact(OutputIndex.load(Location.resolve(d)), part_rows=12).parts_merged == 0  # idempotent


def test_merge_killed_after_write_before_delete_heals(tmp_path, monkeypatch):
    d = str(tmp_path)
    for i in range(4):
        write_part(_rows([f"v{i}{j}" for j in range(2)]), d)

    class Killed(BaseException):
        pass

    real_write = output.write_part

    def write_then_die(*a, **kw):
        real_write(*a, **kw)
        raise Killed

    monkeypatch.setattr(output, "write_part", write_then_die)
    with pytest.raises(Killed):
        compact(OutputIndex.load(Location.resolve(d)), part_rows=100)
    monkeypatch.undo()
    keys = _independent_keys(tmp_path)
    assert len(keys) == 8 and set(keys.values()) == {2}   # merged part and sources both there: nothing lost
    rep = compact(OutputIndex.load(Location.resolve(d)), part_rows=100)
    keys = _independent_keys(tmp_path)
    assert len(keys) == 8 and set(keys.values()) == {1}
    assert rep.parts_deleted == 4                        # the bigger merged part wins, the sources go
    assert len(_parts(tmp_path)) == 1
