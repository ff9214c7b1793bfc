"""Synthetic temporal video-QA benchmark: generator, tokenizer coverage, `bench quality` smoke, eval harness,
MCQ converters, and the shipped trained tiny model."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from bench import synthetic_qa as sq

SHIPPED = Path(__file__).resolve().parents[1] / "actors" / "assets" / "tiny-qwen2_5_vl-synthqa"


def _digest(frames: np.ndarray) -> str:
    return hashlib.sha256(frames.tobytes()).hexdigest()


def test_generator_is_deterministic():
    a, b = sq.make_clip("test", 5, seed=0), sq.make_clip("test", 5, seed=0)
    assert a.frames.shape == (sq.FRAMES, sq.SIZE, sq.SIZE, 3) and a.frames.dtype == np.uint8
    assert np.array_equal(a.frames, b.frames)
    assert a.caption == b.caption
    assert [(q.question, q.answer, q.options) for q in a.questions] == [(q.question, q.answer, q.options)
                                                                       for q in b.questions]
    assert [(q.prompt("mc"), q.answer) for q in sq.eval_questions(a)] == [(q.prompt("mc"), q.answer)
                                                                          for q in sq.eval_questions(b)]
    assert not np.array_equal(a.frames, sq.make_clip("test", 6, seed=0).frames)
    assert not np.array_equal(a.frames, sq.make_clip("test", 5, seed=1).frames)


def test_splits_are_disjoint():
    digests = {split: {_digest(sq.make_clip(split, i).frames) for i in range(40)} for split in sq.SPLITS}
    assert all(len(d) == 40 for d in digests.values())
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]


def test_questions_are_well_formed():
    for i in range(60):
        clip = sq.make_clip("val", i)
        assert 1 <= len(clip.objects) <= 4
        for q in clip.questions:
            assert q.answer in q.options, (q.question, q.answer, q.options)
            assert len(set(q.options)) == len(q.options)
        # the answers the generator states are the ones the scene shows
        count = next(q for q in clip.questions if q.qtype == "count")
        assert count.answer == sq.NUMBERS[len(clip.objects)]
        for q in clip.questions:
            if q.qtype == "appeared_last":
                last = max(clip.objects, key=lambda o: o.appear)
                assert q.answer == last.name
        assert 1 <= len(sq.eval_questions(clip)) <= 3


def test_every_text_tokenizes_without_unk():
    from actors.tiny_model import QWEN_SPECIAL, build_tokenizer

    tok = build_tokenizer(QWEN_SPECIAL)
    unk = tok.unk_token_id
    texts = {sq.CAPTION_PROMPT}
    for split in sq.SPLITS:
        for i in range(40):
            clip = sq.make_clip(split, i)
            texts.add(clip.caption)
            for q in clip.questions:
                texts |= {q.prompt("short"), q.prompt("mc"), q.answer, *q.options}
    # every word any question/answer/option/caption can contain, not only the sampled ones
    texts.add(" ".join(sorted(sq.answer_words())))
    bad = [t for t in texts if unk in tok(t, add_special_tokens=False)["input_ids"]]
    assert not bad, bad[:5]


def test_write_split_manifest(tmp_path):
    manifest = sq.write_split(tmp_path, "test", 2)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert rows and all(set(r) >= {"uri", "question", "options", "answer", "qtype"} for r in rows)
    assert all((tmp_path / r["uri"]).is_file() for r in rows)
    from bench.eval_manifest import load_items

    items = load_items(str(manifest))
    clip = sq.make_clip("test", 0)
    assert items[0].prompt == sq.eval_questions(clip)[0].prompt("mc")
    assert Path(items[0].uri).is_absolute()


def test_eval_manifest_scoring_and_converters(tmp_path):
    from bench.convert_mcq import convert_mvbench, convert_videomme, write_manifest
    from bench.eval_manifest import EvalItem, is_correct, load_items, resolve_answer

    task = tmp_path / "action_sequence.json"
    task.write_text(json.dumps([{"video": "v1.mp4", "question": "What did the person do first?",
                                 "candidates": ["Sat down.", "Opened the door.", "Ate."], "answer": "Opened the door."}]))
    rows = convert_mvbench([task], tmp_path / "videos")
    assert rows[0]["uri"].endswith("videos/v1.mp4") and rows[0]["qtype"] == "action_sequence"
    vmme = tmp_path / "vmme.jsonl"
    vmme.write_text(json.dumps({"videoID": "abc", "question_id": "001-1", "task_type": "Counting Problem",
                                "question": "How many?", "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."],
                                "answer": "C"}) + "\n")
    rows += convert_videomme([vmme], tmp_path / "data")
    assert rows[1]["options"] == ["1.", "2.", "3.", "4."] and rows[1]["answer"] == "3."
    out = write_manifest(rows, tmp_path / "m.jsonl")
    items = load_items(str(out), "Question: {question} Options: {letters}")
    assert items[1].prompt == "Question: How many? Options: (A) 1. (B) 2. (C) 3. (D) 4."
    assert resolve_answer("B", ["x", "y"]) == "y"
    it = EvalItem("u", "q", "q", "blue circle", ["red square", "blue circle"])
    assert is_correct("Blue circle .", it) and is_correct("(B)", it) and is_correct("it is the blue circle", it)
    assert not is_correct("red square", it) and not is_correct("", it)


@pytest.mark.slow
def test_eval_manifest_runs_the_pipeline(tmp_path, tiny_qwen):
    """manifest → a real labeling run per case → rows joined back to the questions and scored."""
    from bench.eval_manifest import evaluate

    manifest = sq.write_split(tmp_path / "data", "test", 2)
    n_questions = len(manifest.read_text().splitlines())
    res = evaluate(str(manifest), model=str(tiny_qwen), out=str(tmp_path / "out"), methods=["none", "iwp"],
                   retentions=[1.0, 0.25], batch_size=4, log=lambda m: None)
    assert [(r["method"], r["retention"]) for r in res] == [("none", 1.0), ("iwp", 1.0), ("iwp", 0.25)]
    assert all(r["questions"] == n_questions and r["missing"] == 0 and r["errors"] == 0 for r in res)
    assert res[2]["kept_tokens"] == 32 and res[0]["kept_tokens"] == 128  # 16 frames of 112x112 → 128 tokens
    details = [json.loads(line) for line in (tmp_path / "out" / "eval_results.jsonl").read_text().splitlines()]
    assert len(details) == 3 * n_questions and all(d["status"] == "ok" for d in details)
    assert (tmp_path / "out" / "eval_accuracy.csv").is_file() and (tmp_path / "out" / "eval.md").is_file()


@pytest.fixture(scope="module")
def qa_model_dir(tmp_path_factory) -> Path:
    """The shipped trained model, else a random tiny model (the smoke test only checks the plumbing)."""
    if (SHIPPED / "config.json").is_file():
        return SHIPPED
    from actors.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", "qwen2_5_vl")


def test_bench_quality_smoke(tmp_path, qa_model_dir):
    import typer
    from typer.testing import CliRunner

    from bench.quality import command

    app = typer.Typer()  # the command `framescribe bench quality` registers, without the rest of the CLI
    app.command()(command)
    out = tmp_path / "q"
    res = CliRunner().invoke(app, ["--model", str(qa_model_dir), "--videos", "2",
                                   "--methods", "iwp,random", "--retentions", "0.5,0.25", "--fidelity-videos", "1",
                                   "--big-videos", "0", "--out", str(out), "--threads", "2"])
    assert res.exit_code == 0, res.output
    for name in ("accuracy.csv", "accuracy_by_type.csv", "fidelity.csv", "quality.md", "accuracy.png", "fidelity.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "accuracy.csv")))
    assert {(r["method"], float(r["retention"])) for r in rows} == {("iwp", 0.5), ("iwp", 0.25),
                                                                    ("random", 0.5), ("random", 0.25)}
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 and int(r["questions"]) >= 2 for r in rows)
    assert all(float(r["kept_tokens"]) == pytest.approx(np.ceil(float(r["retention"]) * int(r["full_tokens"])))
               for r in rows)
    fid = list(csv.DictReader(open(out / "fidelity.csv")))
    assert len(fid) == 4 and all(float(r["final_err"]) >= 0 for r in fid)
    assert "| iwp |" in (out / "quality.md").read_text()
    assert "| random |" in res.output


@pytest.mark.skipif(not all((SHIPPED.with_name(n) / "config.json").is_file()
                            for n in ("tiny-qwen2_5_vl-synthqa", "tiny-qwen2_5_vl-synthqa-168")),
                    reason="the two shipped trained models are not both installed")
def test_bench_quality_runs_both_shipped_models(tmp_path):
    """`--models shipped,shipped-168`: one run, every case on each model (128 and 288 visual tokens per clip),
    rows named by model, one report section and one plot per model; --model with --models is a config error."""
    import typer
    from typer.testing import CliRunner

    from bench.quality import command

    app = typer.Typer()
    app.command()(command)
    out = tmp_path / "q2"
    res = CliRunner().invoke(app, ["--models", "shipped,shipped-168", "--videos", "1", "--per-clip", "1",
                                   "--methods", "none,iwp,random", "--retentions", "1,0.25", "--fidelity-videos", "0",
                                   "--big-videos", "0", "--bootstrap", "10", "--out", str(out), "--threads", "1"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out / "accuracy.csv")))
    names = ["tiny-qwen2_5_vl-synthqa", "tiny-qwen2_5_vl-synthqa-168"]
    assert [(r["model"], r["method"], float(r["retention"])) for r in rows] == [
        (m, meth, ret) for m in names for meth, ret in (("none", 1.0), ("iwp", 0.25), ("random", 0.25))]
    full = {r["model"]: int(r["full_tokens"]) for r in rows}
    assert full == {names[0]: 128, names[1]: 288}  # 16 frames → 8 groups of 4x4, and of 6x6 at 168 px
    kept = {r["model"]: float(r["kept_tokens"]) for r in rows if r["method"] == "iwp"}
    assert kept == {names[0]: 32, names[1]: 72}
    assert [r["model"] for r in csv.DictReader(open(out / "iwp_vs_best.csv"))] == names
    md = (out / "quality.md").read_text()
    assert all(f"# Quality benchmark ({n})" in md for n in names)
    assert (out / "accuracy.png").is_file() and (out / f"accuracy-{names[1]}.png").is_file()
    assert json.loads((out / "config.json").read_text())["models"] == [
        f"actors/assets/{n}" for n in names]
    assert f"Accuracy of {names[1]}" in res.output
    bad = CliRunner().invoke(app, ["--models", "shipped", "--model", str(SHIPPED), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "models" in bad.output


def test_fidelity_is_zero_when_nothing_is_pruned(qa_model_dir):
    from bench.quality import fidelity_rows, load_qa
    from iwp import IWPSettings

    qa = load_qa(str(qa_model_dir))
    clip = sq.make_clip("test", 0)
    enc = qa.encode([clip.frames], [clip.timestamps])
    rows = fidelity_rows(qa, enc, ["Describe this video."], [("iwp", 1.0), ("random", 1.0)], IWPSettings(), 0,
                         "m", log=lambda m: None)
    assert all(r["final_err"] < 1e-5 and r["attn_err_mean"] < 1e-5 for r in rows)


@pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="no shipped trained model")
def test_shipped_model_answers_test_questions():
    """The shipped model, loaded like `framescribe run --model DIR` loads it, answers held-out test questions
    unpruned through the real adapter path (encode → splice → greedy_generate): >= 80% of the first 60
    evaluation questions of the test split, and option log-likelihood at least as good; the README next to the
    weights states the accuracy it was measured at."""
    from actors.splice import PruneSpec
    from bench.qa_scoring import QAItem, QAModel, answer_items

    qa = QAModel.load(str(SHIPPED))
    clips = [sq.make_clip("test", i) for i in range(24)]
    enc = qa.encode([c.frames for c in clips], [c.timestamps for c in clips])
    items = [QAItem(j, q.prompt("mc"), q.answer, q.options, q.qtype) for j, c in enumerate(clips)
             for q in sq.eval_questions(c)][:60]
    res = answer_items(qa, enc, items, PruneSpec(), loglik=True)
    acc = float(np.mean([r["correct"] for r in res]))
    assert len(res) == 60 and acc >= 0.8, [(r["prompt"], r["answer"], r["text"]) for r in res if not r["correct"]]
    assert float(np.mean([r["loglik_correct"] for r in res])) >= 0.8
    summary = json.loads((SHIPPED / "train_summary.json").read_text())
    assert f"{100 * summary['test']['mc_greedy']:.1f}%" in (SHIPPED / "README.md").read_text()


def test_paired_bootstrap_and_rank_correlation():
    """The statistics the decisive comparison rests on, against cases with known answers."""
    from bench.quality import is_baseline, paired_ci, parse_method, rank_correlation, verdict

    rng = np.random.default_rng(0)
    a = rng.random(2000) < 0.8
    b = rng.random(2000) < 0.7
    diff, lo, hi = paired_ci(a, b, n_boot=1000, seed=0)
    assert diff == pytest.approx(a.mean() - b.mean())
    assert lo < diff < hi and lo > 0 and verdict(lo, hi) == "better"  # a 10-point gap on 2000 questions
    se = np.sqrt(np.var(a.astype(float) - b) / len(a))
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    same = paired_ci(a, a, n_boot=200, seed=0)
    assert same == (0.0, 0.0, 0.0) and verdict(*same[1:]) == "tied"
    assert verdict(*paired_ci(b, a, n_boot=500, seed=1)[1:]) == "worse"
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [1, 0, 0, 0]) == pytest.approx(-np.sqrt(0.6))  # ties get average ranks
    assert rank_correlation([1, 1, 1], [0, 1, 0]) is None
    assert parse_method("dycoke+bias+merge") == ("dycoke", "bias+merge") and parse_method("dycoke") == ("dycoke", "none")
    assert parse_method("iwp") == ("iwp", "bias") and parse_method("iwp+none") == ("iwp", "none")  # shipped defaults
    assert is_baseline("dycoke+bias") and not is_baseline("iwp_fixed+bias") and not is_baseline("none")
    with pytest.raises(ValueError, match="unknown compensation"):
        parse_method("iwp+weights")


def test_cached_option_scores_equal_whole_prefills(qa_model_dir):
    """Option log-likelihood from one prompt prefill + a cached continuation per option equals prefilling every
    (prompt + option) whole, with and without the compensation bias."""
    from actors.splice import PruneSpec
    from bench.quality import encode_clips, load_qa

    qa = load_qa(str(qa_model_dir))
    enc, items = encode_clips(qa, "test", 3, 0, 2, "mc", count_every=1)
    for spec in (PruneSpec(), PruneSpec(method="iwp", retention=0.25, compensation="bias")):
        pairs = [(qa.splice(enc[it.video], qa.prune(enc[it.video], spec), it.prompt), it.options) for it in items]
        cached, whole = qa.option_scores_batch(pairs, batch_size=4), qa.option_scores_batch_full(pairs)
        assert [len(c) for c in cached] == [len(it.options) for it in items]
        np.testing.assert_allclose(np.concatenate(cached), np.concatenate(whole), atol=1e-3, rtol=1e-4)


def test_iwp_ablation_compares_variants_on_validation(tmp_path, qa_model_dir):
    from bench.iwp_ablation import VARIANTS, run_ablation

    names = ["floor+pcmmr", "novelty+cover,floor1"]
    rows = run_ablation(str(qa_model_dir), 2, [0.25], {n: VARIANTS[n] for n in names}, "bias", 0, 2, tmp_path, None,
                        100, log=lambda m: None)
    assert [r["variant"] for r in rows] == names and all(r["questions"] == 4 for r in rows)
    assert "diff_all" not in rows[0] and -1.0 <= rows[1]["diff_all"] <= 1.0
    assert (tmp_path / "ablation.csv").is_file() and "novelty+cover,floor1" in (tmp_path / "ablation.md").read_text()
