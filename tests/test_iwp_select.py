"""PC-MMR selection: fast vs dense oracle, invariants, temporal behaviour, batching."""

import math

import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

from iwp import (
    IWPSettings,
    TokenLayout,
    budget_for,
    duplication,
    log_magnitude,
    select_tokens_mmr_exact,
    select_tokens_pcmmr,
    select_tokens_pcmmr_batch,
)

HYP = hsettings(max_examples=50, deadline=None)


def random_kv(n, heads=2, dk=8, dv=8, seed=0, key_scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, heads, dk, generator=g) * key_scale
    values = torch.randn(n, heads, dv, generator=g)
    return keys.to(dtype), values.to(dtype)


def expected_floor(budget, n_chunks, floor):
    # Written independently of iwp.select: f = floor(floor*K/T), at least 1 when floor > 0 and K >= T.
    f = math.floor(floor * budget / n_chunks + 1e-9)
    return max(f, 1) if floor > 0 and budget >= n_chunks else f


def naive_progressive(keys, values, layout, budget, s):
    """Slow reference of temporal PC-MMR from the dense duplication matrix (no shared selection code)."""
    n = layout.n_tokens
    log_m = log_magnitude(keys, values, s)
    mhat = torch.exp(log_m - log_m.max())
    dup = duplication(keys, values, keys, values, s)
    chunk = layout.chunk_ids()
    f = expected_floor(budget, layout.n_chunks, s.floor)
    plan = [t for t, size in enumerate(layout.chunk_sizes) for _ in range(min(f, size))]
    plan += [None] * (budget - len(plan))
    picked = []
    for want in plan:
        best, best_score = None, None
        for j in range(n):
            if j in picked or (want is not None and int(chunk[j]) != want):
                continue
            penalty = max(float(dup[i, j]) for i in picked) if picked else 0.0
            score = s.lam * float(mhat[j]) - (1 - s.lam) * penalty
            if best_score is None or score > best_score:
                best, best_score = j, score
        picked.append(best)
    return sorted(picked)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n,budget", [(1, 1), (7, 3), (40, 10), (96, 50), (64, 64)])
@pytest.mark.parametrize(
    "s",
    [
        IWPSettings(floor=0.0),
        IWPSettings(floor=0.0, lam=0.8, temperature=2.0),
        IWPSettings(floor=0.0, head_agg="frobenius", magnitude_norm="rank"),
        IWPSettings(floor=0.0, score="duplication"),
        IWPSettings(floor=0.25),  # one chunk: the floor is in-chunk MMR too, so still plain MMR
    ],
)
def test_fast_selection_equals_dense_oracle_on_one_chunk(seed, n, budget, s):
    keys, values = random_kv(n, heads=2, dk=8, dv=6, seed=seed)
    fast = select_tokens_pcmmr(keys, values, TokenLayout((n,)), budget, s)
    exact = select_tokens_mmr_exact(keys, values, budget, s)
    assert fast.tolist() == exact.tolist()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_progressive_chunks_match_naive_reference(seed):
    layout = TokenLayout((12, 9, 15, 6))
    keys, values = random_kv(layout.n_tokens, heads=2, dk=4, dv=4, seed=seed)
    for retention in (0.15, 0.4):
        budget = budget_for(layout.n_tokens, retention)
        fast = select_tokens_pcmmr(keys, values, layout, budget, IWPSettings(floor=0.5))
        assert fast.tolist() == naive_progressive(keys, values, layout, budget, IWPSettings(floor=0.5))


@st.composite
def video(draw):
    sizes = draw(st.lists(st.integers(1, 16), min_size=1, max_size=5))
    heads = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 10_000))
    retention = draw(st.floats(0.01, 1.0))
    s = IWPSettings(
        lam=draw(st.sampled_from([0.0, 0.3, 0.5, 1.0])),
        floor=draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])),
        chunking=draw(st.sampled_from(["temporal", "fixed"])),
        fixed_chunk_size=draw(st.integers(1, 20)),
        head_agg=draw(st.sampled_from(["mean", "frobenius"])),
        score=draw(st.sampled_from(["mmr", "magnitude", "duplication"])),
        magnitude_norm=draw(st.sampled_from(["max", "rank"])),
    )
    return TokenLayout(tuple(sizes)), heads, seed, retention, s


def chunk_counts(keep, layout):
    return torch.bincount(layout.chunk_ids()[keep], minlength=layout.n_chunks).tolist()


@HYP
@given(video())
def test_selection_invariants(case):
    layout, heads, seed, retention, s = case
    keys, values = random_kv(layout.n_tokens, heads=heads, dk=4, dv=5, seed=seed)
    budget = budget_for(layout.n_tokens, retention)
    keep = select_tokens_pcmmr(keys, values, layout, budget, s)
    assert keep.dtype == torch.long and keep.numel() == budget
    assert keep.tolist() == sorted(set(keep.tolist()))
    assert 0 <= int(keep.min()) and int(keep.max()) < layout.n_tokens
    assert torch.equal(keep, select_tokens_pcmmr(keys, values, layout, budget, s))  # deterministic
    if s.chunking == "temporal":
        f = expected_floor(budget, layout.n_chunks, s.floor)
        for count, size in zip(chunk_counts(keep, layout), layout.chunk_sizes):
            assert count >= min(f, size)
    else:
        # Paper-style: fixed chunks in sequence order, budget ∝ chunk size (within one token), no remainder pass.
        n, c = layout.n_tokens, s.fixed_chunk_size
        counts = torch.bincount(keep // c, minlength=math.ceil(n / c)).tolist()
        for g, count in enumerate(counts):
            share = budget * min(c, n - g * c) / n
            assert math.floor(share) <= count <= math.ceil(share)


@HYP
@given(video(), st.sampled_from([1e3, 1e4]), st.booleans())
def test_huge_key_norms_and_bf16_stay_finite_and_exact(case, key_scale, bf16):
    layout, heads, seed, retention, s = case
    dtype = torch.bfloat16 if bf16 else torch.float32
    keys, values = random_kv(layout.n_tokens, heads=heads, dk=4, dv=4, seed=seed, key_scale=key_scale, dtype=dtype)
    assert torch.isfinite(log_magnitude(keys, values, s)).all()
    dup = duplication(keys, values, keys, values, s)
    assert torch.isfinite(dup).all() and float(dup.abs().max()) <= 1 + 1e-5
    budget = budget_for(layout.n_tokens, retention)
    keep = select_tokens_pcmmr(keys, values, layout, budget, s)
    assert keep.numel() == budget == keep.unique().numel()


@pytest.mark.parametrize("head_agg", ["mean", "frobenius"])
@pytest.mark.parametrize("key_scale", [1.0, 1e3])
def test_repeated_frame_later_copies_get_only_the_floor(head_agg, key_scale):
    # Holds while the budget fits one frame's distinct content: the floor picks of chunks 2..T are
    # contents not yet kept, so chunk 1 can take at most n_0 − (T−1)·f more fresh tokens.
    n_chunks, per_chunk = 4, 64
    frame_k, frame_v = random_kv(per_chunk, heads=2, dk=16, dv=16, seed=7)
    keys, values = (frame_k * key_scale).repeat(n_chunks, 1, 1), frame_v.repeat(n_chunks, 1, 1)
    layout = TokenLayout((per_chunk,) * n_chunks, grid_hw=(8, 8))
    s = IWPSettings(head_agg=head_agg, floor=0.25)  # the PC-MMR floor these tests were written for
    budget = budget_for(layout.n_tokens, 0.2)  # 52 tokens
    f = expected_floor(budget, n_chunks, s.floor)
    assert f == 3
    keep = select_tokens_pcmmr(keys, values, layout, budget, s)
    counts = chunk_counts(keep, layout)
    assert counts[1:] == [f] * (n_chunks - 1)
    assert counts[0] == budget - f * (n_chunks - 1)
    assert len({int(j) % per_chunk for j in keep}) == budget  # no content kept twice


def test_static_background_moves_budget_to_the_changing_chunk():
    # Chunks 0, 1, 3 are one static frame; chunk 2 is new content: it should collect the remainder.
    frame_k, frame_v = random_kv(16, heads=2, dk=16, dv=16, seed=3)
    new_k, new_v = random_kv(16, heads=2, dk=16, dv=16, seed=4)
    keys = torch.cat([frame_k, frame_k, new_k, frame_k])
    values = torch.cat([frame_v, frame_v, new_v, frame_v])
    layout = TokenLayout((16,) * 4)
    counts = chunk_counts(select_tokens_pcmmr(keys, values, layout, 24, IWPSettings(floor=0.25)), layout)
    assert counts[1] == counts[3] == expected_floor(24, 4, 0.25)
    assert counts[2] >= 8 and counts[0] >= 8


@pytest.mark.parametrize("chunking", ["temporal", "fixed"])
@pytest.mark.parametrize("head_agg", ["mean", "frobenius"])
def test_batch_equals_per_video(chunking, head_agg):
    s = IWPSettings(chunking=chunking, head_agg=head_agg, fixed_chunk_size=10, floor=0.25)
    layouts = [TokenLayout((12,) * 3), TokenLayout((7, 20, 3, 9)), TokenLayout((5,)), TokenLayout((16,) * 4)]
    budgets = [budget_for(layout.n_tokens, r) for layout, r in zip(layouts, (0.3, 0.55, 1.0, 0.1))]
    kv = [random_kv(layout.n_tokens, heads=2, dk=8, dv=8, seed=i) for i, layout in enumerate(layouts)]
    batch = select_tokens_pcmmr_batch([k for k, _ in kv], [v for _, v in kv], layouts, budgets, s)
    for (k, v), layout, budget, got in zip(kv, layouts, budgets, batch):
        assert got.tolist() == select_tokens_pcmmr(k, v, layout, budget, s).tolist()


def test_bad_inputs_are_rejected():
    keys, values = random_kv(10)
    with pytest.raises(ValueError):
        select_tokens_pcmmr(keys, values, TokenLayout((10,)), 11)
    with pytest.raises(ValueError):
        select_tokens_pcmmr(keys, values, TokenLayout((4, 5)), 3)
    with pytest.raises(ValueError):
        IWPSettings(chunking="spatial")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("head_agg", ["mean", "frobenius"])
@pytest.mark.parametrize("key_scale", [1.0, 4.0])
def test_matrix_form_picks_equal_the_elementwise_form(seed, head_agg, key_scale):
    # Random continuous inputs: the forms differ by rounding only, so no near-tie flips a pick here.
    s = IWPSettings(head_agg=head_agg, lam=0.5, floor=0.25)
    layouts = [TokenLayout((48,) * 4), TokenLayout((30, 50, 20)), TokenLayout((64,) * 2)]
    kv = [random_kv(layout.n_tokens, heads=4, dk=32, dv=32, seed=10 * seed + i, key_scale=key_scale)
          for i, layout in enumerate(layouts)]
    budgets = [budget_for(layout.n_tokens, r) for layout, r in zip(layouts, (0.25, 0.4, 0.1))]
    args = ([k for k, _ in kv], [v for _, v in kv], layouts, budgets, s)
    matrix = select_tokens_pcmmr_batch(*args, form="matrix")
    elementwise = select_tokens_pcmmr_batch(*args, form="elementwise")
    assert [m.tolist() for m in matrix] == [e.tolist() for e in elementwise]


@pytest.mark.parametrize("head_agg", ["mean", "frobenius"])
@pytest.mark.parametrize("floor", [0.0, 0.25])
def test_matrix_form_treats_exact_copies_as_duplicates(head_agg, floor):
    # Huge key norms: ‖a‖²+‖b‖²−2a·b of two equal keys is far from 0 in float32, yet a copy of a pick must
    # get the pick's own duplication (the vision skip produces exact copies of whole groups).
    per_chunk = 64
    frame_k, frame_v = random_kv(per_chunk, heads=2, dk=64, dv=16, seed=5, key_scale=1e3)
    keys, values = frame_k.repeat(4, 1, 1), frame_v.repeat(4, 1, 1)
    layout = TokenLayout((per_chunk,) * 4)
    s = IWPSettings(head_agg=head_agg, floor=floor)
    matrix = select_tokens_pcmmr(keys, values, layout, 52, s, form="matrix")
    assert matrix.tolist() == select_tokens_pcmmr(keys, values, layout, 52, s, form="elementwise").tolist()
    assert len({int(j) % per_chunk for j in matrix}) == 52  # no content kept twice


@pytest.mark.parametrize("head_agg", ["mean", "frobenius"])
@pytest.mark.parametrize("key_scale", [1.0, 1e2, 1e3])
def test_matrix_rows_give_copies_exactly_the_picks_own_duplication(head_agg, key_scale):
    from iwp.metric import pair_duplication, token_features
    from iwp.metric import content_ids
    from iwp.select import _MatrixRows, _stack_features

    keys, values = random_kv(32, heads=2, dk=128, dv=16, seed=5, key_scale=key_scale)
    keys, values = keys.repeat(3, 1, 1), values.repeat(3, 1, 1)
    f = token_features(keys, values, IWPSettings(head_agg=head_agg))
    ids = content_ids(f.keys, f.unit_values, f.head_weights)
    assert ids[:32].unique().numel() == 32 and torch.equal(ids[:32], ids[32:64])
    rows = _MatrixRows(_stack_features([f], 96), torch.ones(1, 96, dtype=torch.bool), ids[None])
    for p in (0, 7, 40, 95):
        row = rows(torch.tensor([p]))[0]
        own = pair_duplication(f.take(slice(p, p + 1)), f.take(slice(p, p + 1)))
        assert torch.equal(row[torch.arange(p % 32, 96, 32)], own.expand(3))


def test_unknown_form_is_rejected():
    keys, values = random_kv(10)
    with pytest.raises(ValueError, match="form"):
        select_tokens_pcmmr(keys, values, TokenLayout((10,)), 3, form="dense")
