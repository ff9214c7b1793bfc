"""Does the quality guard help at equal mean kept tokens? The `bench quality` QA benchmark (shipped trained
tiny model), IWP at its shipped defaults (compensation `auto` = bias) starting at retention r0: per threshold τ
the guard ON (`max_residual` τ, budget grown x1.5 up to `max_retention` until the residual of what the LLM sees
is <= τ), then the guard OFF at the one retention r̄ whose budget ceil(r̄ N) is the guard run's mean kept tokens
rounded to a whole token (every clip has the same N). Both answer the same questions; per τ: both accuracies
(greedy and option log-likelihood), the paired difference guard − no guard with its paired-bootstrap 95 %
interval, both sides' mean kept tokens and the share of videos whose budget the guard raised.

τ is chosen on the VALIDATION split: `--split val` only prunes (no answers) and prints the residual quantiles at
r0 and, per τ (default: the 50 / 65 / 80 % quantiles), the share of videos the guard would act on.

    python -m bench.guard_quality --split val --videos 100
    python -m bench.guard_quality --videos 300 --thresholds 0.1,0.2 --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.quality import (accuracy_rows, default_model, encode_clips, load_qa, paired_ci, print_tsv, parse_method,
                           repo_relative, verdict, write_csv)

METHOD = "iwp"  # the shipped pruner; parse_method resolves its default compensation (bias)
VAL_QUANTILES = (0.5, 0.65, 0.8)  # default τ: the guard acts on about 50 / 35 / 20 % of validation videos
COLUMNS = ("threshold", "r0", "max_retention", "videos", "questions", "full_tokens", "guard_acted_share",
           "guard_retention_mean", "guard_kept_mean", "matched_retention", "no_guard_kept", "kept_gap",
           "guard_residual_mean", "no_guard_residual_mean", "score", "guard", "no_guard", "diff", "ci_lo", "ci_hi",
           "guard_is", "answer_changed", "unpruned", "at_r0")
VAL_COLUMNS = ("threshold", "quantile", "r0", "max_retention", "videos", "acted_share", "retention_mean",
               "kept_mean")


def spec_for(retention: float, settings, seed: int, max_residual: float | None = None, max_retention: float = 1.0):
    from actors.splice import PruneSpec

    method, comp = parse_method(METHOD)
    return PruneSpec(method=method, retention=retention, settings=settings, seed=seed, compensation=comp,
                     max_residual=max_residual, max_retention=max_retention)


def single_token_count(encoded) -> int:
    """N, the visual tokens of every clip (the matched retention assumes one N)."""
    ns = {int(v.embeds.shape[0]) for v in encoded}
    if len(ns) != 1:
        raise ValueError(f"clips have different token counts {sorted(ns)}; the matched retention needs one N")
    return ns.pop()


def matched_retention(mean_kept: float, n: int) -> tuple[float, int]:
    """(r̄, k): the retention whose budget ceil(r̄ N) is k = the mean kept tokens rounded to a whole token."""
    k = min(n, max(1, round(mean_kept)))
    return k / n, k


def per_video(res: list[dict], items, key: str) -> dict[int, float]:
    """One value per video (every question of a video shares its pruning)."""
    return {it.video: x[key] for x, it in zip(res, items)}


def val_thresholds(model: str, videos: int, r0: float, thresholds: list[float] | None, max_retention: float,
                   seed: int = 0, per_clip: int = 3, fmt: str = "mc", threads: int | None = None, log=print
                   ) -> tuple[list[dict], dict]:
    """Validation only, no answers: the residual at r0 per video, and per τ the share of videos the guard acts on
    and the mean kept tokens it reaches."""
    from iwp import IWPSettings

    qa = load_qa(model, threads)
    settings = IWPSettings(seed=seed)
    encoded, _ = encode_clips(qa, "val", videos, seed, per_clip, fmt, count_every=1)
    n = single_token_count(encoded)
    resid = np.array([qa.prune(v, spec_for(r0, settings, seed)).residual for v in encoded])
    quantiles = {q: float(np.quantile(resid, q)) for q in (0.1, 0.25, 0.5, 0.65, 0.8, 0.9)}
    log(f"val residual at r0={r0:g} over {videos} clips (N={n}): " +
        ", ".join(f"q{100 * q:g} {v:.4f}" for q, v in quantiles.items()))
    chosen = thresholds or [round(quantiles[q], 4) for q in VAL_QUANTILES]
    rows = []
    for tau in chosen:
        pruned = [qa.prune(v, spec_for(r0, settings, seed, tau, max_retention)) for v in encoded]
        rows.append({"threshold": tau, "quantile": round(float(np.mean(resid <= tau)), 4), "r0": r0,
                     "max_retention": max_retention, "videos": videos,
                     "acted_share": round(float(np.mean([p.retention_used > r0 for p in pruned])), 4),
                     "retention_mean": round(float(np.mean([p.retention_used for p in pruned])), 4),
                     "kept_mean": round(float(np.mean([p.keep.numel() for p in pruned])), 2)})
        log(f"  τ={tau:g}: guard acts on {100 * rows[-1]['acted_share']:.0f} % of videos, "
            f"mean kept {rows[-1]['kept_mean']}/{n}")
    return rows, {"n_tokens": n, "residual_quantiles": quantiles}


def guard_quality(model: str, videos: int, r0: float, thresholds: list[float], max_retention: float = 0.5,
                  seed: int = 0, per_clip: int = 3, fmt: str = "mc", bootstrap: int = 2000,
                  threads: int | None = None, log=print) -> list[dict]:
    """Test split: per τ, guard on at r0 vs guard off at the retention matching its mean kept tokens."""
    from bench.qa_scoring import answer_items
    from iwp import IWPSettings

    qa = load_qa(model, threads)
    settings = IWPSettings(seed=seed)
    encoded, items = encode_clips(qa, "test", videos, seed, per_clip, fmt, count_every=1)
    n = single_token_count(encoded)
    per_question: dict = {}
    accuracy_rows(qa, encoded, items, [("none", 1.0), (METHOD, r0)], settings, seed, log=log,
                  per_question=per_question)
    reference = {k: per_question[k] for k in (("none", 1.0), (METHOD, r0))}
    rows = []
    for tau in thresholds:
        guard = answer_items(qa, encoded, items, spec_for(r0, settings, seed, tau, max_retention))
        kept = per_video(guard, items, "kept")
        used = per_video(guard, items, "retention_used")
        mean_kept = float(np.mean(list(kept.values())))
        r_bar, k = matched_retention(mean_kept, n)
        off = answer_items(qa, encoded, items, spec_for(r_bar, settings, seed))
        off_kept = set(per_video(off, items, "kept").values())
        assert off_kept == {k}, f"guard-off budget {off_kept} is not the matched {k}"
        acted = float(np.mean([u > r0 for u in used.values()]))
        log(f"  τ={tau:g}: guard acts on {100 * acted:.0f} % of videos, mean kept {mean_kept:.2f}/{n}; "
            f"no guard at r̄={r_bar:.4f} keeps {k}")
        changed = float(np.mean([a["text"] != b["text"] for a, b in zip(guard, off)]))
        common = {"threshold": tau, "r0": r0, "max_retention": max_retention, "videos": len(encoded),
                  "questions": len(guard), "full_tokens": n, "guard_acted_share": round(acted, 4),
                  "guard_retention_mean": round(float(np.mean(list(used.values()))), 4),
                  "guard_kept_mean": round(mean_kept, 3), "matched_retention": round(r_bar, 6), "no_guard_kept": k,
                  "kept_gap": round(k - mean_kept, 3),
                  "guard_residual_mean": round(float(np.mean(list(per_video(guard, items, "residual").values()))), 4),
                  "no_guard_residual_mean": round(float(np.mean(list(per_video(off, items, "residual").values()))), 4),
                  "answer_changed": round(changed, 4)}
        for score in ("correct", "loglik_correct"):
            sa = np.array([x[score] for x in guard], dtype=float)
            sb = np.array([x[score] for x in off], dtype=float)
            diff, lo, hi = paired_ci(sa, sb, bootstrap, seed)
            rows.append({**common, "score": "accuracy" if score == "correct" else "loglik_accuracy",
                         "guard": round(float(sa.mean()), 4), "no_guard": round(float(sb.mean()), 4),
                         "diff": round(diff, 4), "ci_lo": round(lo, 4), "ci_hi": round(hi, 4),
                         "guard_is": verdict(lo, hi),
                         **{name: round(float(np.mean([x[score] for x in reference[key]])), 4)
                            for name, key in (("unpruned", ("none", 1.0)), ("at_r0", (METHOD, r0)))}})
    return rows


def markdown(rows: list[dict], command: str) -> str:
    if not rows:
        return ""
    first = rows[0]
    lines = ["# Quality guard on vs off at equal mean kept tokens", "", f"Command: `{command}`", "",
             f"Test split, {first['videos']} clips, {first['questions']} questions, N = {first['full_tokens']} visual "
             f"tokens per clip; `{METHOD}` at its shipped defaults starting at r0 = {first['r0']:g} "
             f"(unguarded: {100 * first['at_r0']:.1f} % greedy), max retention {first['max_retention']:g}; "
             f"unpruned {100 * first['unpruned']:.1f} % greedy. Differences in points, paired bootstrap 95 % CI.", "",
             "| τ (max residual) | guard acts on | kept tokens guard / no guard (r̄) | greedy guard / no guard | "
             "guard − no guard | log-lik. guard / no guard | guard − no guard | answers changed |",
             "|---:|---:|---|---|---|---|---|---:|"]
    for tau in dict.fromkeys(r["threshold"] for r in rows):
        g = next(r for r in rows if r["threshold"] == tau and r["score"] == "accuracy")
        ll = next(r for r in rows if r["threshold"] == tau and r["score"] == "loglik_accuracy")
        cells = [f"{tau:g}", f"{100 * g['guard_acted_share']:.1f} %",
                 f"{g['guard_kept_mean']:.2f} / {g['no_guard_kept']} ({g['matched_retention']:.4f})"]
        for r in (g, ll):
            cells += [f"{100 * r['guard']:.1f} / {100 * r['no_guard']:.1f}",
                      f"{100 * r['diff']:+.1f} ({100 * r['ci_lo']:+.1f}, {100 * r['ci_hi']:+.1f}) {r['guard_is']}"]
        cells.append(f"{100 * g['answer_changed']:.1f} %")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the shipped trained tiny model")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="val: residual quantiles and the guard's reach, to choose τ (no answers)")
    p.add_argument("--videos", type=int, default=300)
    p.add_argument("--per-clip", type=int, default=3)
    p.add_argument("--r0", type=float, default=0.10, help="the guard's starting retention")
    p.add_argument("--max-retention", type=float, default=0.5)
    p.add_argument("--thresholds", default="", help="comma-separated τ (max residual); required on test")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/guard-quality"))
    a = p.parse_args(argv)
    thresholds = [float(x) for x in a.thresholds.split(",") if x.strip()]
    if a.videos < 2 or not 0 < a.r0 < a.max_retention <= 1 or any(t < 0 for t in thresholds):
        p.error("--videos must be >= 2, 0 < --r0 < --max-retention <= 1, every threshold >= 0")
    if a.split == "test" and not thresholds:
        p.error("--thresholds: choose τ on the validation split first (--split val)")
    model = a.model or default_model()
    a.out.mkdir(parents=True, exist_ok=True)
    config = {**{k: str(v) for k, v in vars(a).items()}, "model": repo_relative(model)}
    command = "python -m bench.guard_quality " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.split == "val":
        rows, info = val_thresholds(model, a.videos, a.r0, thresholds, a.max_retention, a.seed, a.per_clip,
                                    threads=a.threads)
        path = write_csv(a.out / "val.csv", rows, VAL_COLUMNS)
        (a.out / "val_config.json").write_text(json.dumps({**config, **info}, indent=2))
        columns = VAL_COLUMNS
    else:
        rows = guard_quality(model, a.videos, a.r0, thresholds, a.max_retention, a.seed, a.per_clip,
                             bootstrap=a.bootstrap, threads=a.threads)
        path = write_csv(a.out / "guard_quality.csv", rows, COLUMNS)
        (a.out / "guard_quality.md").write_text(markdown(rows, command))
        (a.out / "config.json").write_text(json.dumps(config, indent=2))
        columns = COLUMNS
    print_tsv(rows, columns)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
