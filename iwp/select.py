"""Token selection by Maximal Marginal Relevance on the IWP kernel.

score(j) = λ·m̂_j − (1 − λ)·max_{i∈S} dup(i, j)   (penalty 0 while S is empty)

`select_tokens_mmr_exact` is the naive dense oracle; `select_tokens_pcmmr[_batch]` is the fast
progressive chunked version: one duplication row per pick updates a running max-similarity
vector, so the N×N matrix is never built and earlier chunks' picks suppress later duplicates.

The row is computed in matrix form (form="matrix", the default): squared key distances from one
matrix product with centred keys, ‖k_i‖² + ‖k_j‖² − 2 k_i·k_j, and value cosines from the same
product, so a step's temporaries are (B, H, N) instead of (B, N, H, d). Exact copies of the picked
token (same keys and values bit for bit, e.g. the reused embeddings of a skipped vision group) get the
picked token's own duplication, exactly as the elementwise form (form="elementwise", the reference)
gives them. Elsewhere the two forms differ by float rounding (~1e-6), so picks differ only where two
candidates' scores tie to within that rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .layout import TokenLayout
from .metric import TokenFeatures, content_ids, duplication_matrix, pair_duplication, token_features
from .settings import IWPSettings

ANY_CHUNK = -1  # schedule entry: the pick may come from any chunk
NO_PICK = -2  # schedule entry: this video is done (batch padding)
PAD_TOKEN = -3  # chunk id of batch padding tokens
DUP_FORMS = ("matrix", "elementwise")


def normalized_magnitude(log_m: torch.Tensor, settings: IWPSettings) -> torch.Tensor:
    """m̂ in [0, 1] per video: exp(log m − max log m), or the rank of log m scaled to [0, 1]."""
    if settings.magnitude_norm == "max":
        return torch.exp(log_m - log_m.max())
    ordered = torch.sort(log_m).values
    # Rank = number of strictly smaller tokens, so exact copies get equal ranks (no index bias).
    ranks = torch.searchsorted(ordered, log_m, side="left")
    return ranks.float() / max(1, log_m.shape[0] - 1)


def mmr_score(mhat: torch.Tensor, penalty: torch.Tensor, settings: IWPSettings) -> torch.Tensor:
    """Marginal relevance of every candidate given its max duplication with the picked set."""
    if settings.score == "magnitude":
        return mhat
    if settings.score == "duplication":
        return -penalty
    return settings.lam * mhat - (1.0 - settings.lam) * penalty


def chunk_floor(budget: int, n_chunks: int, floor: float) -> int:
    """Per-chunk floor f = floor(floor·K/T), at least 1 when floor > 0 and K >= T."""
    share = floor * budget / n_chunks
    f = math.floor(share + 1e-9 * max(1.0, share))  # fp guard: 0.3*10/3 must give 1, not 0
    if floor > 0 and budget >= n_chunks:
        f = max(f, 1)
    return f


def split_proportional(budget: int, sizes: Sequence[int]) -> list[int]:
    """Split K over groups ∝ size with an exact total (largest remainder, ties to earlier groups)."""
    total = sum(sizes)
    shares = [budget * s // total for s in sizes]
    remainders = [budget * s % total for s in sizes]
    order = sorted(range(len(sizes)), key=lambda g: (-remainders[g], g))
    for g in order[: budget - sum(shares)]:
        shares[g] += 1
    return shares


def pick_schedule(layout: TokenLayout, budget: int, settings: IWPSettings) -> tuple[torch.Tensor, list[int]]:
    """Token group of every token and, for each pick in order, the group it must come from."""
    n = layout.n_tokens
    if not 0 <= budget <= n:
        raise ValueError(f"budget must be in [0, {n}], got {budget}")
    if settings.chunking == "fixed":
        size = settings.fixed_chunk_size
        groups = torch.arange(n) // size
        sizes = [min(size, n - start) for start in range(0, n, size)]
        per_group = split_proportional(budget, sizes)  # no floor, no global remainder
        schedule = [g for g, k in enumerate(per_group) for _ in range(k)]
        return groups, schedule
    groups = layout.chunk_ids()
    f = chunk_floor(budget, layout.n_chunks, settings.floor)
    per_chunk = [min(f, size) for size in layout.chunk_sizes]
    schedule = [t for t, k in enumerate(per_chunk) for _ in range(k)]
    schedule += [ANY_CHUNK] * (budget - len(schedule))  # remaining K − Σf: global MMR
    return groups, schedule


def _stack_features(features: Sequence[TokenFeatures], n_max: int) -> TokenFeatures:
    # Pad every video to n_max tokens with zeros (pads are never candidates) and stack to (B, N, ...).
    def pad(xs):
        if xs[0] is None:
            return None
        out = xs[0].new_zeros((len(xs), n_max) + tuple(xs[0].shape[1:]))
        for b, x in enumerate(xs):
            out[b, : x.shape[0]] = x
        return out

    first = features[0]
    return TokenFeatures(
        keys=pad([f.keys for f in features]),
        unit_values=pad([f.unit_values for f in features]),
        head_log_magnitude=pad([f.head_log_magnitude for f in features]),
        log_magnitude=pad([f.log_magnitude for f in features]),
        head_weights=pad([f.head_weights for f in features]),
        scale=first.scale,
        head_agg=first.head_agg,
    )


def _picked_rows(feats: TokenFeatures, pick: torch.Tensor) -> TokenFeatures:
    # Features of one picked token per video, shaped (B, 1, ...) to broadcast against (B, N, ...).
    rows = torch.arange(pick.shape[0], device=pick.device)

    def take(x):
        return None if x is None else x[rows, pick].unsqueeze(1)

    return TokenFeatures(
        take(feats.keys),
        take(feats.unit_values),
        take(feats.head_log_magnitude),
        take(feats.log_magnitude),
        take(feats.head_weights),
        feats.scale,
        feats.head_agg,
    )


class _MatrixRows:
    """Duplication rows of picked tokens against all tokens from matrix products (no (B, N, H, d) temporaries)."""

    def __init__(self, feats: TokenFeatures, valid: torch.Tensor, ids: torch.Tensor):
        keys = feats.keys.transpose(1, 2)  # (B, H, N, dk)
        mask = valid[:, None, :, None].to(keys.dtype)
        count = mask.sum(2, keepdim=True).clamp_min(1.0)
        keys = (keys - (keys * mask).sum(2, keepdim=True) / count) * mask  # centred: distances are shift-invariant
        self.dk = keys.shape[-1]
        # (B, H, dk + dv, N): tokens along the last axis, so a step is one (2, d) × (d, N) product per head
        self.stacked = torch.cat([keys, feats.unit_values.transpose(1, 2)], dim=-1).transpose(2, 3).contiguous()
        self.sq_norm = keys.square().sum(-1)  # (B, H, N)
        self.neg_inv_2s = -0.5 / feats.scale
        self.weights = None if feats.head_weights is None else feats.head_weights.transpose(1, 2)  # (B, H, N)
        self.feats = feats
        self.ids = ids
        batch, heads, width, _ = self.stacked.shape
        self.rows = torch.arange(batch, device=keys.device)
        self.query = self.stacked.new_zeros((batch, heads, 2, width))  # block rows [k_p, 0] and [0, u_p]

    def __call__(self, pick: torch.Tensor) -> torch.Tensor:
        picked = self.stacked[self.rows, :, :, pick]  # (B, H, dk + dv)
        self.query[:, :, 0, : self.dk] = picked[..., : self.dk]
        self.query[:, :, 1, self.dk :] = picked[..., self.dk :]
        prod = torch.matmul(self.query, self.stacked)  # (B, H, 2, N): k_p·k_j and u_p·u_j
        sq_norm_p = self.sq_norm[self.rows, :, pick].unsqueeze(-1)
        sq_dist = (self.sq_norm + sq_norm_p - 2.0 * prod[:, :, 0]).clamp_min(0.0)
        per_head = prod[:, :, 1] * torch.exp(sq_dist * self.neg_inv_2s)
        if self.weights is None:
            row = per_head.mean(1)
        else:
            row = (self.weights * self.weights[self.rows, :, pick].unsqueeze(-1) * per_head).sum(1)
        # Exact copies of the pick get the pick's own duplication, computed as the elementwise form does.
        own = _picked_rows(self.feats, pick)
        self_dup = pair_duplication(own, own)  # (B, 1)
        same = self.ids == self.ids[self.rows, pick].unsqueeze(1)
        return torch.where(same, self_dup, row)


def _greedy_lockstep(
    feats: TokenFeatures,
    mhat: torch.Tensor,
    groups: torch.Tensor,
    schedule: torch.Tensor,
    settings: IWPSettings,
    ids: torch.Tensor,
    form: str = "matrix",
) -> torch.Tensor:
    """Run the greedy picks of B videos side by side; returns picks (B, steps) in pick order.

    No host synchronisation inside the loop: every step's tensors stay on the device.
    """
    batch, n = mhat.shape
    device = mhat.device
    rows = torch.arange(batch, device=device)
    valid = groups != PAD_TOKEN
    taken = torch.zeros((batch, n), dtype=torch.bool, device=device)
    max_dup = torch.zeros((batch, n), dtype=torch.float32, device=device)  # penalty is 0 while S is empty
    picks = torch.zeros(schedule.shape, dtype=torch.long, device=device)
    needs_dup = settings.score != "magnitude"  # the magnitude ablation never looks at duplication
    if needs_dup and form == "matrix":
        dup_row = _MatrixRows(feats, valid, ids)
    else:
        dup_row = lambda pick: pair_duplication(_picked_rows(feats, pick), feats)  # noqa: E731 (B, N, H, d) temps
    for step in range(schedule.shape[1]):
        want = schedule[:, step]
        active = want != NO_PICK
        allowed = valid & ~taken & ((want == ANY_CHUNK).unsqueeze(1) | (groups == want.unsqueeze(1)))
        score = mmr_score(mhat, max_dup, settings).masked_fill(~allowed, float("-inf"))
        pick = score.argmax(dim=1)  # first index on ties: deterministic
        picks[:, step] = pick
        taken[rows, pick] |= active
        if needs_dup:
            row = dup_row(pick)  # (B, N): one row per pick
            updated = row if step == 0 else torch.maximum(max_dup, row)
            max_dup = torch.where(active.unsqueeze(1), updated, max_dup)
    return picks


def _check_inputs(keys: torch.Tensor, values: torch.Tensor, layout: TokenLayout) -> None:
    if keys.shape[0] != layout.n_tokens or values.shape[0] != layout.n_tokens:
        raise ValueError(
            f"keys/values have {keys.shape[0]}/{values.shape[0]} tokens but the layout has {layout.n_tokens}"
        )


def select_tokens_pcmmr_batch(
    keys_list: Sequence[torch.Tensor],
    values_list: Sequence[torch.Tensor],
    layouts: Sequence[TokenLayout],
    budgets: Sequence[int],
    settings: IWPSettings = IWPSettings(),
    *,
    form: str = "matrix",
) -> list[torch.Tensor]:
    """PC-MMR for several videos at once, picks in lockstep on a padded (B, N) tensor.

    Returns, per video, the sorted kept indices (length == its budget). `form` picks how a duplication
    row is computed: "matrix" (default, see the module docstring) or "elementwise" (the reference).
    """
    if form not in DUP_FORMS:
        raise ValueError(f"form must be one of {DUP_FORMS}, got {form!r}")
    if not (len(keys_list) == len(values_list) == len(layouts) == len(budgets)):
        raise ValueError("keys_list, values_list, layouts and budgets must have the same length")
    if not keys_list:
        return []
    device = keys_list[0].device
    features, mhats, group_rows, schedules, id_rows = [], [], [], [], []
    for keys, values, layout, budget in zip(keys_list, values_list, layouts, budgets):
        _check_inputs(keys, values, layout)
        f = token_features(keys, values, settings)
        features.append(f)
        id_rows.append(content_ids(f.keys, f.unit_values, f.head_weights) if form == "matrix" else None)
        mhats.append(normalized_magnitude(f.log_magnitude, settings))
        groups, schedule = pick_schedule(layout, int(budget), settings)
        group_rows.append(groups)
        schedules.append(schedule)
    n_max = max(layout.n_tokens for layout in layouts)
    steps = max(len(s) for s in schedules)
    batch = len(layouts)
    feats = _stack_features(features, n_max)
    mhat = torch.zeros((batch, n_max), dtype=torch.float32, device=device)
    groups = torch.full((batch, n_max), PAD_TOKEN, dtype=torch.long)
    schedule = torch.full((batch, steps), NO_PICK, dtype=torch.long)
    ids = torch.full((batch, n_max), -1, dtype=torch.long, device=device)  # pads: never picked, id −1
    for b in range(batch):
        if id_rows[b] is not None:
            ids[b, : id_rows[b].shape[0]] = id_rows[b]
        mhat[b, : mhats[b].shape[0]] = mhats[b]
        groups[b, : group_rows[b].shape[0]] = group_rows[b]
        schedule[b, : len(schedules[b])] = torch.tensor(schedules[b], dtype=torch.long)
    picks = _greedy_lockstep(feats, mhat, groups.to(device), schedule.to(device), settings, ids, form)
    return [torch.sort(picks[b, : len(schedules[b])]).values for b in range(batch)]


def select_tokens_pcmmr(
    keys: torch.Tensor,
    values: torch.Tensor,
    layout: TokenLayout,
    budget: int,
    settings: IWPSettings = IWPSettings(),
    *,
    form: str = "matrix",
) -> torch.Tensor:
    """Progressive chunked MMR for one video: sorted unique kept indices, exactly `budget` of them."""
    return select_tokens_pcmmr_batch([keys], [values], [layout], [budget], settings, form=form)[0]


def select_tokens_mmr_exact(
    keys: torch.Tensor, values: torch.Tensor, budget: int, settings: IWPSettings = IWPSettings()
) -> torch.Tensor:
    """Naive exact greedy MMR over one chunk with the dense N×N duplication matrix (the test oracle).

    Returns the kept indices sorted.
    """
    f = token_features(keys, values, settings)
    n = f.keys.shape[0]
    if not 0 <= budget <= n:
        raise ValueError(f"budget must be in [0, {n}], got {budget}")
    mhat = normalized_magnitude(f.log_magnitude, settings)
    dup = duplication_matrix(f, f)
    taken = torch.zeros(n, dtype=torch.bool, device=mhat.device)
    picked: list[int] = []
    for _ in range(budget):
        penalty = dup[picked].max(dim=0).values if picked else torch.zeros_like(mhat)
        score = mmr_score(mhat, penalty, settings).masked_fill(taken, float("-inf"))
        j = int(score.argmax())
        picked.append(j)
        taken[j] = True
    return torch.sort(torch.tensor(picked, dtype=torch.long, device=mhat.device)).values
