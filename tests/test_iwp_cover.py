"""Temporal coverage selection (iwp.cover): exact budgets, the basis + novelty split, and coverage greedy vs a
brute-force facility-location oracle on the dense IWP kernel."""
import itertools

import pytest
import torch

from iwp import IWPSettings, TokenLayout, prune_tokens
from iwp.cover import chunk_budgets, select_tokens_cover, split_capped, token_novelty
from iwp.metric import duplication_matrix, token_features
from iwp.settings import CHUNK_BUDGETS, SELECTIONS


def _video(groups=8, per=16, heads=2, d=16, seed=0, changed=((5, 4),)):
    """A static video (every group a copy of the first) with `changed` = ((group, n_tokens), ...) replaced."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(per, heads, d, generator=g), torch.randn(per, heads, d, generator=g)
    keys, values = k.repeat(groups, 1, 1), v.repeat(groups, 1, 1)
    for group, n in changed:
        keys[group * per:group * per + n] = torch.randn(n, heads, d, generator=g)
        values[group * per:group * per + n] = torch.randn(n, heads, d, generator=g)
    return keys, values, TokenLayout((per,) * groups, (4, per // 4))


@pytest.mark.parametrize("selection,chunk_budget", list(itertools.product(SELECTIONS, CHUNK_BUDGETS)))
@pytest.mark.parametrize("budget", [1, 13, 128])
def test_exact_budget_sorted_unique(selection, chunk_budget, budget):
    g = torch.Generator().manual_seed(budget)
    keys, values = torch.randn(128, 2, 16, generator=g), torch.randn(128, 2, 16, generator=g)
    layout = TokenLayout((16,) * 8, (4, 4))
    keep = select_tokens_cover(keys, values, layout, budget, IWPSettings(selection=selection, chunk_budget=chunk_budget))
    assert keep.numel() == budget and torch.equal(keep, torch.sort(torch.unique(keep)).values)


def test_novelty_is_the_first_group_and_what_changes():
    keys, values, layout = _video()
    nov = token_novelty(token_features(keys, values, IWPSettings()), layout)
    per_group = nov.view(8, 16).sum(1)
    assert per_group[0] == 16  # the basis: all novel
    assert torch.all(per_group[[1, 2, 3, 4, 6, 7]] < 1e-5)  # exact copies of earlier groups: nothing new
    assert 3.0 < per_group[5] <= 4.0  # the four changed tokens
    shares = chunk_budgets(layout, 32, IWPSettings(chunk_budget="novelty", floor=0.25), nov)
    assert sum(shares) == 32 and shares[0] == 16  # the basis is kept whole (capped at its size) ...
    assert shares[5] > max(shares[i] for i in (1, 2, 3, 4, 6, 7))  # ... then the changed group gets the rest


def test_novelty_cover_keeps_every_distinct_token_of_a_static_video():
    # 16 distinct tokens + 4 changed ones: a budget of 20 covers the video exactly (every token has a copy kept)
    keys, values, layout = _video()
    s = IWPSettings(selection="cover", chunk_budget="novelty", floor=0.0)
    keep = select_tokens_cover(keys, values, layout, 20, s)
    f = token_features(keys, values, s)
    cover = duplication_matrix(f, f.take(keep)).max(dim=1).values
    assert torch.all(cover > 1 - 1e-5)


def test_cover_greedy_matches_facility_location_oracle():
    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(40, 2, 8, generator=g), torch.randn(40, 2, 8, generator=g)
    layout = TokenLayout((40,))
    s = IWPSettings(selection="cover", chunk_budget="global")
    f = token_features(keys, values, s)
    dup = duplication_matrix(f, f).clamp_min(0.0)
    picked, cover = [], torch.zeros(40)
    for _ in range(9):  # brute force: evaluate every candidate's total coverage
        totals = [float(torch.maximum(cover, dup[:, j]).sum()) if j not in picked else -1.0 for j in range(40)]
        j = max(range(40), key=lambda c: (totals[c], -c))
        picked.append(j)
        cover = torch.maximum(cover, dup[:, j])
    assert select_tokens_cover(keys, values, layout, 9, s).tolist() == sorted(picked)


def test_split_capped_respects_caps_and_total():
    out = split_capped(10, [5.0, 0.0, 1.0], [3, 4, 10])
    assert sum(out) == 10 and all(o <= c for o, c in zip(out, [3, 4, 10])) and out[0] == 3
    assert split_capped(5, [0.0, 0.0], [2, 3]) == [2, 3]  # no weight anywhere: spread by caps


def test_old_selection_is_kept_as_iwp_pcmmr():
    keys, values, layout = _video(changed=((3, 6), (6, 2)))
    emb = torch.randn(128, 8)
    old = prune_tokens("iwp_pcmmr", emb, layout, 13, keys=keys, values=values).keep
    ref = prune_tokens("iwp", emb, layout, 13, keys=keys, values=values,
                       settings=IWPSettings(selection="pcmmr", chunk_budget="floor", floor=0.25)).keep
    assert torch.equal(old, ref)


def test_shipped_floor_is_an_even_share_then_novelty():
    """floor 1.0 (the shipped default): K >= T gives every group floor(K/T) and only the remainder ∝ novelty;
    K < T gives every pick ∝ novelty."""
    keys, values, layout = _video()
    s = IWPSettings()
    nov = token_novelty(token_features(keys, values, s), layout)
    assert chunk_budgets(layout, 32, s, nov) == [4] * 8
    shares = chunk_budgets(layout, 13, s, nov)
    assert min(shares) == 1 and sum(shares) == 13 and shares[0] == 1 + 4 and shares[5] == 2
    assert chunk_budgets(layout, 7, s, nov)[0] >= 5


def _oracle_cover(dup: torch.Tensor, layout: TokenLayout, per_chunk: list[int]) -> list[int]:
    """Brute force per group: every candidate's total coverage, the first index on exact ties."""
    picked, cover = [], torch.zeros(dup.shape[0], dtype=dup.dtype)
    dup = dup.clamp_min(0.0)
    for start, size, k in zip(layout.chunk_starts(), layout.chunk_sizes, per_chunk):
        for _ in range(k):
            totals = {j: float(torch.maximum(cover, dup[:, j]).sum()) for j in range(start, start + size)
                      if j not in picked}
            j = max(totals, key=lambda c: (totals[c], -c))
            picked.append(j)
            cover = torch.maximum(cover, dup[:, j])
    return sorted(picked)


def test_cover_with_exact_copies_matches_the_oracle_and_zero_gain_ties_go_to_the_first_index():
    # group 0: 8 distinct tokens; groups 1-2: copies of them in another order. After group 0's 6 picks only the
    # copies of its 2 unpicked tokens gain anything; every later pick has gain exactly 0 and must be the earliest.
    g = torch.Generator().manual_seed(11)
    k, v = torch.randn(8, 2, 8, generator=g), torch.randn(8, 2, 8, generator=g)
    perm = torch.tensor([3, 0, 7, 5, 1, 6, 2, 4])
    keys, values = torch.cat([k, k[perm], k.flip(0)]), torch.cat([v, v[perm], v.flip(0)])
    layout = TokenLayout((8, 8, 8))
    s = IWPSettings(chunk_budget="floor", floor=1.0)
    f = token_features(keys, values, s)
    for form in ("matrix", "elementwise"):
        keep = select_tokens_cover(keys, values, layout, 18, s, form=form)
        assert keep.tolist() == _oracle_cover(duplication_matrix(f, f).double(), layout, [6, 6, 6]), form


@pytest.mark.parametrize("head_agg", ["mean", "frobenius"])
@pytest.mark.parametrize("key_scale", [0.3, 1.0, 3.0])
def test_cover_matrix_form_picks_equal_the_elementwise_form(head_agg, key_scale, monkeypatch):
    import iwp.cover as cover

    g = torch.Generator().manual_seed(int(key_scale * 10))
    keys, values = torch.randn(6 * 24, 2, 16, generator=g) * key_scale, torch.randn(6 * 24, 2, 16, generator=g)
    keys[48:72], values[48:72] = keys[:24], values[:24]  # a repeated group: exact copies
    layout = TokenLayout((24,) * 6)
    s = IWPSettings(head_agg=head_agg)
    for budget in (7, 36, 70):
        reference = select_tokens_cover(keys, values, layout, budget, s, form="elementwise")
        assert torch.equal(select_tokens_cover(keys, values, layout, budget, s), reference)  # one (N, N) matrix
        monkeypatch.setattr(cover, "_FULL_MATRIX_ELEMENTS", 0)  # long videos: one block per group
        assert torch.equal(select_tokens_cover(keys, values, layout, budget, s), reference)
        monkeypatch.undo()


@pytest.mark.parametrize("head_agg", ["mean", "frobenius"])
@pytest.mark.parametrize("key_scale,atol", [(1.0, 1e-5), (30.0, 1e-3)])
def test_dense_duplication_is_the_elementwise_kernel_in_matrix_form(head_agg, key_scale, atol):
    from iwp.metric import DenseDuplication

    g = torch.Generator().manual_seed(2)
    keys, values = torch.randn(90, 3, 32, generator=g) * key_scale, torch.randn(90, 3, 8, generator=g)
    keys[5] = keys[4] + 1e-3  # near copies: a distance from a cancellation-prone difference of norms
    keys[60:], values[60:] = keys[:30], values[:30]  # copies
    f = token_features(keys, values, IWPSettings(head_agg=head_agg))
    reference = duplication_matrix(f, f)
    kernel = DenseDuplication(f)
    full = kernel.full()
    # keys ~30 per dim: exponents are differences of ~5e3 norms, so near copies lose ~5e-4 to float32 rounding
    assert torch.allclose(full, reference, atol=atol) and torch.equal(full, full.T)
    copies = torch.arange(30)
    assert torch.equal(full[copies, copies + 60], reference[copies, copies + 60])  # exactly the elementwise value
    assert torch.equal(full.diagonal(), reference.diagonal())
    assert torch.equal(full[:30], full[60:])  # copies get equal rows
    rows, cols = torch.tensor([60, 3, 70]), torch.tensor([0, 5, 64, 89])
    assert torch.allclose(kernel.block(rows, cols), reference[rows][:, cols], atol=atol)
    assert torch.equal(kernel.block(rows, cols)[0, 0], reference[60, 0])  # a pair of copies through index tensors
