"""Issue 19 through the real CLI: the output folder is the user's, checks come before work, one labeling
hash per meaning, help that teaches. Each test is one finding of a new user's session."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, run_cli

FAST = ("--num-frames", "2", "--max-new-tokens", "3", "--batch-size", "2")
LEGACY_COMMIT = "1dfe92e"  # framescribe 0.1.0 as it was before rows carried schema_version


@pytest.fixture(autouse=True)
def own_ray_tmp(monkeypatch):
    """Each test's CLI runs start their own local Ray in a temp dir of their own (short: socket paths)."""
    d = tempfile.mkdtemp(prefix="fs19", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def two_videos(tmp_path_factory) -> Path:
    from pipeline.sample_videos import make_moving_shapes, write_video

    d = tmp_path_factory.mktemp("two")
    for i in range(2):
        write_video(d / f"clip_{i}.mp4", make_moving_shapes(4, 64, 64, seed=10 + i), fps=4)
    return d


def _no_traceback(r):
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]


def _own_rows(out: Path) -> list[dict]:
    """Rows of framescribe's parts, read with pyarrow alone (an independent reader)."""
    parts = sorted(out.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default").to_pylist() if parts else []


# --- 1. the output folder belongs to the user ---------------------------------------------------------

def test_foreign_parquet_in_output_is_refused_and_nothing_is_deleted(tmp_path, tiny_qwen, two_videos):
    out = tmp_path / "labels"
    (out / "sub").mkdir(parents=True)
    mine = {"mydata.parquet": None, "notes.txt": b"my notes", "sub/other.parquet": None}
    pq.write_table(pa.table({"x": [1, 2]}), out / "mydata.parquet")
    pq.write_table(pa.table({"y": ["a"]}), out / "sub" / "other.parquet")
    (out / "notes.txt").write_bytes(b"my notes")
    before = {p: (out / p).read_bytes() for p in mine}
    for extra in ([], ["--overwrite"]):
        r = run_cli("run", "--input", str(two_videos), "--output", str(out), "--model", str(tiny_qwen), *FAST, *extra)
        assert r.returncode == 2, (extra, r.stderr[-3000:])
        _no_traceback(r)
        assert "output:" in r.stderr and "mydata.parquet" in r.stderr and "did not write" in r.stderr
        assert {p: (out / p).read_bytes() for p in mine} == before      # not one byte of the user's touched
        assert not list(out.glob("part-*.parquet"))


def test_overwrite_removes_only_its_parts_says_so_and_second_config_is_announced(tmp_path, tiny_qwen, two_videos):
    out = tmp_path / "labels"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")                   # not Parquet: left alone, never read
    (out / "part-notes.txt").write_text("mine too")
    base = ("run", "--input", str(two_videos), "--output", str(out), "--model", str(tiny_qwen), *FAST)
    r1 = run_cli(*base)
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert "other labeling config" not in r1.stderr
    # a second labeling config in the same output: said at the start and in the summary
    r2 = run_cli(*base, "--pruner", "random", "--retention", "0.5")
    assert r2.returncode == 0, r2.stderr[-3000:]
    rows = _own_rows(out)
    hashes = {r["labeling_hash"] for r in rows}
    assert len(rows) == 4 and len(hashes) == 2
    first_hash = next(r["labeling_hash"] for r in rows if r["pruner"] == "none")
    second_hash = next(r["labeling_hash"] for r in rows if r["pruner"] == "random")
    assert "2 rows of 1 other labeling config" in r2.stderr and first_hash in r2.stderr
    assert f"pyarrow.compute.field('labeling_hash') == '{second_hash}'" in r2.stderr
    assert "other labeling configs" in r2.stdout
    state = json.loads(next(p for p in (out / "_framescribe").glob("run-*.json")
                            if json.loads(p.read_text())["labeling_hash"] == second_hash).read_text())
    assert state["other_configs"] == {first_hash: 2}
    for key in ("status", "exit_code", "started_at", "finished_at", "input", "output", "model", "model_revision",
                "pruning", "videos_total", "videos_ok", "videos_error", "rows", "schema_version"):
        assert key in state, key
    assert (state["status"], state["exit_code"], state["input"], state["model"]) == ("ok", 0, str(two_videos),
                                                                                      str(tiny_qwen))
    assert state["pruning"]["pruner"] == "random" and state["pruning"]["retention"] == 0.5
    assert (state["videos_total"], state["videos_ok"], state["rows"]) == (2, 2, 2)
    # --overwrite removes framescribe's parts only and says what it removed, other configs included
    r3 = run_cli(*base, "--overwrite")
    assert r3.returncode == 0, r3.stderr[-3000:]
    _no_traceback(r3)
    assert "--overwrite removed" in r3.stderr and "with 4 rows" in r3.stderr
    assert f"2 of them of 1 other labeling config(s) ({second_hash})" in r3.stderr
    assert (out / "notes.txt").read_text() == "my notes" and (out / "part-notes.txt").read_text() == "mine too"
    assert {r["labeling_hash"] for r in _own_rows(out)} == {first_hash} and len(_own_rows(out)) == 2
    assert all(r["schema_version"] == 2 for r in _own_rows(out))
    assert json.loads((out / "_framescribe" / "schema.json").read_text())["schema_version"] == 2


# --- 2. everything checkable is checked before Ray starts ---------------------------------------------

def _read_only_dir(tmp_path) -> Path:
    """An existing folder this process cannot write to (root ignores permission bits: use sysfs then)."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    for cand in (Path("/sys/fs"), Path("/sys/kernel"), Path("/proc/sys")):
        try:
            (cand / "_framescribe").mkdir()
        except OSError:
            return cand
        (cand / "_framescribe").rmdir()
    pytest.skip("no read-only folder available")


def test_read_only_output_fails_before_any_work(tmp_path, tiny_qwen, two_videos):
    ro = _read_only_dir(tmp_path)
    r = run_cli("run", "--input", str(two_videos), "--output", str(ro), "--model", str(tiny_qwen), *FAST,
                env={"RAY_ADDRESS": ""})
    assert r.returncode == 2, r.stderr[-3000:]
    _no_traceback(r)
    assert "output: cannot write to" in r.stderr and str(ro) in r.stderr
    assert "Started a local Ray instance" not in r.stderr + r.stdout   # no decoding, no labeling first


def test_no_videos_exits_2_and_incremental_treats_it_as_nothing_to_do(tmp_path, tiny_qwen):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no videos here")
    r = run_cli("run", "--input", str(empty), "--output", str(tmp_path / "out"), "--model", str(tiny_qwen))
    assert r.returncode == 2 and "input: no videos in" in r.stderr and str(empty) in r.stderr, r.stderr[-2000:]
    r = run_cli("--input", str(empty), "--output", str(tmp_path / "out2"), "--model", str(tiny_qwen),
                module="jobs.incremental")
    assert r.returncode == 0, r.stderr[-3000:]
    _no_traceback(r)
    assert "0 new" in r.stderr + r.stdout


def test_bad_questions_line_exits_2_naming_file_line_and_field(tmp_path, tiny_qwen, two_videos):
    q = tmp_path / "q.jsonl"
    q.write_text('{"id": "count", "question": "how many shapes?"}\n\n{"id": "colour", "text": "which colour?"}\n')
    r = run_cli("run", "--input", str(two_videos), "--output", str(tmp_path / "out"), "--model", str(tiny_qwen),
                "--task", "qa", "--questions", str(q))
    assert r.returncode == 2, r.stderr[-3000:]
    _no_traceback(r)
    assert f"questions: {q} line 3: field 'question' is missing" in r.stderr


def test_questions_jsonl_id_becomes_the_prompt_id(tmp_path, two_videos):
    from pipeline.config import RunConfig
    from pipeline.discover import discover_inputs

    q = tmp_path / "q.jsonl"
    q.write_text('{"id": "count", "question": "how many shapes?"}\n{"question": "which colour?"}\n')
    v = discover_inputs(RunConfig(input=str(two_videos), output="o", model="m", task="qa", questions=str(q)))[0]
    assert v.prompts[0] == ("count", "how many shapes?") and v.prompts[1][1] == "which colour?"


# --- 3. one labeling hash per meaning -------------------------------------------------------------------

def test_same_labeling_spelled_differently_is_done_once(tmp_path, tiny_qwen, two_videos):
    """--questions relative vs absolute, --model DIR/ vs DIR, a .jsonl manifest named relatively vs
    absolutely (relative entries), --num-frames under --fps: the second run finds everything labeled."""
    work = tmp_path / "work"
    (work / "vids").mkdir(parents=True)
    for p in two_videos.iterdir():
        shutil.copy(p, work / "vids" / p.name)
    (work / "m.jsonl").write_text("".join(json.dumps({"uri": f"./vids/{p.name}"}) + "\n"
                                          for p in sorted(two_videos.iterdir())))
    (work / "q.txt").write_text("how many shapes?\n")
    out = tmp_path / "labels"
    common = ("--output", str(out), "--task", "qa", "--max-new-tokens", "3", "--batch-size", "2", "--fps", "1",
              "--max-frames", "2")
    r1 = run_cli("run", "--input", "m.jsonl", "--questions", "q.txt", "--model", str(tiny_qwen) + "/",
                 "--num-frames", "4", *common, cwd=work)
    assert r1.returncode == 0, r1.stderr[-3000:]
    rows = _own_rows(out)
    assert len(rows) == 2
    assert {r["uri"] for r in rows} == {str(work / "vids" / p.name) for p in two_videos.iterdir()}  # canonical
    r2 = run_cli("run", "--input", str(work / "m.jsonl"), "--questions", str(work / "q.txt"), "--model",
                 str(tiny_qwen), "--num-frames", "16", *common, cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "(2 already labeled, skipped)" in r2.stdout and _own_rows(out) == rows
    # the corpus moved to another mount point: a local video is its path relative to the input root
    moved = tmp_path / "mnt" / "corpus"
    shutil.copytree(work, moved)
    r3 = run_cli("run", "--input", str(moved / "m.jsonl"), "--questions", str(moved / "q.txt"), "--model",
                 str(tiny_qwen), *common)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert "(2 already labeled, skipped)" in r3.stdout and len(_own_rows(out)) == 2


def test_output_of_the_previous_version_is_recognised_not_redone(tmp_path, tiny_qwen, two_videos):
    """Rows written by framescribe 0.1.0 (checked out from git) are migrated on first touch."""
    legacy = tmp_path / "legacy"
    try:
        blob = subprocess.run(["git", "-C", str(REPO), "archive", LEGACY_COMMIT, "pipeline", "actors", "iwp"],
                              capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip(f"git history with {LEGACY_COMMIT} not available")
    tarfile.open(fileobj=io.BytesIO(blob)).extractall(legacy)
    out = tmp_path / "labels"
    args = ("run", "--input", str(two_videos), "--output", str(out), "--model", str(tiny_qwen), *FAST)
    old = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=legacy,
                         env={**os.environ, "PYTHONPATH": str(legacy), "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, timeout=600)
    assert old.returncode == 0, old.stderr[-3000:]
    old_rows = _own_rows(out)
    assert len(old_rows) == 2 and "schema_version" not in old_rows[0]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(2 already labeled, skipped)" in r.stdout and "migrated 2 rows" in r.stderr
    rows = _own_rows(out)
    assert len(rows) == 2 and {x["schema_version"] for x in rows} == {2}
    assert sorted(x["text"] for x in rows) == sorted(x["text"] for x in old_rows)   # the same labels, kept


# --- 5. help that teaches -------------------------------------------------------------------------------

def test_help_version_defaults_and_choices():
    from pipeline.cli import field_choices, field_default
    from pipeline.config import RunConfig

    v = run_cli("--version")
    assert v.returncode == 0 and v.stdout.strip().startswith("framescribe ")
    r = run_cli("run", "-h", env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})  # one line per option
    assert r.returncode == 0, r.stderr
    lines, current = {}, None
    for line in r.stdout.splitlines():  # an option's help may wrap onto the next lines
        words = line.strip("│ ").split()
        if words and words[0].startswith("--"):
            current = words[0].split("/")[0]
            lines[current] = ""
        if current and words:
            lines[current] += " " + " ".join(words)
    for name, field in RunConfig.model_fields.items():
        line = lines["--" + name.replace("_", "-")]
        assert field.description and field.description[:30] in line, name
        assert f"[default: ({field_default(name)})]" in line or f"[default: {field_default(name)}]" in line, line
        if field_choices(name):
            assert "|".join(field_choices(name)) in line, line
    assert field_choices("pruner")[:2] == ("none", "random") and field_choices("task") == ("caption", "qa")


def test_yaml_typo_suggests_and_relative_paths_follow_the_file(tmp_path, tiny_qwen):
    folder = tmp_path / "project"
    (folder / "vids").mkdir(parents=True)
    cfg = folder / "run.yaml"
    cfg.write_text(f"input: vids\noutput: labels\nmodel: {tiny_qwen}\nretension: 0.5\n")
    r = run_cli("run", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 2 and "retension: unknown option; did you mean 'retention'?" in r.stderr, r.stderr
    cfg.write_text(f"input: vids\noutput: labels\nmodel: {tiny_qwen}\n")
    r = run_cli("run", "--config", str(cfg), cwd=tmp_path)       # run from elsewhere: paths follow the file
    assert r.returncode == 2 and f"input: no videos in '{folder / 'vids'}'" in r.stderr, r.stderr


def test_tiny_model_refuses_a_non_empty_folder_unless_forced(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "weights.bin").write_bytes(b"precious")
    r = run_cli("tiny-model", str(d))
    assert r.returncode == 2 and "--force" in r.stderr and (d / "weights.bin").read_bytes() == b"precious"
    r = run_cli("tiny-model", str(d), "--force")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (d / "config.json").is_file()


def test_readme_options_table_is_the_typed_config():
    from pipeline.cli import options_table

    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- options table")
    block = readme[readme.index("\n", start) + 1:readme.index("<!-- end of options table -->")].strip()
    assert block == options_table(), ("README options table drifted from RunConfig; regenerate with "
                                      "python -c 'from pipeline.cli import options_table; print(options_table())'")
