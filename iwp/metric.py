"""The IWP kernel: information magnitude, information duplication and the residual ‖W − W_S‖²/‖W‖².

Token j adds the rank-1 update v_j φ(k_j)ᵀ to the implicit weight W of attention, with
φ(a)ᵀφ(b) = exp(a·b / (τ√d)). Everything here is computed in float32 and in log space or
normalised form, so huge key norms never overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .settings import IWPSettings

_TINY_NORM = 1e-30  # floor for ‖v‖ so log‖v‖ stays finite for all-zero values
_BLOCK_ELEMENTS = 1 << 22  # bound on the temporaries of one dense block (elements)
_SAMPLE_BLOCK = 8192  # sampled pairs evaluated per block
_SYMMETRIC_STEP = 256  # column block of DenseDuplication.full: ~half the products of the whole matrix
_MIN_NORMAL_LOG = -87.0  # exp of anything lower is a float32 denormal (< 1.7e-38): clamp, it is 0 for every use


@dataclass(frozen=True)
class TokenFeatures:
    """Per-token quantities that magnitude and duplication are built from (float32)."""

    keys: torch.Tensor  # (..., N, H, dk)
    unit_values: torch.Tensor  # (..., N, H, dv) values scaled to unit norm per head (zero stays zero)
    head_log_magnitude: torch.Tensor  # (..., N, H) log‖v_h‖ + ‖k_h‖²/(2τ√d)
    log_magnitude: torch.Tensor  # (..., N) aggregated over heads per settings.head_agg
    head_weights: torch.Tensor | None  # (..., N, H) m_h / m for "frobenius", None for "mean"
    scale: float  # τ·√dk
    head_agg: str

    def take(self, index: torch.Tensor) -> "TokenFeatures":
        """Features of the tokens at `index` along the token axis of a single video (N, ...)."""
        return TokenFeatures(
            keys=self.keys[index],
            unit_values=self.unit_values[index],
            head_log_magnitude=self.head_log_magnitude[index],
            log_magnitude=self.log_magnitude[index],
            head_weights=None if self.head_weights is None else self.head_weights[index],
            scale=self.scale,
            head_agg=self.head_agg,
        )


def _as_heads(x: torch.Tensor, name: str) -> torch.Tensor:
    # A single-head (N, d) input is the same as (N, 1, d).
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (N, H, d) or (N, d), got {tuple(x.shape)}")
    return x


def token_features(keys: torch.Tensor, values: torch.Tensor, settings: IWPSettings) -> TokenFeatures:
    """Float32 features of N tokens from keys (N, H, dk) and values (N, H, dv)."""
    keys = _as_heads(keys, "keys").float()
    values = _as_heads(values, "values").float()
    if keys.shape[:2] != values.shape[:2]:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} disagree on (N, H)")
    scale = settings.temperature * math.sqrt(keys.shape[-1])
    value_norm = torch.linalg.vector_norm(values, dim=-1)
    unit_values = values / value_norm.clamp_min(_TINY_NORM).unsqueeze(-1)
    head_log_m = value_norm.clamp_min(_TINY_NORM).log() + keys.square().sum(-1) / (2.0 * scale)
    if settings.head_agg == "mean":
        log_m = head_log_m.mean(-1)  # geometric mean of the per-head magnitudes
        weights = None
    else:
        log_m = 0.5 * torch.logsumexp(2.0 * head_log_m, dim=-1)  # m² = Σ_h m_h²
        weights = torch.exp(head_log_m - log_m.unsqueeze(-1))  # Σ_h w_h² = 1
    return TokenFeatures(keys, unit_values, head_log_m, log_m, weights, scale, settings.head_agg)


def pair_duplication(a: TokenFeatures, b: TokenFeatures) -> torch.Tensor:
    """dup between broadcastable token sets a and b (shapes (..., H, d) broadcast to (...))."""
    # Direct differences, not ‖a‖²+‖b‖²−2a·b: exact 0 for identical keys even when norms are huge;
    # vector_norm fuses square+sum (about 3x faster than .square().sum() on CPU).
    sq_dist = torch.linalg.vector_norm(a.keys - b.keys, dim=-1).square()
    per_head = (a.unit_values * b.unit_values).sum(-1) * torch.exp(sq_dist / (-2.0 * a.scale))
    if a.head_agg == "mean":
        return per_head.mean(-1)
    # Frobenius: (Σ_h v_ih·v_jh κ_h) / (m_i m_j) = Σ_h w_ih w_jh dup_h, in [−1, 1] by Cauchy–Schwarz.
    return (a.head_weights * b.head_weights * per_head).sum(-1)


def duplication_matrix(a: TokenFeatures, b: TokenFeatures) -> torch.Tensor:
    """Dense (Na, Nb) duplication, built in row blocks to bound memory."""
    n_a, n_b = a.keys.shape[0], b.keys.shape[0]
    per_row = max(1, n_b * a.keys.shape[1] * max(a.keys.shape[2], a.unit_values.shape[2]))
    block = max(1, _BLOCK_ELEMENTS // per_row)
    rows = []
    b_rows = _unsqueeze_tokens(b, 0)
    for start in range(0, n_a, block):
        a_rows = _unsqueeze_tokens(a.take(slice(start, start + block)), 1)
        rows.append(pair_duplication(a_rows, b_rows))
    if not rows:
        return a.keys.new_zeros((0, n_b))
    return torch.cat(rows, dim=0)


def content_ids(*parts: torch.Tensor | None) -> torch.Tensor:
    """Per token of one video, an id shared exactly by the tokens whose parts (N, ...) are all equal bit for bit."""
    n = parts[0].shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=parts[0].device)
    flat = torch.cat([p.reshape(n, -1) for p in parts if p is not None], dim=1)
    return torch.unique(flat, dim=0, return_inverse=True)[1]


class DenseDuplication:
    """Blocks of the duplication matrix of one video's tokens, in matrix form (two products per head).

    The kernel's exponent −‖k_i − k_j‖²/(2s) comes from one product of keys (centred over the video)
    augmented with their half squared norms, value cosines from a second product, so a block's temporaries
    are (H, R, C), never (R, C, H, d).
    Exact copies (keys and values equal bit for bit, e.g. a skipped vision group's reused embeddings) are
    computed once: blocks are built on one representative per content and gathered, so copies get equal
    rows and columns, and a pair of copies gets the duplication the elementwise form gives it.
    Elsewhere the values differ from `duplication_matrix` (the elementwise reference) by float rounding.
    """

    def __init__(self, feats: TokenFeatures):
        n = feats.keys.shape[0]
        ids = content_ids(feats.keys, feats.unit_values, feats.head_weights)
        first = torch.full((int(ids.max()) + 1 if n else 0,), n, dtype=torch.long, device=ids.device)
        first = first.scatter_reduce(0, ids, torch.arange(n, device=ids.device), "amin")
        order = torch.argsort(first)  # representatives in token order: no gather at all when every token is distinct
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=ids.device)
        self.ids = rank[ids]  # (N,) index of the token's representative, 0..U−1 in order of first appearance
        self.distinct = order.numel() == n
        unique = feats.take(first[order])
        keys = unique.keys - unique.keys.mean(0, keepdim=True)  # distances are shift-invariant; centring shrinks cancellation
        keys = (keys / math.sqrt(feats.scale)).transpose(0, 1)  # (H, U, dk): k_i·k_j − ‖k_i‖²/2 − ‖k_j‖²/2 is the exponent
        half_sq_norm = 0.5 * keys.square().sum(-1, keepdim=True)
        ones = torch.ones_like(half_sq_norm)
        # [k_i, −n_i, −1]·[k_j, 1, n_j] = k_i·k_j − n_i − n_j: one product gives the exponent, no broadcast sum
        self.row_keys = torch.cat([keys, -half_sq_norm, -ones], dim=-1).contiguous()  # (H, U, dk + 2)
        self.col_keys = torch.cat([keys, ones, half_sq_norm], dim=-1).contiguous()
        self.values = unique.unit_values.transpose(0, 1).contiguous()  # (H, U, dv)
        self.weights = None if unique.head_weights is None else unique.head_weights.transpose(0, 1).contiguous()
        self.self_dup = pair_duplication(unique, unique)  # (U,) what the elementwise form gives a pair of copies

    def _unique_block(self, rows: slice | torch.Tensor, cols: slice | torch.Tensor) -> torch.Tensor:
        every = torch.arange(self.values.shape[1], device=self.values.device)
        row_ids, col_ids = every[rows], every[cols]  # sorted representative indices
        cols = _as_range(cols, col_ids)  # a slice of representatives indexes as a view, indices as a copy
        kc, vc = self.col_keys[:, cols].transpose(1, 2), self.values[:, cols].transpose(1, 2)
        wc = None if self.weights is None else self.weights[:, cols]
        step = max(1, _BLOCK_ELEMENTS // max(1, self.values.shape[0] * col_ids.numel()))
        out = []
        for start in range(0, row_ids.numel(), step):
            r = row_ids[start:start + step]
            r_at = _as_range(rows, r)
            # <= 0 (a squared distance); exp(−87) is the smallest normal float32, below it exp is ~6x slower
            kernel = torch.matmul(self.row_keys[:, r_at], kc).clamp_(_MIN_NORMAL_LOG, 0.0).exp_()
            per_head = torch.matmul(self.values[:, r_at], vc).mul_(kernel)
            if wc is None:
                block = per_head.mean(0)
            else:
                block = per_head.mul_(self.weights[:, r_at, None]).mul_(wc[:, None, :]).sum(0)
            # a representative with itself (a pair of copies): what the elementwise form gives it
            pos = torch.searchsorted(col_ids, r).clamp_max(col_ids.numel() - 1)
            same = torch.nonzero(col_ids[pos] == r).flatten()
            block[same, pos[same]] = self.self_dup[r[same]]
            out.append(block)
        if len(out) == 1:
            return out[0]
        return torch.cat(out) if out else self.values.new_zeros((0, col_ids.numel()))

    def block(self, rows: slice | torch.Tensor = slice(None), cols: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """(R, C) duplication of the tokens at `rows` (indices or a slice) with those at `cols`."""
        if self.distinct and isinstance(rows, slice) and isinstance(cols, slice):
            return self._unique_block(rows, cols)
        row_rep, row_inv = torch.unique(self.ids[rows], return_inverse=True)
        col_rep, col_inv = torch.unique(self.ids[cols], return_inverse=True)
        return self._unique_block(row_rep, col_rep)[row_inv][:, col_inv]

    def full(self) -> torch.Tensor:
        """(N, N): the upper triangle of blocks is computed and mirrored (dup is exactly symmetric)."""
        n_unique = self.values.shape[1]
        out = self.values.new_empty((n_unique, n_unique))
        for c0 in range(0, n_unique, _SYMMETRIC_STEP):
            c1 = min(n_unique, c0 + _SYMMETRIC_STEP)
            upper = self._unique_block(slice(0, c1), slice(c0, c1))  # rows 0..c1 × this column block
            diagonal = upper[c0:c1]  # products of a block with itself can round differently on both sides
            upper[c0:c1] = diagonal.triu() + diagonal.triu(1).T
            out[:c1, c0:c1] = upper
            out[c0:c1, :c0] = upper[:c0].T
        return out if self.distinct else out[self.ids][:, self.ids]


def _as_range(index: slice | torch.Tensor, ids: torch.Tensor) -> slice | torch.Tensor:
    """`ids` (sorted indices taken through `index`) as a slice when `index` is a unit-step slice, else as they are."""
    if isinstance(index, slice) and index.step in (None, 1) and ids.numel() > 0:
        return slice(int(ids[0]), int(ids[-1]) + 1)
    return ids


def _unsqueeze_tokens(f: TokenFeatures, dim: int) -> TokenFeatures:
    # Insert a broadcast axis before the token axis (dim=0) or after it (dim=1).
    def u(x):
        return None if x is None else x.unsqueeze(dim)

    return TokenFeatures(
        u(f.keys), u(f.unit_values), u(f.head_log_magnitude), u(f.log_magnitude), u(f.head_weights), f.scale, f.head_agg
    )


def log_magnitude(keys: torch.Tensor, values: torch.Tensor, settings: IWPSettings = IWPSettings()) -> torch.Tensor:
    """log m_j = log‖v_j‖ + ‖k_j‖²/(2τ√d), aggregated over heads; shape (N,), float32, finite."""
    return token_features(keys, values, settings).log_magnitude


def duplication(
    keys_a: torch.Tensor,
    values_a: torch.Tensor,
    keys_b: torch.Tensor,
    values_b: torch.Tensor,
    settings: IWPSettings = IWPSettings(),
) -> torch.Tensor:
    """dup(i, j) = cos(v_i, v_j) · exp(−‖k_i − k_j‖²/(2τ√d)), aggregated over heads; shape (Na, Nb), in [−1, 1]."""
    a = token_features(keys_a, values_a, settings)
    b = token_features(keys_b, values_b, settings)
    if a.keys.shape[1:] != b.keys.shape[1:] or a.unit_values.shape[1:] != b.unit_values.shape[1:]:
        raise ValueError("the two token sets must have the same heads and head dims")
    return duplication_matrix(a, b)


def _keep_mask(keep: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    keep = torch.as_tensor(keep, device=device)
    if keep.dtype == torch.bool:
        if keep.shape != (n,):
            raise ValueError(f"boolean keep mask must have shape ({n},), got {tuple(keep.shape)}")
        return keep
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[keep.long()] = True
    return mask


def _scaled_values(f: TokenFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head values scaled by m̂_h = m_h / max m (so ṽ_i·ṽ_j κ̂ = v_i·v_j κ up to one constant)."""
    head_mhat = torch.exp(f.head_log_magnitude - f.head_log_magnitude.max())
    return head_mhat.unsqueeze(-1) * f.unit_values, head_mhat


def _exact_weight_norm(
    keys: torch.Tensor, scaled_values: torch.Tensor, scale: float, weights: torch.Tensor | None = None
) -> float:
    """Σ_h Σ_ij w_i w_j (ṽ_ih·ṽ_jh) exp(−‖k_ih − k_jh‖²/(2s)) for one token set (w = 1 by default), dense in row blocks."""
    n, h, _ = keys.shape
    if weights is not None:
        scaled_values = scaled_values * weights.view(-1, 1, 1).to(scaled_values.dtype)
    if n == 0:
        return 0.0
    keys = keys - keys.mean(0, keepdim=True)  # distances are shift-invariant; centring shrinks cancellation
    k_h = keys.transpose(0, 1)  # (H, N, dk)
    v_h = scaled_values.transpose(0, 1)  # (H, N, dv)
    sq = k_h.square().sum(-1)  # (H, N)
    block = max(1, _BLOCK_ELEMENTS // max(1, n * h))
    total = torch.zeros((), dtype=torch.float64, device=keys.device)
    for start in range(0, n, block):
        stop = min(n, start + block)
        sq_dist = (sq[:, start:stop, None] + sq[:, None, :] - 2.0 * k_h[:, start:stop] @ k_h.transpose(1, 2)).clamp_min(0)
        diag = torch.arange(stop - start, device=keys.device)
        sq_dist[:, diag, diag + start] = 0.0  # a token's distance to itself is exactly 0
        gram = (v_h[:, start:stop] @ v_h.transpose(1, 2)) * torch.exp(sq_dist / (-2.0 * scale))
        total += gram.sum(dtype=torch.float64)
    return float(total)


def _gram(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
    """G(a, b) = Σ_h (ṽ_ah·ṽ_bh) exp(−‖k_ah − k_bh‖²/(2s)) for (keys, scaled values) of S token pairs, (S,);
    direct differences: exact 0 distance for copies."""
    sq_dist = torch.linalg.vector_norm(a[0] - b[0], dim=-1).square()  # (S, H)
    return ((a[1] * b[1]).sum(-1) * torch.exp(sq_dist / (-2.0 * scale))).sum(-1)


def _sampled_weight_norm(
    keys: torch.Tensor,
    scaled_values: torch.Tensor,
    head_mhat: torch.Tensor,
    scale: float,
    n_samples: int,
    generator,
    weights: torch.Tensor | None = None,
) -> float:
    """Unbiased estimate of the same sum: exact diagonal + magnitude-importance-sampled off-diagonal pairs.

    Signed weights w (compensation) are sampled ∝ |w_i| m̂_i and enter each pair by their signs."""
    mhat = torch.linalg.vector_norm(head_mhat, dim=-1)  # Frobenius magnitude over heads, (N,)
    sign = torch.ones_like(mhat) if weights is None else torch.sign(weights.float())
    if weights is not None:
        mhat = mhat * weights.float().abs()
        scaled_values = scaled_values * weights.float().abs().view(-1, 1, 1)
    diagonal = float(mhat.double().square().sum())
    total_mass = float(mhat.double().sum())
    if total_mass == 0.0 or keys.shape[0] < 2:
        return diagonal
    # Sample i, j ∝ m̂: f(i,j)/(p_i p_j) = (Σm̂)² dup(i,j), bounded by (Σm̂)², so the variance stays small.
    probs = (mhat.double() / total_mass).cpu()
    pairs = torch.multinomial(probs, 2 * n_samples, replacement=True, generator=generator).to(keys.device)
    dup_sum = torch.zeros((), dtype=torch.float64, device=keys.device)
    for start in range(0, n_samples, _SAMPLE_BLOCK):  # bounded gathers for large n_samples
        i = pairs[start : min(n_samples, start + _SAMPLE_BLOCK)]
        j = pairs[n_samples + start : n_samples + min(n_samples, start + _SAMPLE_BLOCK)]
        gram = _gram((keys[i], scaled_values[i]), (keys[j], scaled_values[j]), scale)
        dup = sign[i] * sign[j] * gram / (mhat[i] * mhat[j]).clamp_min(1e-300)
        dup_sum += torch.where(i == j, torch.zeros_like(dup), dup).sum(dtype=torch.float64)  # diagonal counted exactly
    dup_mean = float(dup_sum) / n_samples
    return diagonal + total_mass**2 * dup_mean


def _sampled_difference_norm(
    keys: torch.Tensor, scaled_values: torch.Tensor, rep: torch.Tensor, scale: float, n_samples: int, generator
) -> float:
    """‖Σ_n D_n‖² for D_n = W_n − W_rep(n) (token n minus the kept token it is counted in; rows rep (N,) of the
    same arrays): the exact diagonal Σ‖D_n‖² plus the off-diagonal sampled ∝ ‖D_n‖.

    |⟨D_n, D_n'⟩| <= ‖D_n‖‖D_n'‖ bounds every weighted sample by (Σ‖D‖)², which is small when the pruned tokens
    are near-copies of their kept tokens; sampling the ±W terms instead has (Σ m̂)²-sized samples that cancel.
    """
    n = rep.numel()
    token = (keys[:n], scaled_values[:n])
    kept = (keys[rep], scaled_values[rep])
    diag = (_gram(token, token, scale) - 2.0 * _gram(token, kept, scale)
            + _gram(kept, kept, scale)).clamp_min(0.0)  # (N,) ‖D_n‖²
    norms = diag.double().sqrt()
    total = float(norms.sum())
    diagonal = float(diag.double().sum())
    if total == 0.0 or n < 2:
        return diagonal
    pairs = torch.multinomial((norms / total).cpu(), 2 * n_samples, replacement=True, generator=generator)
    pairs = pairs.to(keys.device)
    off = torch.zeros((), dtype=torch.float64, device=keys.device)
    for start in range(0, n_samples, _SAMPLE_BLOCK):
        a = pairs[start : min(n_samples, start + _SAMPLE_BLOCK)]
        b = pairs[n_samples + start : n_samples + min(n_samples, start + _SAMPLE_BLOCK)]
        ta, tb = (keys[a], scaled_values[a]), (keys[b], scaled_values[b])
        ka, kb = (keys[rep[a]], scaled_values[rep[a]]), (keys[rep[b]], scaled_values[rep[b]])
        inner = _gram(ta, tb, scale) - _gram(ta, kb, scale) - _gram(ka, tb, scale) + _gram(ka, kb, scale)
        weighted = inner.double() / (norms[a] * norms[b])
        off += torch.where(a == b, torch.zeros_like(weighted), weighted).sum()
    return diagonal + total**2 * float(off) / n_samples


def relative_residual(
    keys: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor,
    settings: IWPSettings = IWPSettings(),
    max_exact: int = 2048,
    n_samples: int = 4096,
    generator: torch.Generator | None = None,
) -> float:
    """‖W − W_S‖²_F / ‖W‖²_F for the kept set S (indices or a bool mask), from the kernel.

    Always the exact stacked-head Frobenius norm (settings.head_agg only affects selection);
    settings.temperature sets the kernel. Dense for N <= max_exact, else a sampled estimate:
    exact diagonal plus off-diagonal pairs drawn ∝ magnitude (each sum unbiased; the ratio's
    standard deviation shrinks as 1/√n_samples, about 0.02 at 4096 on clustered tokens).
    Can exceed 1 only when values are anti-correlated (then dropping tokens can grow W).
    """
    f = token_features(keys, values, IWPSettings(temperature=settings.temperature, head_agg="frobenius"))
    n = f.keys.shape[0]
    dropped = ~_keep_mask(keep, n, f.keys.device)
    if not bool(dropped.any()):
        return 0.0
    scaled_values, head_mhat = _scaled_values(f)
    if n <= max_exact:
        numerator = _exact_weight_norm(f.keys[dropped], scaled_values[dropped], f.scale)
        denominator = _exact_weight_norm(f.keys, scaled_values, f.scale)
    else:
        if generator is None:
            generator = torch.Generator().manual_seed(settings.seed)
        numerator = _sampled_weight_norm(
            f.keys[dropped], scaled_values[dropped], head_mhat[dropped], f.scale, n_samples, generator
        )
        denominator = _sampled_weight_norm(f.keys, scaled_values, head_mhat, f.scale, n_samples, generator)
    numerator = max(numerator, 0.0)  # a sampled off-diagonal can dip below the true (>= 0) value
    if numerator == 0.0:
        return 0.0
    return numerator / max(denominator, 1e-300)


def compensated_residual(
    keys: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor,
    counts: torch.Tensor,
    kept_keys: torch.Tensor | None = None,
    kept_values: torch.Tensor | None = None,
    settings: IWPSettings = IWPSettings(),
    max_exact: int = 2048,
    n_samples: int = 4096,
    generator: torch.Generator | None = None,
    owner: torch.Tensor | None = None,
) -> float:
    """‖W − Σ_{i∈S} m_i v̄_i φ(k̄_i)ᵀ‖²_F / ‖W‖²_F: the residual of what a compensated LLM sees.

    counts m_i (K,) weight each kept token (log m_i is its attention bias); kept_keys / kept_values (K, H, d)
    are the keys/values of merged kept tokens (default: the kept tokens' own). With all m_i = 1 and no merge
    this is `relative_residual`. Exact for N + K <= max_exact, else a sampled estimate: with `owner` (N,), the
    kept token each token is counted in (counts = its bincount, `Compensation.owner`), the numerator is sampled as
    Σ_n (W_n − W_owner(n)), whose terms are small where pruning loses little; without it as ±W terms, which cancel
    and leave an estimate of the residual's noise rather than of it when the residual is small.
    """
    keep = torch.as_tensor(keep, device=keys.device).long()
    kept_keys = keys[keep] if kept_keys is None else kept_keys
    kept_values = values[keep] if kept_values is None else kept_values
    n = keys.shape[0]
    combined = token_features(
        torch.cat([_as_heads(keys, "keys"), _as_heads(kept_keys, "kept_keys")]),
        torch.cat([_as_heads(values, "values"), _as_heads(kept_values, "kept_values")]),
        IWPSettings(temperature=settings.temperature, head_agg="frobenius"),
    )
    # W − W_comp as one signed sum: every original token with +1, every kept (merged) token with −m_i
    weights = torch.cat([torch.ones(n, device=keys.device), -counts.float().to(keys.device)])
    scaled_values, head_mhat = _scaled_values(combined)
    total = n + keep.numel()
    if total <= max_exact:
        numerator = _exact_weight_norm(combined.keys, scaled_values, combined.scale, weights)
        denominator = _exact_weight_norm(combined.keys[:n], scaled_values[:n], combined.scale)
    else:
        if generator is None:
            generator = torch.Generator().manual_seed(settings.seed)
        if owner is not None:
            owner = torch.as_tensor(owner, device=keys.device).long()
            if owner.shape != (n,) or not torch.equal(torch.bincount(owner, minlength=keep.numel()).float(),
                                                       counts.float().to(keys.device)):
                raise ValueError("owner must give every token's kept token, with counts as its bincount")
            numerator = _sampled_difference_norm(combined.keys, scaled_values, n + owner, combined.scale,
                                                 n_samples, generator)
        else:
            numerator = _sampled_weight_norm(
                combined.keys, scaled_values, head_mhat, combined.scale, n_samples, generator, weights
            )
        denominator = _sampled_weight_norm(
            combined.keys[:n], scaled_values[:n], head_mhat[:n], combined.scale, n_samples, generator
        )
    numerator = max(numerator, 0.0)
    return numerator / max(denominator, 1e-300)
