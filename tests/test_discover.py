"""Input discovery: directory, glob, manifests; stable ids; prompts per video."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, RunConfig
from pipeline.discover import discover_inputs, video_id_for


def _cfg(inp, **kw):
    return RunConfig(input=str(inp), output="out", model="m", **kw)


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ("x.mp4", "a/y.MKV", "a/b/z.webm", "notes.txt", "a/b/img.png"):
        (tmp_path / rel).write_bytes(b"0")
    return tmp_path


def test_directory_is_recursive_by_video_extension(tree):
    uris = [v.uri for v in discover_inputs(_cfg(tree))]
    assert sorted(u.rsplit("/", 1)[-1] for u in uris) == ["x.mp4", "y.MKV", "z.webm"]
    assert uris == sorted(uris)


def test_glob_and_single_file(tree):
    assert [v.uri.rsplit("/", 1)[-1] for v in discover_inputs(_cfg(f"{tree}/a/**/*.webm"))] == ["z.webm"]
    assert len(discover_inputs(_cfg(tree / "x.mp4"))) == 1


def test_video_id_is_stable_and_prompts_default_to_caption(tree):
    vs = discover_inputs(_cfg(tree))
    # a local video is identified by its path relative to the input root (README "Versioning")
    assert vs[0].video_id == video_id_for(vs[0].key) == discover_inputs(_cfg(tree))[0].video_id
    assert vs[0].key == vs[0].uri[len(str(tree)) + 1:]
    assert [p for _, p in vs[0].prompts] == ["Describe this video."]


def test_txt_manifest_keeps_missing_entries_and_resolves_relative_paths(tmp_path):
    (tmp_path / "here.mp4").write_bytes(b"0")
    m = tmp_path / "list.txt"
    m.write_text("# comment\nhere.mp4\n/abs/missing.mp4\n\n")
    uris = [v.uri for v in discover_inputs(_cfg(m))]
    assert uris == [f"{tmp_path}/here.mp4", "/abs/missing.mp4"]


def test_jsonl_manifest_per_video_questions(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"uri": "/v/1.mp4", "questions": ["q1?", "q2?"]}) + "\n"
                 + json.dumps({"uri": "/v/2.mp4", "question": "q3?"}) + "\n")
    qs = tmp_path / "q.txt"
    qs.write_text("shared?\nq1?\n")
    vs = discover_inputs(_cfg(m, task="qa", questions=str(qs)))
    assert [p for _, p in vs[0].prompts] == ["shared?", "q1?", "q2?"]  # duplicates collapse to one row
    assert [p for _, p in vs[1].prompts] == ["shared?", "q1?", "q3?"]


def test_parquet_manifest_and_bad_manifests(tmp_path):
    m = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": ["/v/a.mp4", "/v/b.mp4"]}), m)
    assert [v.uri for v in discover_inputs(_cfg(m))] == ["/v/a.mp4", "/v/b.mp4"]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"path": ["/v/a.mp4"]}), bad)
    with pytest.raises(ConfigError, match="no 'uri' column"):
        discover_inputs(_cfg(bad))
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"uri": "/v/a.mp4"}\nnot json\n')
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        discover_inputs(_cfg(bad_jsonl))


def test_qa_without_any_question_fails_fast(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"uri": "/v/1.mp4"}) + "\n")
    with pytest.raises(ConfigError, match="no prompt"):
        discover_inputs(_cfg(m, task="qa"))
