"""Token pruning methods behind one interface: (embeddings, layout, budget) → kept indices.

Every method keeps exactly `budget` tokens and returns their indices sorted (original order).
Merging methods (visionzip, dycoke) also return the merged (K, D) embeddings; a merged token
takes its anchor's (kept token's) position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .cover import cover_selection
from .layout import TokenLayout
from .metric import relative_residual
from .registry import PRUNERS
from .select import select_tokens_pcmmr
from .settings import IWPSettings

VISIONZIP_DOMINANT_FRACTION = 0.8  # share of the budget kept as dominant tokens; the rest are merged contexts
_ATTENTION_BLOCK_ELEMENTS = 1 << 22  # bound on one block of the proxy attention matrix


@dataclass
class PruneResult:
    keep: torch.Tensor  # sorted kept indices into the N visual tokens, length == budget
    embeds: torch.Tensor | None = None  # (K, D) merged embeddings (merging methods); None = gather originals
    residual: float | None = None  # IWP relative residual ‖W − W_S‖²/‖W‖² when computed
    duplication: torch.Tensor | None = None  # (N, N) IWP duplication when the selection built it (compensation reuses it)


def _evenly_spaced(count: int, n: int, device=None) -> torch.Tensor:
    """`count` distinct indices spread over range(n), each at the centre of its stride."""
    if count <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    return ((torch.arange(count, dtype=torch.float64, device=device) + 0.5) * (n / count)).floor().long()


def _stable_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    # Highest scores first, ties to the lower index (topk's tie order is unspecified).
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def _default_generator(generator: torch.Generator | None, settings: IWPSettings) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(settings.seed)


def _prune_random(n: int, budget: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randperm(n, generator=generator)[:budget].to(device)


def _pooled_grid(budget: int, h: int, w: int) -> tuple[int, int]:
    """Smallest-ish (gh, gw) grid with gh·gw >= budget and the aspect of (h, w)."""
    gh = min(h, max(1, round(math.sqrt(budget * h / w))))
    gw = min(w, max(1, math.ceil(budget / gh)))
    while gh * gw < budget:
        if gw < w:
            gw += 1
        else:
            gh += 1
    return gh, gw


def _prune_downsample(layout: TokenLayout, budget: int, device) -> torch.Tensor:
    n, t = layout.n_tokens, layout.n_chunks
    if layout.grid_hw is None:
        return _evenly_spaced(budget, n, device)  # no grid to pool: strided over the sequence
    h, w = layout.grid_hw
    kept = []
    for chunk, start in enumerate(layout.chunk_starts()):
        share = (chunk + 1) * budget // t - chunk * budget // t  # even split, extras spread over time
        if share == 0:
            continue
        gh, gw = _pooled_grid(share, h, w)
        rows = _evenly_spaced(gh, h)  # token nearest each pooled cell centre: positions stay real
        cols = _evenly_spaced(gw, w)
        cells = (rows[:, None] * w + cols[None, :]).flatten()
        kept.append(start + cells[_evenly_spaced(share, cells.numel())])  # drop surplus cells evenly
    return torch.cat(kept).to(device)


def _prune_uniform(layout: TokenLayout, budget: int, device) -> torch.Tensor:
    sizes, t = layout.chunk_sizes, layout.n_chunks
    starts = layout.chunk_starts()
    n_keep = 1
    while sum(sizes[c] for c in _evenly_spaced(n_keep, t).tolist()) < budget:
        n_keep += 1
    kept, remaining = [], budget
    for c in _evenly_spaced(n_keep, t).tolist():
        take = min(sizes[c], remaining)
        if take == 0:
            break
        kept.append(starts[c] + _evenly_spaced(take, sizes[c]))  # a partial last chunk stays spatially spread
        remaining -= take
    return torch.cat(kept).to(device)


def _prune_divprune(embeds: torch.Tensor, budget: int) -> torch.Tensor:
    x = embeds.float()
    unit = F.normalize(x, dim=-1)
    first = int(torch.linalg.vector_norm(x, dim=-1).argmax())  # seeded start: the highest-norm token
    min_dist = 1.0 - unit @ unit[first]
    taken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    taken[first] = True
    picks = [first]
    for _ in range(budget - 1):
        j = int(min_dist.masked_fill(taken, float("-inf")).argmax())  # farthest from everything kept
        picks.append(j)
        taken[j] = True
        min_dist = torch.minimum(min_dist, 1.0 - unit @ unit[j])
    return torch.tensor(picks, dtype=torch.long, device=x.device)


def _received_attention(embeds: torch.Tensor) -> torch.Tensor:
    """Mean attention each token receives under softmax(E Eᵀ/√D), in row blocks."""
    x = embeds.float()
    n, d = x.shape
    block = max(1, _ATTENTION_BLOCK_ELEMENTS // n)
    received = torch.zeros(n, dtype=torch.float32, device=x.device)
    for start in range(0, n, block):
        received += torch.softmax(x[start : start + block] @ x.T / math.sqrt(d), dim=-1).sum(0)
    return received / n


def _merge_into_anchors(embeds: torch.Tensor, members: torch.Tensor, anchor_of: torch.Tensor) -> torch.Tensor:
    """Average every member token into its anchor token; returns (N, D) with the averages at anchors."""
    x = embeds.float()
    sums = x.clone()
    counts = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    sums.index_add_(0, anchor_of, x[members])
    counts.index_add_(0, anchor_of, torch.ones(members.shape[0], dtype=torch.float32, device=x.device))
    return sums / counts.unsqueeze(1)


def _merge_to_nearest(embeds: torch.Tensor, candidates: torch.Tensor, n_anchors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Evenly spaced anchors among `candidates`; the rest merge into their most cosine-similar anchor."""
    pos = _evenly_spaced(n_anchors, candidates.numel(), candidates.device)
    anchors = candidates[pos]
    is_anchor = torch.zeros(candidates.numel(), dtype=torch.bool, device=candidates.device)
    is_anchor[pos] = True
    members = candidates[~is_anchor]
    if members.numel() == 0 or anchors.numel() == 0:
        return anchors, embeds.float()
    unit = F.normalize(embeds.float(), dim=-1)
    nearest = (unit[members] @ unit[anchors].T).argmax(dim=1)
    return anchors, _merge_into_anchors(embeds, members, anchors[nearest])


def _prune_visionzip(embeds: torch.Tensor, budget: int, attn_scores: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    n = embeds.shape[0]
    scores = attn_scores.float() if attn_scores is not None else _received_attention(embeds)
    n_dominant = min(budget, max(1, math.ceil(VISIONZIP_DOMINANT_FRACTION * budget - 1e-9)))
    dominant = _stable_top(scores, n_dominant)
    rest = torch.ones(n, dtype=torch.bool, device=embeds.device)
    rest[dominant] = False
    contextual, merged = _merge_to_nearest(embeds, torch.nonzero(rest).flatten(), budget - n_dominant)
    keep = torch.sort(torch.cat([dominant, contextual])).values
    return keep, merged[keep].to(embeds.dtype)


def _prune_dycoke(embeds: torch.Tensor, layout: TokenLayout, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = embeds.shape[0]
    device = embeds.device
    sizes, starts = layout.chunk_sizes, layout.chunk_starts()
    # Each token of chunk t >= 1 faces the token at the same relative spatial position in chunk t−1.
    previous = torch.full((n,), -1, dtype=torch.long, device=device)
    for t in range(1, layout.n_chunks):
        pos = torch.arange(sizes[t], device=device) * sizes[t - 1] // sizes[t]
        previous[starts[t] : starts[t] + sizes[t]] = starts[t - 1] + pos
    unit = F.normalize(embeds.float(), dim=-1)
    has_previous = previous >= 0
    similarity = torch.full((n,), float("-inf"), device=device)
    similarity[has_previous] = (unit[has_previous] * unit[previous[has_previous]]).sum(-1)
    n_temporal = min(n - budget, int(has_previous.sum()))
    merged_away = torch.zeros(n, dtype=torch.bool, device=device)
    merged_away[_stable_top(similarity, n_temporal)] = True  # the most repeated tokens go first
    # Anchor = the nearest earlier kept token along the chain of same-position predecessors.
    anchor = torch.arange(n, device=device)
    for t in range(1, layout.n_chunks):
        chunk = slice(starts[t], starts[t] + sizes[t])
        anchor[chunk] = torch.where(merged_away[chunk], anchor[previous[chunk]], anchor[chunk])
    members = torch.nonzero(merged_away).flatten()
    merged = _merge_into_anchors(embeds, members, anchor[members])
    survivors = torch.nonzero(~merged_away).flatten()
    if survivors.numel() > budget:
        # Budget below the first chunk: merge survivors spatially into evenly spaced anchors.
        keep, merged = _merge_to_nearest(merged, survivors, budget)
    else:
        keep = survivors
    keep = torch.sort(keep).values
    return keep, merged[keep].to(embeds.dtype)


def _require_kv(method: str, keys, values, n: int) -> None:
    if keys is None or values is None:
        raise ValueError(f"{method!r} needs keys and values of shape (N, H, d) (first decoder layer's k/v projections)")
    if keys.shape[0] != n or values.shape[0] != n:
        raise ValueError(f"{method!r}: keys/values have {keys.shape[0]}/{values.shape[0]} tokens, expected {n}")


PCMMR = {"selection": "pcmmr", "chunk_budget": "floor", "floor": 0.25}  # the temporal IWP before issue 13b
IWP_VARIANTS = {
    "iwp": {},
    # MMR's λ = 1 / λ = 0 ablations (PC-MMR at the caller's floor)
    "iwp_magnitude": {"selection": "pcmmr", "chunk_budget": "floor", "score": "magnitude"},
    "iwp_duplication": {"selection": "pcmmr", "chunk_budget": "floor", "score": "duplication"},
    "iwp_fixed": {"chunking": "fixed"},  # paper-style fixed-size chunks (PC-MMR)
    "iwp_pcmmr": PCMMR,
}


def prune_tokens(
    method: str,
    embeds: torch.Tensor,
    layout: TokenLayout,
    budget: int,
    *,
    keys: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    attn_scores: torch.Tensor | None = None,
    settings: IWPSettings = IWPSettings(),
    generator: torch.Generator | None = None,
    with_residual: bool = True,
) -> PruneResult:
    """Keep exactly `budget` of the N visual tokens of one video with `method` (one of PRUNERS).

    with_residual=False skips IWP's uncompensated residual (a compensated caller measures its own)."""
    if method not in PRUNERS:
        raise ValueError(f"unknown pruning method {method!r}; expected one of {PRUNERS}")
    n = layout.n_tokens
    if embeds.dim() != 2 or embeds.shape[0] != n:
        raise ValueError(f"embeds must have shape ({n}, D), got {tuple(embeds.shape)}")
    if not 1 <= budget <= n:
        raise ValueError(f"budget must be in [1, {n}], got {budget}")
    if attn_scores is not None and attn_scores.shape != (n,):
        raise ValueError(f"attn_scores must have shape ({n},), got {tuple(attn_scores.shape)}")
    device = embeds.device

    if method == "none":
        if budget != n:
            raise ValueError(f"'none' keeps every token: budget must be {n}, got {budget}")
        return PruneResult(torch.arange(n, device=device))
    if method == "random":
        keep = _prune_random(n, budget, _default_generator(generator, settings), device)
    elif method == "downsample":
        keep = _prune_downsample(layout, budget, device)
    elif method == "uniform":
        keep = _prune_uniform(layout, budget, device)
    elif method == "divprune":
        keep = _prune_divprune(embeds, budget)
    elif method == "visionzip":
        keep, merged = _prune_visionzip(embeds, budget, attn_scores)
        return PruneResult(keep, merged)
    elif method == "dycoke":
        keep, merged = _prune_dycoke(embeds, layout, budget)
        return PruneResult(keep, merged)
    elif method == "fastv":
        if attn_scores is None:
            raise ValueError(
                "'fastv' needs attention scores: attn_scores = attention of the last text token to each "
                "visual token at an early LLM layer (eager attention)"
            )
        keep = _stable_top(attn_scores.float(), budget)
    else:
        _require_kv(method, keys, values, n)
        variant = replace(settings, **IWP_VARIANTS[method])
        duplication = None
        if variant.chunking == "temporal" and (variant.selection, variant.chunk_budget) != ("pcmmr", "floor"):
            selected = cover_selection(keys, values, layout, budget, variant)
            keep, duplication = selected.keep, selected.duplication
        else:
            keep = select_tokens_pcmmr(keys, values, layout, budget, variant)
        residual = relative_residual(keys, values, keep, variant, generator=generator) if with_residual else None
        return PruneResult(keep, residual=residual, duplication=duplication)
    return PruneResult(torch.sort(keep).values)
