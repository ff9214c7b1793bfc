"""Evaluate question answering through real pipeline runs: manifest → one labeling run per method × retention →
accuracy table.

Manifest format (`.jsonl`, one question per line, or `.parquet` with the same columns):

    {"uri": "videos/clip-001.mp4", "question": "which object appeared last ?",
     "options": ["red square", "blue circle", "green star"], "answer": "blue circle"}

* `uri`: path (relative to the manifest, absolute, or any fsspec URL the pipeline reads, e.g. s3://...);
  the same video may appear on many lines (one per question).
* `question`: the question text. When `options` are given and `--prompt-template` contains `{options}`
  (option texts) or `{letters}` (`(A) text (B) text ...`), the prompt sent to the model is the template
  filled in (default
  `{question} options : {options} .`, options joined by ` , `: the synthetic-QA format the shipped tiny
  model was trained on). A question that already lists its options can use `--prompt-template "{question}"`.
* `options` (optional): candidate answers. `answer`: the correct option's text, or its letter (A, B, ...)
  when options are given.
* Other fields (`qtype`, `id`, ...) are carried into the per-question results (`qtype` gets its own
  accuracy breakdown).

The harness writes `OUT/pipeline_manifest.jsonl` (uri + formatted question; the pipeline's own `.jsonl`
manifest input with per-video `question`), then for every case runs the labeling pipeline in this process
(one local Ray session; the same code path as
`framescribe run --input OUT/pipeline_manifest.jsonl --task qa --pruner P --retention R ...`, which it
prints) into `OUT/runs/P@R/`, joins the rows on (uri, prompt) and scores them: a row is correct when its text
equals the answer after normalisation, or names exactly the correct option (by text or letter).
Results: `OUT/eval_accuracy.csv`, `OUT/eval_by_type.csv`, `OUT/eval_results.jsonl`, `OUT/eval.md`.

    python -m bench.eval_manifest MANIFEST --model DIR --methods none,iwp,random --retentions 1,0.25,0.1 --out OUT

See `bench/convert_mcq.py` to make a manifest from an MVBench / Video-MME style multiple-choice layout, and
`python -m bench.synthetic_qa OUT test 50` for a synthetic one.
"""
from __future__ import annotations

import csv
import json
import re
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

DEFAULT_TEMPLATE = "{question} options : {options} ."


@dataclass
class EvalItem:
    uri: str
    question: str
    prompt: str
    answer: str            # the correct option's text (letters resolved)
    options: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def read_manifest(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {i} is not JSON: {e}") from None
    return rows


def resolve_answer(answer: str, options: list[str]) -> str:
    """An answer given as a letter (A, B, ...) becomes that option's text."""
    a = str(answer).strip()
    if options and a not in options and len(a) == 1 and a.upper() in string.ascii_uppercase[:len(options)]:
        return options[string.ascii_uppercase.index(a.upper())]
    return a


def format_prompt(question: str, options: list[str], template: str) -> str:
    if not options or ("{options}" not in template and "{letters}" not in template):
        return template.format(question=question, options="", letters="").strip()
    letters = " ".join(f"({string.ascii_uppercase[i]}) {o}" for i, o in enumerate(options))
    return template.format(question=question, options=" , ".join(options), letters=letters)


def load_items(manifest: str, template: str = DEFAULT_TEMPLATE) -> list[EvalItem]:
    from pipeline.discover import resolve_relative

    items = []
    for i, row in enumerate(read_manifest(manifest), 1):
        for key in ("uri", "question", "answer"):
            if row.get(key) in (None, ""):
                raise ValueError(f"{manifest} row {i} has no {key!r}")
        options = [str(o) for o in (row.get("options") or [])]
        uri = str(row["uri"])
        if "://" not in uri and not uri.startswith("/"):
            uri = str(Path(resolve_relative(uri, str(Path(manifest).resolve()))))
        extra = {k: v for k, v in row.items() if k not in ("uri", "question", "options", "answer")}
        items.append(EvalItem(uri=uri, question=str(row["question"]), answer=resolve_answer(row["answer"], options),
                              prompt=format_prompt(str(row["question"]), options, template), options=options,
                              extra=extra))
    return items


def is_correct(text: Optional[str], item: EvalItem) -> bool:
    from bench.qa_scoring import match_option, normalize_answer

    if normalize_answer(text) == normalize_answer(item.answer):
        return True
    if item.options:
        picked = match_option(text, item.options)
        if picked is None:  # a bare letter, "(B)", "B."
            m = re.fullmatch(r"\(?([A-Za-z])\)?[.:]?", (text or "").strip())
            if m and m.group(1).upper() in string.ascii_uppercase[:len(item.options)]:
                picked = item.options[string.ascii_uppercase.index(m.group(1).upper())]
        return picked == item.answer
    return False


def cli_command(manifest: str, model: str, out: str, method: str, retention: float, extra: dict) -> str:
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in extra.items())
    return (f"framescribe run --input {manifest} --output {out} --model {model} --task qa "
            f"--pruner {method} --retention {retention:g} {flags}").strip()


def run_case(manifest: str, model: str, out: str, method: str, retention: float, run_kw: dict):
    from pipeline.config import RunConfig
    from pipeline.output import read_rows
    from pipeline.run import run_pipeline

    cfg = RunConfig(input=manifest, output=out, model=model, task="qa", pruner=method, retention=retention,
                    overwrite=True, **run_kw)
    summary = run_pipeline(cfg)
    rows = read_rows(out, columns=["uri", "prompt", "text", "status", "error_type", "visual_tokens_kept",
                                   "visual_tokens_full"]).to_pylist()
    return summary, rows


def evaluate(manifest: str, *, model: str, out: str, methods: list[str], retentions: list[float],
             template: str = DEFAULT_TEMPLATE, num_frames: int = 16, max_new_tokens: int = 16, batch_size: int = 8,
             seed: int = 0, iwp: dict | None = None, log=print) -> list[dict]:
    import ray

    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    items = load_items(manifest, template)
    pm = outp / "pipeline_manifest.jsonl"
    with open(pm, "w") as f:
        for it in items:
            f.write(json.dumps({"uri": it.uri, "question": it.prompt}) + "\n")
    by_key = {}
    for it in items:
        by_key.setdefault((it.uri, it.prompt), it)
    run_kw = dict(num_frames=num_frames, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                  **{f"iwp_{k}" if k != "lam" else "iwp_lambda": v for k, v in (iwp or {}).items()})
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    results, details = [], []
    for method in methods:
        for r in retentions:
            if method == "none" and r < 1.0:
                continue
            case_out = str(outp / "runs" / f"{method}@{r:g}")
            log(f"$ {cli_command(str(pm), model, case_out, method, r, run_kw)}")
            t0 = time.perf_counter()
            _summary, rows = run_case(str(pm), model, case_out, method, r, run_kw)
            seen = {}
            for row in rows:
                it = by_key.get((row["uri"], row["prompt"]))
                if it is not None:
                    seen[(row["uri"], row["prompt"])] = row
            correct, by_type = [], {}
            for key, it in by_key.items():
                row = seen.get(key)
                ok = bool(row and row["status"] == "ok" and is_correct(row["text"], it))
                correct.append(ok)
                qt = str(it.extra.get("qtype", ""))
                by_type.setdefault(qt, []).append(ok)
                details.append({"method": method, "retention": r, "uri": it.uri, "prompt": it.prompt,
                                "answer": it.answer, "text": row["text"] if row else None,
                                "status": row["status"] if row else "missing", "correct": ok, **it.extra})
            kept = [row["visual_tokens_kept"] for row in rows if row["status"] == "ok"]
            full = [row["visual_tokens_full"] for row in rows if row["status"] == "ok"]
            res = {"method": method, "retention": r, "questions": len(correct),
                   "accuracy": sum(correct) / max(1, len(correct)),
                   "errors": sum(1 for row in rows if row["status"] != "ok"),
                   "missing": len(by_key) - len(seen),
                   "kept_tokens": sum(kept) / max(1, len(kept)), "full_tokens": sum(full) / max(1, len(full)),
                   "seconds": round(time.perf_counter() - t0, 1),
                   "by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items()) if k}}
            results.append(res)
            log(f"  {method} @ {r:g}: accuracy {res['accuracy']:.3f} over {res['questions']} questions "
                f"({res['errors']} errors, {res['missing']} missing, {res['seconds']}s)")
    base = next((x for x in results if x["method"] == "none"), None)
    for x in results:
        x["rel_accuracy"] = x["accuracy"] / base["accuracy"] if base and base["accuracy"] else None
    _write(outp, results, details)
    return results


def _write(outp: Path, results: list[dict], details: list[dict]) -> None:
    cols = ["method", "retention", "questions", "accuracy", "rel_accuracy", "errors", "missing", "kept_tokens",
            "full_tokens", "seconds"]
    with open(outp / "eval_accuracy.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    with open(outp / "eval_by_type.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "retention", "qtype", "accuracy"])
        for x in results:
            for k, v in x["by_type"].items():
                w.writerow([x["method"], x["retention"], k, v])
    with open(outp / "eval_results.jsonl", "w") as f:
        for d in details:
            f.write(json.dumps(d, default=str) + "\n")
    (outp / "eval.md").write_text(markdown_table(results) + "\n")


def markdown_table(results: list[dict]) -> str:
    from bench.quality import accuracy_table

    return accuracy_table([{**r, "loglik_accuracy": None} for r in results], "accuracy")


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Accuracy of pipeline runs (method x retention) on a QA manifest.")
    ap.add_argument("manifest")
    ap.add_argument("--model", default=None, help="model directory (default: the shipped synthetic-QA model)")
    ap.add_argument("--out", default="bench-out/eval")
    ap.add_argument("--methods", default="none,iwp,random,uniform")
    ap.add_argument("--retentions", default="1,0.25,0.1")
    ap.add_argument("--prompt-template", default=DEFAULT_TEMPLATE)
    ap.add_argument("--num-frames", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    model = a.model
    if model is None:
        from bench.quality import default_model

        model = default_model()
    res = evaluate(a.manifest, model=model, out=a.out, methods=[m.strip() for m in a.methods.split(",") if m.strip()],
                   retentions=[float(x) for x in a.retentions.split(",") if x.strip()], template=a.prompt_template,
                   num_frames=a.num_frames, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, seed=a.seed)
    print(markdown_table(res))


if __name__ == "__main__":
    main()
