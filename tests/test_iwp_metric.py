"""IWP kernel quantities checked against brute-force float64 formulas, and the residual."""

import math

import pytest
import torch

from iwp import (
    IWPSettings,
    TokenLayout,
    budget_for,
    duplication,
    log_magnitude,
    relative_residual,
    select_tokens_mmr_exact,
)


def random_kv(n, heads=2, dk=8, dv=8, seed=0, key_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, heads, dk, generator=g) * key_scale, torch.randn(n, heads, dv, generator=g)


def clustered_kv(n, heads=2, dk=8, dv=8, clusters=6, noise=0.15, seed=0):
    # Tokens near a few centres, positive values: off-diagonal kernel terms matter and v_i·v_j >= 0.
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(clusters, (n,), generator=g)
    kc, vc = torch.randn(clusters, heads, dk, generator=g), torch.rand(clusters, heads, dv, generator=g)
    keys = kc[label] + noise * torch.randn(n, heads, dk, generator=g)
    values = (vc[label] + noise * torch.rand(n, heads, dv, generator=g)).abs()
    return keys, values


def kernel_gram(keys, values, tau=1.0):
    """(N, N, H) float64 terms (v_ih·v_jh)·exp(k_ih·k_jh / (τ√d)) of ‖W‖²_F, straight from the definition."""
    k, v = keys.double(), values.double()
    scale = tau * math.sqrt(k.shape[-1])
    return torch.einsum("ihd,jhd->ijh", v, v) * torch.exp(torch.einsum("ihd,jhd->ijh", k, k) / scale)


def brute_residual(keys, values, keep, tau=1.0):
    gram = kernel_gram(keys, values, tau).sum(-1)
    drop = torch.ones(keys.shape[0], dtype=torch.bool)
    drop[keep] = False
    return float(gram[drop][:, drop].sum() / gram.sum())


def test_budget_for_rounds_up_without_fp_error_and_clamps():
    assert budget_for(8, 0.25) == 2
    assert budget_for(10, 0.7) == 7  # 0.7*10 == 7.000000000000001 in floating point
    assert budget_for(100, 0.29) == 29
    assert budget_for(10, 0.71) == 8
    assert budget_for(10, 0.0) == 1 and budget_for(10, 1e-9) == 1
    assert budget_for(10, 1.0) == 10 and budget_for(10, 1.5) == 10
    with pytest.raises(ValueError):
        budget_for(0, 0.5)


def test_token_layout():
    layout = TokenLayout((3, 2, 4))
    assert layout.n_tokens == 9 and layout.n_chunks == 3
    assert layout.chunk_ids().tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert TokenLayout((6, 6), grid_hw=(2, 3)).grid_hw == (2, 3)
    with pytest.raises(ValueError):
        TokenLayout((6, 4), grid_hw=(2, 3))
    with pytest.raises(ValueError):
        TokenLayout(())


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_frobenius_magnitude_and_duplication_match_the_definition(tau):
    keys, values = random_kv(12, heads=3, dk=4, dv=5, seed=1)
    s = IWPSettings(head_agg="frobenius", temperature=tau)
    gram = kernel_gram(keys, values, tau).sum(-1)  # Σ_h (v_ih·v_jh) κ_h
    m = gram.diagonal().sqrt()  # m_i² = Σ_h ‖v_ih‖² exp(‖k_ih‖²/(τ√d))
    assert torch.allclose(log_magnitude(keys, values, s).double(), m.log(), rtol=1e-5, atol=1e-5)
    expected = gram / (m[:, None] * m[None, :])
    assert torch.allclose(duplication(keys, values, keys, values, s).double(), expected, atol=1e-5)


def test_mean_aggregation_is_the_mean_of_per_head_terms():
    keys, values = random_kv(9, heads=2, dk=4, dv=4, seed=2)
    s = IWPSettings(head_agg="mean")
    per_head_dup = [duplication(keys[:, h], values[:, h], keys[:, h], values[:, h], s) for h in range(2)]
    assert torch.allclose(duplication(keys, values, keys, values, s), (per_head_dup[0] + per_head_dup[1]) / 2, atol=1e-6)
    per_head_log_m = [log_magnitude(keys[:, h], values[:, h], s) for h in range(2)]
    assert torch.allclose(log_magnitude(keys, values, s), (per_head_log_m[0] + per_head_log_m[1]) / 2, atol=1e-5)


def test_single_head_mean_and_frobenius_agree():
    keys, values = random_kv(20, heads=1, dk=8, dv=8, seed=3)
    mean, frob = IWPSettings(head_agg="mean"), IWPSettings(head_agg="frobenius")
    assert torch.allclose(log_magnitude(keys, values, mean), log_magnitude(keys, values, frob), atol=1e-5)
    assert torch.allclose(
        duplication(keys, values, keys, values, mean), duplication(keys, values, keys, values, frob), atol=1e-6
    )
    assert select_tokens_mmr_exact(keys, values, 7, mean).tolist() == select_tokens_mmr_exact(keys, values, 7, frob).tolist()


def test_duplication_is_value_cosine_times_key_rbf():
    keys, values = random_kv(6, heads=1, dk=4, dv=3, seed=4)
    k, v = keys[:, 0].double(), values[:, 0].double()
    cos = torch.nn.functional.normalize(v, dim=-1) @ torch.nn.functional.normalize(v, dim=-1).T
    rbf = torch.exp(-torch.cdist(k, k).square() / (2 * 2.0 * math.sqrt(4)))
    got = duplication(keys, values, keys, values, IWPSettings(temperature=2.0))
    assert torch.allclose(got.double(), cos * rbf, atol=1e-6)
    assert torch.allclose(got.diagonal(), torch.ones(6), atol=1e-6)  # a token duplicates itself fully


@pytest.mark.parametrize("head_agg", ["mean", "frobenius"])
def test_huge_key_norms_stay_finite(head_agg):
    keys, values = random_kv(30, heads=2, dk=16, dv=8, seed=5, key_scale=1e3)
    values[3] = 0.0  # an all-zero value must not give -inf or NaN
    s = IWPSettings(head_agg=head_agg)
    log_m = log_magnitude(keys, values, s)
    assert torch.isfinite(log_m).all()
    dup = duplication(keys.bfloat16(), values.bfloat16(), keys.bfloat16(), values.bfloat16(), s)
    assert torch.isfinite(dup).all() and float(dup.abs().max()) <= 1 + 1e-5
    r = relative_residual(keys, values, torch.arange(10), s)
    assert math.isfinite(r) and 0.0 <= r <= 1.0
    r_sampled = relative_residual(keys, values, torch.arange(10), s, max_exact=0)
    assert math.isfinite(r_sampled) and r_sampled >= 0.0


def test_residual_matches_the_definition_and_is_zero_at_full_keep():
    keys, values = clustered_kv(40, seed=6)
    assert relative_residual(keys, values, torch.arange(40)) == 0.0
    assert relative_residual(keys, values, torch.ones(40, dtype=torch.bool)) == 0.0
    for keep in (torch.tensor([0]), torch.arange(0, 40, 3), torch.arange(35)):
        assert relative_residual(keys, values, keep) == pytest.approx(brute_residual(keys, values, keep), rel=1e-4, abs=1e-7)
    tau = 2.5
    got = relative_residual(keys, values, torch.arange(0, 40, 2), IWPSettings(temperature=tau))
    assert got == pytest.approx(brute_residual(keys, values, torch.arange(0, 40, 2), tau), rel=1e-4)


@pytest.mark.parametrize("s", [IWPSettings(floor=0.0), IWPSettings(floor=0.0, head_agg="frobenius", lam=0.7)])
def test_residual_is_non_increasing_along_the_greedy_order(s):
    # Monotone when every v_i·v_j >= 0 (positive values): adding u_j to S then always shrinks ‖W − W_S‖.
    keys, values = clustered_kv(48, seed=7)
    residuals = [relative_residual(keys, values, select_tokens_mmr_exact(keys, values, k, s)) for k in range(1, 49)]
    assert residuals[-1] == 0.0 and residuals[0] < 1.0
    assert all(later <= earlier + 1e-6 for earlier, later in zip(residuals, residuals[1:]))


def test_residual_can_exceed_one_with_anti_correlated_values():
    # Documents the [0, ~1] caveat: two tokens that cancel in W leave a large relative residual.
    keys = torch.zeros(2, 1, 4)
    values = torch.tensor([[[1.0, 0, 0, 0]], [[-0.9, 0, 0, 0]]])
    assert relative_residual(keys, values, torch.tensor([1])) > 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_residual_is_close_to_exact(seed):
    keys, values = clustered_kv(600, seed=seed, noise=0.3)
    keep = torch.arange(0, 600, 4)
    exact = relative_residual(keys, values, keep, max_exact=2048)
    assert 0.2 < exact < 0.95  # non-trivial, and off-diagonal terms dominate ‖W‖² here
    g = torch.Generator().manual_seed(123)
    assert relative_residual(keys, values, keep, max_exact=100, n_samples=8192, generator=g) == pytest.approx(exact, abs=0.05)
    # Averaged over independent draws the estimate centres on the exact value.
    draws = [relative_residual(keys, values, keep, max_exact=100, generator=torch.Generator().manual_seed(s)) for s in range(16)]
    assert sum(draws) / len(draws) == pytest.approx(exact, abs=0.015)
    # A small dropped set (most tokens kept) is sampled on its own, so it stays accurate too.
    most = torch.arange(540)
    assert relative_residual(keys, values, most, max_exact=100) == pytest.approx(
        relative_residual(keys, values, most), rel=0.15
    )
    default = relative_residual(keys, values, keep, max_exact=100)
    assert default == relative_residual(keys, values, keep, max_exact=100)  # seeded from settings.seed
