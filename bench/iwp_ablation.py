"""Ablation of IWP's temporal selection on the VALIDATION split (never the test split): which part earns its place.

Every variant is IWP with some `IWPSettings` overrides (how the budget is split over temporal groups, how a group
picks its tokens), answered through the same seam as `bench quality` with the same compensation, and compared
with the reference variant over the same questions (paired bootstrap 95 % CI), on all questions and on the
questions that need time.

    python -m bench.iwp_ablation --videos 60 --retentions 0.25,0.1,0.05 --out docs/benchmarks/iwp-ablation
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from bench.quality import TEMPORAL_QTYPES, encode_clips, load_qa, paired_ci, write_csv

VARIANTS = {  # name → IWPSettings overrides; the first is the reference (the previous shipped IWP)
    "floor+pcmmr": {"chunk_budget": "floor", "selection": "pcmmr", "floor": 0.25},
    "novelty+pcmmr": {"chunk_budget": "novelty", "selection": "pcmmr", "floor": 0.25},
    "size+cover": {"chunk_budget": "size", "selection": "cover", "floor": 0.25},
    "floor+cover": {"chunk_budget": "floor", "selection": "cover", "floor": 0.25},
    "novelty+cover": {"chunk_budget": "novelty", "selection": "cover", "floor": 0.25},
    "global+cover": {"chunk_budget": "global", "selection": "cover"},
    # the floor interpolates between novelty (floor 0.25: a quarter of an even share per group) and size (1.0)
    "novelty+cover,floor0.5": {"chunk_budget": "novelty", "selection": "cover", "floor": 0.5},
    "novelty+cover,floor0.75": {"chunk_budget": "novelty", "selection": "cover", "floor": 0.75},
    "novelty+cover,floor1": {"chunk_budget": "novelty", "selection": "cover", "floor": 1.0},  # shipped
}


def run_ablation(model: str, videos: int, retentions, variants: dict, compensation: str, seed: int, per_clip: int,
                 out: Path, threads: Optional[int], bootstrap: int, log=print) -> list[dict]:
    from actors.splice import PruneSpec
    from bench.qa_scoring import answer_items
    from iwp import IWPSettings

    out.mkdir(parents=True, exist_ok=True)
    qa = load_qa(model, threads)
    encoded, items = encode_clips(qa, "val", videos, seed, per_clip, "mc", count_every=1)
    temporal = np.array([it.qtype in TEMPORAL_QTYPES for it in items])
    count = np.array([it.qtype == "count" for it in items])
    results: dict = {}
    rows = []
    ref = next(iter(variants))
    for r in retentions:
        for name, overrides in variants.items():
            t0 = time.process_time()
            spec = PruneSpec(method="iwp", retention=r, settings=replace(IWPSettings(seed=seed), **overrides),
                             seed=seed, compensation=compensation)
            res = answer_items(qa, encoded, items, spec, loglik=True)
            acc = np.array([x["correct"] for x in res], dtype=float)
            ll = np.array([x["loglik_correct"] for x in res], dtype=float)
            results[(name, r)] = acc
            row = {"variant": name, **overrides, "compensation": compensation, "retention": r,
                   "questions": len(res), "accuracy": acc.mean(), "loglik_accuracy": ll.mean(),
                   "temporal_accuracy": acc[temporal].mean(), "count_accuracy": acc[count].mean()}
            if name != ref:
                for subset, sel in (("all", slice(None)), ("temporal", temporal)):
                    d, lo, hi = paired_ci(acc[sel], results[(ref, r)][sel], bootstrap, seed)
                    row.update({f"diff_{subset}": d, f"ci_lo_{subset}": lo, f"ci_hi_{subset}": hi})
            rows.append(row)
            log(f"  {name:>15} @ {r:<5g} acc {row['accuracy']:.3f} temporal {row['temporal_accuracy']:.3f} "
                f"count {row['count_accuracy']:.3f} loglik {row['loglik_accuracy']:.3f} "
                f"({time.process_time() - t0:.0f} CPU s)")
    write_csv(out / "ablation.csv", rows)
    (out / "ablation.md").write_text(markdown(rows, ref, videos, per_clip, compensation, seed))
    return rows


def markdown(rows: list[dict], ref: str, videos: int, per_clip: int, compensation: str, seed: int) -> str:
    lines = [f"Validation split, {videos} clips x {per_clip} questions (one counting question per clip), seed {seed}, "
             f"compensation `{compensation}`; greedy exact match, %; difference to `{ref}` with a paired-bootstrap "
             "95 % CI over the same questions.", "",
             "| variant | retention | accuracy | temporal q. | count | loglik | − ref (all) | − ref (temporal) |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for x in rows:
        cells = []
        for subset in ("all", "temporal"):
            if f"diff_{subset}" in x:
                cells.append(f"{100 * x[f'diff_{subset}']:+.1f} ({100 * x[f'ci_lo_{subset}']:+.1f}, "
                             f"{100 * x[f'ci_hi_{subset}']:+.1f})")
            else:
                cells.append("(reference)")
        lines.append(f"| {x['variant']} | {x['retention']:g} | {100 * x['accuracy']:.1f} | "
                     f"{100 * x['temporal_accuracy']:.1f} | {100 * x['count_accuracy']:.1f} | "
                     f"{100 * x['loglik_accuracy']:.1f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(
    model: Optional[str] = typer.Option(None, help="trained model directory (default: the shipped one)"),
    videos: int = typer.Option(60, help="validation clips"),
    retentions: str = typer.Option("0.25,0.1,0.05"),
    variants: str = typer.Option(";".join(VARIANTS), help="';'-separated names from VARIANTS; the first is the reference"),
    compensation: str = typer.Option("bias"),
    seed: int = typer.Option(0),
    per_clip: int = typer.Option(3),
    threads: Optional[int] = typer.Option(None),
    bootstrap: int = typer.Option(2000),
    out: Path = typer.Option(Path("bench-out/iwp-ablation")),
):
    from bench.quality import default_model

    chosen = {}
    for v in (x.strip() for x in variants.split(";") if x.strip()):
        if v not in VARIANTS:
            raise typer.BadParameter(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}", param_hint="--variants")
        chosen[v] = VARIANTS[v]
    rows = run_ablation(model or default_model(), videos, [float(x) for x in retentions.split(",")], chosen,
                        compensation, seed, per_clip, out, threads, bootstrap)
    print(markdown(rows, next(iter(chosen)), videos, per_clip, compensation, seed))


if __name__ == "__main__":
    typer.run(main)
