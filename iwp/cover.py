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
from dataclasses import dataclass

import torch

from .layout import TokenLayout
from .metric import DenseDuplication, TokenFeatures, duplication_matrix, token_features
from .select import DUP_FORMS, chunk_floor, mmr_score, normalized_magnitude, split_proportional
from .settings import IWPSettings

_FIXED_POINT = float(1 << 40)
_TAKEN = -(1 << 62)  # the gain of a taken candidate
_FULL_MATRIX_ELEMENTS = 1 << 26  # up to 8192 tokens the (N, N) matrix (256 MB) is built once, symmetric


def duplication_kernel(feats: TokenFeatures, form: str = "matrix"):
    """Blocks of the video's duplication matrix: matrix form (`DenseDuplication`) or the elementwise reference."""
    if form == "matrix":
        return DenseDuplication(feats)
    if form == "elementwise":
        return ElementwiseDuplication(feats)
    raise ValueError(f"form must be one of {DUP_FORMS}, got {form!r}")


class ElementwiseDuplication:
    """The reference: `duplication_matrix` on the tokens of one video, with DenseDuplication's `block` API."""

    def __init__(self, feats: TokenFeatures):
        self.feats = feats

    def block(self, rows=slice(None), cols=slice(None)) -> torch.Tensor:
        return duplication_matrix(self.feats.take(rows), self.feats.take(cols))


def token_novelty(feats: TokenFeatures, layout: TokenLayout, kernel=None) -> torch.Tensor:
    """(N,) 1 − max duplication with any token of an earlier temporal group, clamped to [0, 1]; 1 in group 0."""
    kernel = kernel or duplication_kernel(feats)
    novelty = torch.ones(layout.n_tokens, device=feats.keys.device)
    starts = layout.chunk_starts()
    for start, size in zip(starts[1:], layout.chunk_sizes[1:]):
        dup = kernel.block(slice(start, start + size), slice(0, start))
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


def chunk_budgets(layout: TokenLayout, budget: int, settings: IWPSettings, novelty) -> list[int]:
    """Picks per temporal group: the floor, then the rest ∝ novelty mass ("novelty") or group size ("size").

    `novelty` is the (N,) tensor or a callable giving it, called only when there is a rest to split."""
    f = chunk_floor(budget, layout.n_chunks, settings.floor)
    base = [min(f, size) for size in layout.chunk_sizes]
    rest = budget - sum(base)
    if rest == 0:  # the shipped floor 1.0 with T | K: an even split, no novelty needed
        return base
    if settings.chunk_budget == "novelty":
        novelty = novelty() if callable(novelty) else novelty
        starts = layout.chunk_starts()
        weights = [float(novelty[s:s + n].sum()) for s, n in zip(starts, layout.chunk_sizes)]
    else:
        weights = [float(n) for n in layout.chunk_sizes]
    caps = [size - b for size, b in zip(layout.chunk_sizes, base)]
    extra = split_capped(rest, weights, caps)
    return [b + e for b, e in zip(base, extra)]


@dataclass
class CoverSelection:
    keep: torch.Tensor  # sorted kept indices, exactly the budget
    duplication: torch.Tensor | None  # the (N, N) duplication matrix when one was built (the compensation reuses it)


def select_tokens_cover(
    keys: torch.Tensor, values: torch.Tensor, layout: TokenLayout, budget: int, settings: IWPSettings = IWPSettings(),
    *, form: str = "matrix",
) -> torch.Tensor:
    """Sorted kept indices, exactly `budget`: per temporal group (in time order) its share of the budget, picked
    by coverage gain or MMR against everything kept so far (earlier groups included).

    `form` is how the duplication kernel is computed: "matrix" (default; one (N, N) matrix, symmetric, from
    matrix products, when it fits in `_FULL_MATRIX_ELEMENTS`, else one (N, group) block per group) or
    "elementwise" (the reference). Picks of the two differ only where two gains tie to float rounding.
    """
    return cover_selection(keys, values, layout, budget, settings, form=form).keep


def cover_selection(
    keys: torch.Tensor, values: torch.Tensor, layout: TokenLayout, budget: int, settings: IWPSettings = IWPSettings(),
    *, form: str = "matrix",
) -> CoverSelection:
    """`select_tokens_cover`, also returning the duplication matrix it built (None when it built blocks)."""
    n = layout.n_tokens
    if not 0 <= budget <= n:
        raise ValueError(f"budget must be in [0, {n}], got {budget}")
    feats = token_features(keys, values, settings)
    kernel = duplication_kernel(feats, form)
    full = kernel.full() if form == "matrix" and n * n <= _FULL_MATRIX_ELEMENTS else None
    if full is not None:
        kernel = _Sliced(full)
    if settings.chunk_budget == "global":
        groups = [(0, n, budget)]
    else:
        novelty = lambda: token_novelty(feats, layout, kernel)  # noqa: E731 (only when the budget has a rest to split)
        per_chunk = (chunk_budgets(layout, budget, settings, novelty) if settings.chunk_budget != "floor" else
                     [min(chunk_floor(budget, layout.n_chunks, settings.floor), size) for size in layout.chunk_sizes])
        groups = [(s, s + size, k) for s, size, k in zip(layout.chunk_starts(), layout.chunk_sizes, per_chunk)]
        if settings.chunk_budget == "floor":  # the rest of the budget: picked from the whole video
            groups.append((0, n, budget - sum(per_chunk)))
    taken = torch.zeros(n, dtype=torch.bool, device=feats.keys.device)
    if settings.selection == "cover":
        _cover_groups(kernel, full, groups, taken)
    else:
        _mmr_groups(kernel, groups, taken, normalized_magnitude(feats.log_magnitude, settings), settings)
    return CoverSelection(torch.nonzero(taken).flatten(), full)


def _cover_groups(kernel, full: torch.Tensor | None, groups, taken: torch.Tensor) -> None:
    """Greedy facility location per (start, end, k) group, in fixed point; marks picks in `taken` (N,)."""
    cover = torch.zeros(taken.numel(), dtype=torch.long, device=taken.device)  # max dup of each token with the kept
    full_q = None if full is None else fixed_point(full.clamp_min(0.0))  # converted once, not per group
    for start, end, k in groups:
        if k == 0:
            continue
        if full_q is not None:  # symmetric: the (token x candidate) view is a column slice, rows contiguous
            cover = _greedy_cover(full_q[start:end], cover, taken[start:end], k, full_q[:, start:end])
        else:
            dup_t = kernel.block(slice(start, end), slice(None)).clamp_min(0.0)  # (chunk, N): candidate x token
            cover = _greedy_cover(fixed_point(dup_t), cover, taken[start:end], k)


def _mmr_groups(kernel, groups, taken: torch.Tensor, mhat: torch.Tensor, settings: IWPSettings) -> None:
    """MMR per group (magnitude − own max duplication with the kept set); marks picks in `taken` (N,)."""
    cover = torch.zeros(taken.numel(), device=taken.device)  # max duplication of each token with the kept set
    for start, end, k in groups:
        if k == 0:
            continue
        dup = kernel.block(slice(start, end), slice(None)).clamp_min(0.0).T  # (N, chunk): dup is symmetric
        for _ in range(k):
            score = mmr_score(mhat[start:end], cover[start:end], settings)
            j = int(score.masked_fill(taken[start:end], float("-inf")).argmax())
            taken[start + j] = True
            cover = torch.maximum(cover, dup[:, j])


class _Sliced:
    """A precomputed (N, N) duplication matrix behind the `block` API."""

    def __init__(self, full: torch.Tensor):
        self.full = full

    def block(self, rows=slice(None), cols=slice(None)) -> torch.Tensor:
        return self.full[rows][:, cols]


def _greedy_cover(dup_t: torch.Tensor, cover: torch.Tensor, taken: torch.Tensor, k: int,
                  dup: torch.Tensor | None = None) -> torch.Tensor:
    """k greedy facility-location picks among the rows of dup_t (C candidates, N tokens; fixed point), marked in
    `taken` (C,) in place; returns the new cover (N,). `dup`: dup_t.T with contiguous rows, when the caller has it.

    A candidate's gain Σ_n max(dup[j, n] − cover[n], 0) is kept up to date instead of recomputed: a pick
    raises the cover only of the tokens it covers better, from old to new, and each such token's term drops by
    clamp(dup, old, new) − old. In fixed point every sum is exact: a candidate with nothing left to cover has
    gain exactly 0, as a recomputed sum would, and ties (exact copies, all-covered candidates) go to the first index.
    """
    cover = cover.clone()
    gain = (dup_t - cover).clamp_min_(0).sum(1)
    gain[taken] = _TAKEN  # far below any gain, and stays so whatever is subtracted later
    dup = dup_t.T.contiguous() if dup is None else dup  # gathered by rows below: contiguous rows, not strided columns
    for _ in range(k):
        j = int(gain.argmax())  # first index on ties: the earlier token
        gain[j] = _TAKEN
        column = dup_t[j]
        rows = torch.nonzero(column > cover).flatten()
        raised = column[rows]
        drop = dup[rows]  # clamp(dup, old, new) − old = max(min(dup, new) − old, 0), in place on one gathered copy
        torch.minimum(drop, raised[:, None], out=drop)
        gain -= drop.sub_(cover[rows, None]).clamp_min_(0).sum(0)
        cover[rows] = raised
    taken |= gain < _TAKEN // 2
    return cover


def fixed_point(dup: torch.Tensor) -> torch.Tensor:
    """Duplications in [0, 1] as int64 units of 2^-40: coverage sums over any video are exact (N·2^40 << 2^63)."""
    return (dup * _FIXED_POINT).round_().long()
