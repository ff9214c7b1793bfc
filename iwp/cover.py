"""Temporal coverage selection: the first temporal group is the basis, later groups add their novelty.

With mass compensation every pruned token is counted in the kept token it duplicates most, so what the LLM
sees is W_seen = Σ_i m_i v_i φ(k_i)ᵀ and the error is small when every pruned token has a near-copy among the
kept ones. Two parts, each an option of `IWPSettings` so it can be ablated:

* `chunk_budget="novelty"`: a token's novelty is 1 − its highest duplication with any token of an earlier
  temporal group (the first group is all novel: the basis); after the per-chunk floor, the budget is split over
  the groups in proportion to their novelty mass (a static video keeps its first group, a changing one follows
  the changes). `"size"` splits it in proportion to group size (the uniform ablation).
* `selection="cover"`: inside a group, greedy facility location on the IWP kernel, the pick that most raises
  Σ_n max_{i∈S} dup(n, i) over every token n of the video (coverage: what the assignment of the bias uses),
  instead of MMR's magnitude − max duplication (`selection="pcmmr"`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .layout import TokenLayout
from .metric import TokenFeatures, duplication_matrix, token_features
from .select import chunk_floor, mmr_score, normalized_magnitude, split_proportional
from .settings import IWPSettings


def token_novelty(feats: TokenFeatures, layout: TokenLayout) -> torch.Tensor:
    """(N,) 1 − max duplication with any token of an earlier temporal group, clamped to [0, 1]; 1 in group 0."""
    novelty = torch.ones(layout.n_tokens, device=feats.keys.device)
    starts = layout.chunk_starts()
    for start, size in zip(starts[1:], layout.chunk_sizes[1:]):
        dup = duplication_matrix(feats.take(slice(start, start + size)), feats.take(slice(0, start)))
        novelty[start:start + size] = (1.0 - dup.max(dim=1).values).clamp(0.0, 1.0)
    return novelty


def split_capped(budget: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Split `budget` ∝ weights (largest remainder), never above a group's cap; overflow goes to the others."""
    shares = [0] * len(caps)
    left = budget
    open_groups = [g for g in range(len(caps)) if caps[g] > 0]
    while left > 0 and open_groups:
        total = sum(max(weights[g], 0.0) for g in open_groups)
        w = [max(weights[g], 0.0) if total > 0 else 1.0 for g in open_groups]
        scale = 1_000_000
        ints = [max(1, round(x / max(sum(w), 1e-12) * scale)) for x in w]
        parts = split_proportional(left, ints)
        for g, k in zip(open_groups, parts):
            add = min(k, caps[g] - shares[g])
            shares[g] += add
            left -= add
        open_groups = [g for g in open_groups if shares[g] < caps[g]]
    return shares


def chunk_budgets(layout: TokenLayout, budget: int, settings: IWPSettings, novelty: torch.Tensor | None) -> list[int]:
    """Picks per temporal group: the floor, then the rest ∝ novelty mass ("novelty") or group size ("size")."""
    f = chunk_floor(budget, layout.n_chunks, settings.floor)
    base = [min(f, size) for size in layout.chunk_sizes]
    if settings.chunk_budget == "novelty":
        starts = layout.chunk_starts()
        weights = [float(novelty[s:s + n].sum()) for s, n in zip(starts, layout.chunk_sizes)]
    else:
        weights = [float(n) for n in layout.chunk_sizes]
    caps = [size - b for size, b in zip(layout.chunk_sizes, base)]
    extra = split_capped(budget - sum(base), weights, caps)
    return [b + e for b, e in zip(base, extra)]


def select_tokens_cover(
    keys: torch.Tensor, values: torch.Tensor, layout: TokenLayout, budget: int, settings: IWPSettings = IWPSettings()
) -> torch.Tensor:
    """Sorted kept indices, exactly `budget`: per temporal group (in time order) its share of the budget, picked
    by coverage gain or MMR against everything kept so far (earlier groups included)."""
    n = layout.n_tokens
    if not 0 <= budget <= n:
        raise ValueError(f"budget must be in [0, {n}], got {budget}")
    feats = token_features(keys, values, settings)
    novelty = token_novelty(feats, layout) if settings.chunk_budget == "novelty" else None
    if settings.chunk_budget == "global":
        groups = [(0, n, budget)]
    else:
        per_chunk = (chunk_budgets(layout, budget, settings, novelty) if settings.chunk_budget != "floor" else
                     [min(chunk_floor(budget, layout.n_chunks, settings.floor), size) for size in layout.chunk_sizes])
        groups = [(s, s + size, k) for s, size, k in zip(layout.chunk_starts(), layout.chunk_sizes, per_chunk)]
        if settings.chunk_budget == "floor":  # the rest of the budget: picked from the whole video
            groups.append((0, n, budget - sum(per_chunk)))
    device = feats.keys.device
    cover = torch.zeros(n, device=device)  # max duplication of each token with the kept set (0: nothing kept)
    mhat = normalized_magnitude(feats.log_magnitude, settings)
    taken = torch.zeros(n, dtype=torch.bool, device=device)
    for start, end, k in groups:
        if k == 0:
            continue
        dup = duplication_matrix(feats, feats.take(slice(start, end))).clamp_min(0.0)  # (N, chunk): token x candidate
        for _ in range(k):
            if settings.selection == "cover":
                score = (dup - cover[:, None]).clamp_min(0.0).sum(0)  # coverage gain of each candidate
            else:
                score = mmr_score(mhat[start:end], cover[start:end], settings)  # penalty: own max dup with kept
            score = score.masked_fill(taken[start:end], float("-inf"))
            j = int(score.argmax())  # first index on ties: the earlier token
            taken[start + j] = True
            cover = torch.maximum(cover, dup[:, j])
    return torch.nonzero(taken).flatten()

