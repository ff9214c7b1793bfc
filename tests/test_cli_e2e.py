"""The real CLI in a subprocess over real videos and broken files; output read back independently."""
from __future__ import annotations

import json
import math

import pyarrow.dataset as pads
import pytest

from tests.conftest import run_cli
from tests.conftest_videos import BROKEN_EXPECTED

pytestmark = pytest.mark.slow


def _rows(out):
    return pads.dataset(str(out), format="parquet").to_table().to_pylist()


def test_mixed_folder_gives_one_row_per_video_with_reasons(tmp_path, tiny_qwen, mixed_dir):
    out = tmp_path / "labels"
    r = run_cli("run", "--input", str(mixed_dir), "--output", str(out), "--model", str(tiny_qwen),
                "--pruner", "iwp", "--retention", "0.25", "--num-frames", "6", "--max-new-tokens", "4",
                "--batch-size", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(out)
    files = sorted(p for p in mixed_dir.iterdir())
    assert len(rows) == len(files)                       # exactly one row per video (one prompt)
    by_name = {r["uri"].rsplit("/", 1)[-1]: r for r in rows}
    assert set(by_name) == {p.name for p in files}       # non-ASCII name included
    for name, expected in BROKEN_EXPECTED.items():
        row = next(v for k, v in by_name.items() if k.startswith(f"broken_{name}"))
        assert row["status"] == "error" and row["error_type"] == expected, row
        assert row["error_message"] and row["text"] is None
    good = [r for r in rows if not r["uri"].rsplit("/", 1)[-1].startswith("broken_")]
    assert good and all(r["status"] == "ok" for r in good), [r["error_message"] for r in good]
    for row in good:
        assert row["pruner"] == "iwp" and row["retention"] == 0.25
        assert row["visual_tokens_kept"] == math.ceil(0.25 * row["visual_tokens_full"])
        assert row["frames_sampled"] == 6 and len(row["frame_timestamps"]) == 6
        assert row["width"] > 0 and row["height"] > 0 and row["iwp_residual"] is not None
        assert row["vision_groups"] == 3 and 1 <= row["vision_groups_encoded"] <= 3  # 6 frames, 2 per group (skip on)
        assert isinstance(row["text"], str)
    summary = r.stdout
    assert f"{len(good)} / {len(rows) - len(good)}" in summary
    # a second run over the same inputs and config adds nothing (resume)
    r2 = run_cli("run", "--input", str(mixed_dir), "--output", str(out), "--model", str(tiny_qwen),
                 "--pruner", "iwp", "--retention", "0.25", "--num-frames", "6", "--max-new-tokens", "4",
                 "--batch-size", "3")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert len(_rows(out)) == len(rows)
    assert "already labeled" in r2.stdout


def test_yaml_config_qa_with_questions_and_duckdb(tmp_path, tiny_llava, corpus):
    videos, _ = corpus
    duckdb = pytest.importorskip("duckdb")
    manifest = tmp_path / "m.jsonl"
    missing = tmp_path / "gone.mp4"
    manifest.write_text("\n".join(json.dumps(x) for x in [
        {"uri": str(videos["h264"].path), "questions": ["what moves?"]},
        {"uri": str(videos["portrait"].path)},
        {"uri": str(missing)},
    ]))
    questions = tmp_path / "q.txt"
    questions.write_text("how many objects are there?\nwhich colour is the shape?\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"input: {manifest}\noutput: {tmp_path / 'out'}\nmodel: {tiny_llava}\ntask: qa\n"
                   f"questions: {questions}\nnum-frames: 4\nmax_new_tokens: 3\npruner: iwp\nretention: 0.25\n"
                   "vision_skip: false\n")
    r = run_cli("run", "--config", str(cfg), "--batch-size", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    con = duckdb.connect()
    rows = con.execute(f"select uri, prompt, status, error_type, visual_tokens_kept, visual_tokens_full, "
                       f"vision_groups, vision_groups_encoded "
                       f"from read_parquet('{tmp_path / 'out'}/**/*.parquet')").fetchall()
    # 2 shared questions for every video + 1 own question for the first: 3 + 2 + 2
    assert len(rows) == 7
    assert {r[2] for r in rows if r[0] == str(missing)} == {"error"}
    assert {r[3] for r in rows if r[0] == str(missing)} == {"not_found"}
    assert all(r[4] == math.ceil(0.25 * r[5]) for r in rows if r[2] == "ok")
    assert all(r[6] == r[7] >= 1 for r in rows if r[2] == "ok")  # vision_skip: false encodes every frame
    # LLaVA-OneVision: one token group per sampled frame; the kept indices are what the count says
    grids = con.execute(f"select token_grid, kept_token_indices, visual_tokens_full from "
                        f"read_parquet('{tmp_path / 'out'}/**/*.parquet') where status = 'ok'").fetchall()
    for grid, kept, full in grids:
        assert grid[0] == 4 and grid[0] * grid[1] * grid[2] == full and len(kept) == math.ceil(0.25 * full)


def test_bad_config_fails_fast_naming_the_field(tmp_path, tiny_qwen, mixed_dir):
    r = run_cli("run", "--input", str(mixed_dir), "--output", str(tmp_path / "o"), "--model", str(tiny_qwen),
                "--retention", "1.5")
    assert r.returncode == 2 and "retention" in r.stderr
    r = run_cli("run", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"), "--model",
                str(tiny_qwen))
    assert r.returncode == 2 and "input" in r.stderr and "does not exist" in r.stderr
    r = run_cli("run", "--input", str(mixed_dir), "--output", str(tmp_path / "o"), "--model",
                "no-such-org/no-such-model")
    assert r.returncode == 2 and "no-such-org/no-such-model" in r.stderr and "--model DIR" in r.stderr.replace("\n", " ")
    assert not (tmp_path / "o").exists()  # nothing was started or written


def test_max_error_ratio_exit_code(tmp_path, tiny_qwen, corpus):
    _, broken = corpus
    d = tmp_path / "in"
    d.mkdir()
    for name in ("text", "empty"):
        (d / broken[name].name).write_bytes(broken[name].read_bytes())
    r = run_cli("run", "--input", str(d), "--output", str(tmp_path / "o"), "--model", str(tiny_qwen),
                "--max-error-ratio", "0.5")
    assert r.returncode == 3 and "max-error-ratio" in r.stderr
    assert len(_rows(tmp_path / "o")) == 2  # the error rows are still written


def test_demo_captions_describe_its_clips(tmp_path):
    """`framescribe demo`, the README's first command: the shipped trained model labels synthetic test clips
    (several codecs) and one broken file; one row per file, the broken one an error row; and the captions
    name the objects that are really in the clips (the reference caption is the generator's ground truth)."""
    from pathlib import Path

    from actors.assets import shipped_synthqa_model
    from bench import synthetic_qa as sq
    from pipeline.output import read_rows

    if shipped_synthqa_model() is None:
        pytest.skip("no shipped trained model")
    res = run_cli("demo", "--workdir", str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "reference caption" in res.stdout
    rows = {Path(r["uri"]).name: r for r in read_rows(str(tmp_path / "labels")).to_pylist()}
    assert len(rows) == 5
    assert rows["broken.mp4"]["status"] == "error" and rows["broken.mp4"]["error_message"]
    ok = {name: r for name, r in rows.items() if name != "broken.mp4"}
    assert all(r["status"] == "ok" for r in ok.values())
    # colours are the easiest thing to check in free text: the captions (at the demo's 25% retention) must name
    # most of the clips' colours and few others (a caption naming random colours gets about 35% precision)
    right = wrong = total = 0
    for i in range(4):
        clip = sq.make_clip("test", i)
        (name,) = [n for n in ok if n.startswith(clip.clip_id)]
        said = {c for c in sq.COLOURS if c in ok[name]["text"].split()}
        truth = {o.colour for o in clip.objects}
        right, wrong, total = right + len(said & truth), wrong + len(said - truth), total + len(truth)
    texts = {n: r["text"] for n, r in ok.items()}
    assert right >= 0.6 * total and right >= 0.6 * (right + wrong), texts
    # the demo ends with the report: the printed path opens the clips' cards, references beside the captions
    import re
    from urllib.parse import unquote, urlparse

    (url,) = re.findall(r"file://\S+/index\.html", res.stderr)
    page = Path(unquote(urlparse(url).path))
    html = page.read_text()
    assert html.count('<article class="card"') == 5 and "not_a_video" in html
    assert all(r["reference"] and r["reference"].replace("'", "&#x27;") in html for r in ok.values())
    assert len(list((page.parent / "frames").glob("*.jpg"))) == 4
