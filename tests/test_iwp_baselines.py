"""Every pruning method behind prune_tokens: exact budgets and the behaviour that defines it."""

import pytest
import torch

from iwp import (
    PRUNERS,
    IWPSettings,
    TokenLayout,
    budget_for,
    log_magnitude,
    prune_tokens,
    relative_residual,
    select_tokens_pcmmr,
)

LAYOUT = TokenLayout((16,) * 5, grid_hw=(4, 4))
N, D = LAYOUT.n_tokens, 12


def inputs(seed=0, n=N, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return dict(
        embeds=torch.randn(n, D, generator=g).to(dtype),
        keys=torch.randn(n, 2, 8, generator=g).to(dtype),
        values=torch.randn(n, 2, 8, generator=g).to(dtype),
        attn_scores=torch.rand(n, generator=g),
    )


def run(method, layout=LAYOUT, budget=20, **kw):
    x = inputs(n=layout.n_tokens)
    x.update(kw)
    return prune_tokens(method, x.pop("embeds"), layout, budget, **x)


@pytest.mark.parametrize("method", PRUNERS)
@pytest.mark.parametrize(
    "layout", [LAYOUT, TokenLayout((7, 20, 3, 9)), TokenLayout((30,))], ids=["grid", "uneven", "one"]
)
@pytest.mark.parametrize("retention", [0.01, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_every_method_keeps_exactly_the_budget(method, layout, retention):
    budget = budget_for(layout.n_tokens, retention)
    if method == "none" and budget != layout.n_tokens:
        with pytest.raises(ValueError):
            run(method, layout, budget)
        return
    result = run(method, layout, budget)
    keep = result.keep.tolist()
    assert len(keep) == budget and keep == sorted(set(keep))
    assert 0 <= keep[0] and keep[-1] < layout.n_tokens
    if method in ("visionzip", "dycoke"):
        assert result.embeds is not None and result.embeds.shape == (budget, D)
    else:
        assert result.embeds is None
    assert (result.residual is not None) == method.startswith("iwp")


def test_bf16_inputs_work_and_merged_embeds_keep_the_dtype():
    x = inputs(dtype=torch.bfloat16)
    for method in PRUNERS:
        budget = N if method == "none" else 20
        result = prune_tokens(method, x["embeds"], LAYOUT, budget, keys=x["keys"], values=x["values"], attn_scores=x["attn_scores"])
        assert result.keep.numel() == budget
        if result.embeds is not None:
            assert result.embeds.dtype == torch.bfloat16 and torch.isfinite(result.embeds.float()).all()


def test_missing_inputs_raise_clear_errors():
    x = inputs()
    with pytest.raises(ValueError, match="attention scores"):
        prune_tokens("fastv", x["embeds"], LAYOUT, 10)
    for method in ("iwp", "iwp_magnitude", "iwp_duplication", "iwp_fixed"):
        with pytest.raises(ValueError, match="keys and values"):
            prune_tokens(method, x["embeds"], LAYOUT, 10)
    with pytest.raises(ValueError, match="unknown"):
        prune_tokens("topk", x["embeds"], LAYOUT, 10)
    with pytest.raises(ValueError):
        prune_tokens("random", x["embeds"], LAYOUT, 0)


def test_random_is_seeded():
    x = inputs()
    first = prune_tokens("random", x["embeds"], LAYOUT, 20, generator=torch.Generator().manual_seed(5)).keep
    again = prune_tokens("random", x["embeds"], LAYOUT, 20, generator=torch.Generator().manual_seed(5)).keep
    other = prune_tokens("random", x["embeds"], LAYOUT, 20, generator=torch.Generator().manual_seed(6)).keep
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(prune_tokens("random", x["embeds"], LAYOUT, 20).keep, prune_tokens("random", x["embeds"], LAYOUT, 20).keep)


def test_fastv_keeps_the_most_attended_tokens():
    x = inputs()
    keep = prune_tokens("fastv", x["embeds"], LAYOUT, 7, attn_scores=x["attn_scores"]).keep
    assert set(keep.tolist()) == set(torch.topk(x["attn_scores"], 7).indices.tolist())


def test_downsample_pools_each_frame_grid_evenly():
    keep = run("downsample", budget=20).keep  # 4 per 4×4 frame: a 2×2 pooled grid
    per_chunk = keep.view(5, 4) - torch.arange(5).unsqueeze(1) * 16
    assert (per_chunk == torch.tensor([5, 7, 13, 15])).all()  # rows {1, 3} × cols {1, 3}
    keep = run("downsample", budget=5 * 16).keep
    assert keep.tolist() == list(range(N))
    counts = torch.bincount(LAYOUT.chunk_ids()[run("downsample", budget=23).keep], minlength=5)
    assert counts.max() - counts.min() <= 1


def test_uniform_keeps_whole_evenly_spaced_frames():
    keep = run("uniform", budget=32).keep
    assert LAYOUT.chunk_ids()[keep].tolist() == [1] * 16 + [3] * 16  # two whole frames, spread over time
    keep = run("uniform", budget=40).keep
    assert torch.bincount(LAYOUT.chunk_ids()[keep], minlength=5).tolist() == [16, 0, 16, 0, 8]


def test_divprune_spreads_over_clusters_starting_at_the_largest_norm():
    g = torch.Generator().manual_seed(1)
    centres = torch.nn.functional.normalize(torch.randn(4, D, generator=g), dim=-1) * torch.tensor([[1.0], [2.0], [3.0], [9.0]])
    label = torch.arange(N) % 4
    embeds = centres[label] + 0.01 * torch.randn(N, D, generator=g)
    keep = prune_tokens("divprune", embeds, LAYOUT, 4).keep
    assert sorted(label[keep].tolist()) == [0, 1, 2, 3]
    assert int(torch.linalg.vector_norm(embeds, dim=-1).argmax()) in keep.tolist()


def test_visionzip_keeps_dominant_tokens_and_merges_contexts():
    x = inputs()
    result = prune_tokens("visionzip", x["embeds"], LAYOUT, 10, attn_scores=x["attn_scores"])
    dominant = set(torch.topk(x["attn_scores"], 8).indices.tolist())  # 80% of 10
    assert dominant <= set(result.keep.tolist())
    position = {j: p for p, j in enumerate(result.keep.tolist())}
    for j in dominant:  # dominant tokens pass through unchanged
        assert torch.equal(result.embeds[position[j]], x["embeds"][j])
    contexts = [p for j, p in position.items() if j not in dominant]
    assert len(contexts) == 2
    # Every non-kept token went into one context token: the averages are mixtures, not originals.
    assert not any(torch.equal(result.embeds[p], x["embeds"][j]) for j, p in position.items() if j not in dominant)
    # Without scores the attention proxy still gives an exact, deterministic budget.
    proxy = prune_tokens("visionzip", x["embeds"], LAYOUT, 10)
    assert proxy.keep.numel() == 10 and torch.equal(proxy.keep, prune_tokens("visionzip", x["embeds"], LAYOUT, 10).keep)


def test_dycoke_merges_repeated_frames_into_the_first():
    g = torch.Generator().manual_seed(2)
    frame = torch.randn(16, D, generator=g)
    embeds = frame.repeat(5, 1)
    new = torch.randn(D, generator=g)
    embeds[3 * 16 + 5] = embeds[4 * 16 + 5] = new  # one position changes in frame 3 and stays changed
    result = prune_tokens("dycoke", embeds, LAYOUT, 17)
    assert result.keep.tolist() == list(range(16)) + [3 * 16 + 5]
    assert torch.allclose(result.embeds[:16], frame, atol=1e-6)  # averages of identical copies
    assert torch.allclose(result.embeds[16], new)  # frame 4's copy merged into its frame-3 anchor
    # Budget below one frame: falls back to spatial merging, still exact.
    small = prune_tokens("dycoke", embeds, LAYOUT, 6)
    assert small.keep.numel() == 6 and small.embeds.shape == (6, D)


def test_iwp_uses_temporal_cover_and_reports_the_residual():
    from iwp.cover import select_tokens_cover

    x = inputs()
    s = IWPSettings(lam=0.6)
    result = prune_tokens("iwp", x["embeds"], LAYOUT, 20, keys=x["keys"], values=x["values"], settings=s)
    assert torch.equal(result.keep, select_tokens_cover(x["keys"], x["values"], LAYOUT, 20, s))
    pcmmr = prune_tokens("iwp_pcmmr", x["embeds"], LAYOUT, 20, keys=x["keys"], values=x["values"], settings=s)
    assert torch.equal(pcmmr.keep, select_tokens_pcmmr(x["keys"], x["values"], LAYOUT, 20, IWPSettings(lam=0.6, floor=0.25)))
    assert result.residual == pytest.approx(relative_residual(x["keys"], x["values"], result.keep, s))
    assert 0.0 < result.residual < 1.0
    fixed = prune_tokens("iwp_fixed", x["embeds"], LAYOUT, 20, keys=x["keys"], values=x["values"], settings=s)
    assert torch.equal(
        fixed.keep, select_tokens_pcmmr(x["keys"], x["values"], LAYOUT, 20, IWPSettings(lam=0.6, chunking="fixed"))
    )


def test_magnitude_ablation_picks_the_top_magnitude_tokens():
    x = inputs()
    s = IWPSettings(floor=0.0)
    keep = prune_tokens("iwp_magnitude", x["embeds"], LAYOUT, 15, keys=x["keys"], values=x["values"], settings=s).keep
    top = torch.topk(log_magnitude(x["keys"], x["values"], s), 15).indices
    assert set(keep.tolist()) == set(top.tolist())


def test_duplication_ablation_avoids_repeated_content():
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(16, 2, 8, generator=g), torch.randn(16, 2, 8, generator=g)
    keys, values = k.repeat(5, 1, 1), v.repeat(5, 1, 1)
    embeds = torch.randn(N, D, generator=g)
    s = IWPSettings(floor=0.0)
    keep = prune_tokens("iwp_duplication", embeds, LAYOUT, 16, keys=keys, values=values, settings=s).keep
    assert sorted((keep % 16).tolist()) == list(range(16))  # each distinct token once
    mag = prune_tokens("iwp_magnitude", embeds, LAYOUT, 16, keys=keys, values=values, settings=s).keep
    assert len(set((mag % 16).tolist())) < 16  # magnitude alone keeps copies
