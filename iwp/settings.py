"""Knobs of IWP scoring and PC-MMR selection; every default is a value to measure, not a given."""

from __future__ import annotations

from dataclasses import dataclass

CHUNKINGS = ("temporal", "fixed")
HEAD_AGGS = ("mean", "frobenius")
SCORES = ("mmr", "magnitude", "duplication")
MAGNITUDE_NORMS = ("max", "rank")
SELECTIONS = ("pcmmr", "cover")
CHUNK_BUDGETS = ("floor", "novelty", "size", "global")


@dataclass(frozen=True)
class IWPSettings:
    lam: float = 0.3  # MMR trade-off λ: weight of magnitude against duplication (0.3: docs/benchmarks.md, Quality)
    temperature: float = 1.0  # τ: the kernel uses τ·√d instead of √d (tames large key norms)
    floor: float = 1.0  # per-chunk floor as a fraction of an even share K/T; 0 disables (1.0: validation, issue 13b)
    chunking: str = "temporal"  # "temporal" (chunk = temporal group) | "fixed" (paper-style fixed-size chunks)
    fixed_chunk_size: int = 64  # tokens per chunk when chunking == "fixed"
    head_agg: str = "mean"  # "mean" of per-head log m and dup (cheap) | "frobenius" (exact for the stacked heads)
    score: str = "mmr"  # "mmr" | "magnitude" (λ=1 ablation) | "duplication" (λ=0 ablation)
    magnitude_norm: str = "max"  # "max": exp(log m − max log m) | "rank": rank-normalised to [0, 1]
    selection: str = "cover"  # in a chunk: "pcmmr" (magnitude − duplication) | "cover" (coverage gain, iwp.cover)
    chunk_budget: str = "novelty"  # "floor" (+ global remainder) | "novelty" | "size" (∝ group) | "global" (no chunks)
    seed: int = 0  # seeds every sampled quantity (residual estimate, random baseline)

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {self.floor}")
        if self.fixed_chunk_size < 1:
            raise ValueError(f"fixed_chunk_size must be >= 1, got {self.fixed_chunk_size}")
        for name, allowed in (
            ("chunking", CHUNKINGS),
            ("head_agg", HEAD_AGGS),
            ("score", SCORES),
            ("magnitude_norm", MAGNITUDE_NORMS),
            ("selection", SELECTIONS),
            ("chunk_budget", CHUNK_BUDGETS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
