"""Does the vision skip cost accuracy? The same QA benchmark as `bench quality`, run twice on the same
questions: clips encoded with every temporal group through the tower, and with the vision skip (repeated
groups reuse the last encoded group's embeddings). Per pruning case: both accuracies, the paired difference
(skip − no skip) with its paired-bootstrap 95 % interval, and the share of temporal groups skipped.

    python -m bench.skip_quality --videos 100 --cases iwp@0.25,none@1 --thresholds 1,5
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from actors.vision_skip import DEFAULT_SKIP_THRESHOLD
from bench.quality import accuracy_rows, default_model, encode_clips, load_qa, paired_ci, print_tsv, verdict, write_csv

COLUMNS = ("method", "retention", "threshold", "videos", "questions", "groups", "groups_encoded",
           "groups_skipped_share", "score", "no_skip", "skip", "diff", "ci_lo", "ci_hi", "skip_is", "answer_changed")


def parse_cases(text: str) -> list[tuple[str, float]]:
    """"iwp@0.25,none@1" → [("iwp", 0.25), ("none", 1.0)]."""
    out = []
    for item in text.split(","):
        method, _, r = item.strip().partition("@")
        out.append((method, float(r or 1.0)))
    return out


def skip_quality(model: str, videos: int, cases: list[tuple[str, float]], thresholds: list[float], seed: int = 0,
                 per_clip: int = 3, fmt: str = "mc", bootstrap: int = 2000, threads: int | None = None,
                 log=print) -> list[dict]:
    from iwp import IWPSettings

    qa = load_qa(model, threads)
    settings = IWPSettings(seed=seed)
    runs, groups = {}, {}
    for skip in (None, *thresholds):
        qa.adapter.skip_threshold = skip
        t0 = time.perf_counter()
        encoded, items = encode_clips(qa, "test", videos, seed, per_clip, fmt, count_every=1)
        groups[skip] = (sum(v.layout.n_chunks for v in encoded),
                        sum(v.meta.get("groups_encoded", v.layout.n_chunks) for v in encoded))
        log(f"encoded {videos} clips (skip {skip}): {groups[skip][1]}/{groups[skip][0]} groups "
            f"in {time.perf_counter() - t0:.0f}s")
        per_question: dict = {}
        accuracy_rows(qa, encoded, items, cases, settings, seed, log=log, per_question=per_question)
        runs[skip] = per_question
    rows = []
    for threshold, case in ((t, c) for t in thresholds for c in cases):
        total, encoded_groups = groups[threshold]
        a, b = runs[threshold][case], runs[None][case]
        changed = float(np.mean([x["text"] != y["text"] for x, y in zip(a, b)]))
        for score in ("correct", "loglik_correct"):
            sa = np.array([x[score] for x in a], dtype=float)
            sb = np.array([x[score] for x in b], dtype=float)
            diff, lo, hi = paired_ci(sa, sb, bootstrap, seed)
            rows.append({"method": case[0], "retention": case[1], "threshold": threshold, "videos": videos,
                         "questions": len(a), "groups": total, "groups_encoded": encoded_groups,
                         "groups_skipped_share": round(1 - encoded_groups / total, 4),
                         "score": "accuracy" if score == "correct" else "loglik_accuracy",
                         "no_skip": round(float(sb.mean()), 4), "skip": round(float(sa.mean()), 4),
                         "diff": round(diff, 4), "ci_lo": round(lo, 4), "ci_hi": round(hi, 4),
                         "skip_is": verdict(lo, hi), "answer_changed": round(changed, 4)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the shipped trained tiny model")
    p.add_argument("--videos", type=int, default=100)
    p.add_argument("--per-clip", type=int, default=3)
    p.add_argument("--cases", default="iwp@0.25,none@1", help="method@retention, comma-separated")
    p.add_argument("--thresholds", default=str(DEFAULT_SKIP_THRESHOLD), help="comma-separated skip thresholds")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-out/skip-quality"))
    a = p.parse_args()
    thresholds = [float(x) for x in a.thresholds.split(",")]
    if a.videos < 1 or min(thresholds) < 0:
        p.error("--videos must be >= 1 and every threshold >= 0")
    rows = skip_quality(a.model or default_model(), a.videos, parse_cases(a.cases), thresholds, a.seed,
                        a.per_clip, bootstrap=a.bootstrap, threads=a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    path = write_csv(a.out / "skip_quality.csv", rows, COLUMNS)
    (a.out / "config.json").write_text(json.dumps({k: str(v) for k, v in vars(a).items()}, indent=2))
    print_tsv(rows, COLUMNS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
