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
