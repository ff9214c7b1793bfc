"""Mass compensation's guarantees, on tiny models of both real architectures.

The theory made executable: m identical keys/values at one position attend exactly like one copy with bias
log m; retention 1.0 with compensation still reproduces the unpruned logits; a video of identical temporal
groups pruned to one group is much closer to the unpruned model with compensation than without; batched
left-padded generation with biases equals one-by-one generation.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from actors.attention_bias import prefill_mask, step_mask
from actors.generation import SplicedSequence, greedy_generate, prefill_logits
from actors.loading import load_model, make_adapter
from actors.splice import PruneSpec, prune_video
from iwp import TokenLayout, assign_to_kept, compensated_residual, merged_embeddings, relative_residual

PROMPT = "Describe this video."
FRAME_COUNTS = (8, 4, 6)  # a batch of 3 videos of different lengths


def _videos(seed=0, counts=FRAME_COUNTS):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (t, 112, 112, 3), dtype=np.uint8) for t in counts]


def _timestamps(videos, fps=8.0):
    return [list(np.arange(len(v)) / fps) for v in videos]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava_onevision"])
def loaded(request, tiny_qwen, tiny_llava):
    path = tiny_qwen if request.param == "qwen2_5_vl" else tiny_llava
    model, processor, _ = load_model(str(path))
    return request.param, model, processor, make_adapter(model, processor)


# ------------------------------------------------------------------ the kernel side (pure torch)

def test_exact_duplicates_are_assigned_to_their_copy_and_leave_no_residual():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(10, 2, 8, generator=g), torch.randn(10, 2, 8, generator=g)
    k3, v3 = keys.repeat(3, 1, 1), values.repeat(3, 1, 1)  # three identical temporal groups of 10 tokens
    keep = torch.arange(10, 20)  # the middle group
    comp = assign_to_kept(k3, v3, keep)
    assert comp.owner.tolist() == list(range(10)) * 3
    assert comp.counts.tolist() == [3.0] * 10
    plain = relative_residual(k3, v3, keep)
    assert plain == pytest.approx(4 / 9, rel=1e-5)  # ‖W − W/3‖²/‖W‖² = (2/3)²
    assert compensated_residual(k3, v3, keep, comp.counts) == pytest.approx(0.0, abs=1e-6)
    assert compensated_residual(k3, v3, keep, torch.ones(10)) == pytest.approx(plain, rel=1e-6)


def test_chunk_assignment_stays_in_the_chunk_and_counts_sum_to_n():
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(24, 2, 8, generator=g), torch.randn(24, 2, 8, generator=g)
    layout = TokenLayout(chunk_sizes=(8, 8, 8))
    keep = torch.tensor([0, 3, 9, 12, 14])  # chunk 2 keeps nothing: its tokens fall back to any kept token
    comp = assign_to_kept(keys, values, keep, layout=layout, assignment="chunk")
    chunk = layout.chunk_ids()
    assert comp.counts.sum() == 24 and (comp.counts >= 1).all()
    assert comp.owner[keep].tolist() == list(range(5))
    for j in range(16):
        assert chunk[keep[comp.owner[j]]] == chunk[j]
    merged = merged_embeddings(torch.arange(24.0)[:, None], comp)
    for i in range(5):
        assert merged[i, 0] == pytest.approx(float(torch.arange(24.0)[comp.owner == i].mean()))


def test_compensated_residual_matches_the_definition_and_its_sampled_estimate():
    g = torch.Generator().manual_seed(2)
    keys, values = torch.randn(30, 2, 4, generator=g), torch.randn(30, 2, 4, generator=g)
    keep = torch.tensor([1, 5, 8, 20])
    counts = torch.tensor([2.0, 10.0, 3.0, 15.0])
    kk, kv = torch.randn(4, 2, 4, generator=g), torch.randn(4, 2, 4, generator=g)
    d = keys.shape[-1]

    def w_norm(ks, vs, coef):  # Σ_h Σ_ij c_i c_j v_i·v_j exp(k_i·k_j/√d), float64 brute force
        ks, vs, coef = ks.double(), vs.double(), coef.double()
        total = 0.0
        for h in range(ks.shape[1]):
            kern = torch.exp(ks[:, h] @ ks[:, h].T / math.sqrt(d))
            total += float((coef[:, None] * coef[None, :] * (vs[:, h] @ vs[:, h].T) * kern).sum())
        return total

    allk, allv = torch.cat([keys, kk]), torch.cat([values, kv])
    want = w_norm(allk, allv, torch.cat([torch.ones(30), -counts])) / w_norm(keys, values, torch.ones(30))
    got = compensated_residual(keys, values, keep, counts, kk, kv)
    assert got == pytest.approx(want, rel=1e-4)
    sampled = compensated_residual(keys, values, keep, counts, kk, kv, max_exact=0, n_samples=200_000)
    assert sampled == pytest.approx(want, rel=0.1)


def test_sampled_residual_of_near_copies_follows_the_exact_one_with_owner():
    """Large videos get a sampled residual. With every token a near-copy of its kept token the residual is small;
    the difference form (owner given) must estimate it, not the noise of ±W terms that cancel."""
    g = torch.Generator().manual_seed(5)
    base_k, base_v = torch.randn(40, 2, 8, generator=g), torch.randn(40, 2, 8, generator=g)
    owner = torch.arange(400) % 40
    keys = base_k[owner] + 0.02 * torch.randn(400, 2, 8, generator=g)
    values = base_v[owner] + 0.02 * torch.randn(400, 2, 8, generator=g)
    keep = torch.arange(40)  # the first copy of each base token is kept and stands for its ten copies
    comp = assign_to_kept(keys, values, keep)
    assert comp.counts.sum() == 400
    exact = compensated_residual(keys, values, keep, comp.counts)
    assert 0 < exact < 0.01
    for seed in range(3):
        est = compensated_residual(keys, values, keep, comp.counts, max_exact=0, n_samples=20_000,
                                   generator=torch.Generator().manual_seed(seed), owner=comp.owner)
        assert est == pytest.approx(exact, rel=0.15), (seed, est, exact)  # its SD here: ~3.5 % (12 % at 4096)
    # merged kept tokens: the same identity with the merged keys/values as the owners' terms
    kk, kv = torch.randn(40, 2, 8, generator=g) * 0.01 + keys[keep], values[keep]
    exact_m = compensated_residual(keys, values, keep, comp.counts, kk, kv)
    est_m = compensated_residual(keys, values, keep, comp.counts, kk, kv, max_exact=0, n_samples=20_000,
                                 generator=torch.Generator().manual_seed(0), owner=comp.owner)
    assert est_m == pytest.approx(exact_m, rel=0.2)
    with pytest.raises(ValueError, match="owner"):
        compensated_residual(keys, values, keep, comp.counts, max_exact=0, owner=torch.zeros(400, dtype=torch.long))


# ------------------------------------------------------------------ the model side

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava_onevision"])
def test_attention_module_m_copies_equal_one_copy_with_log_m_bias(arch, attn, tiny_qwen, tiny_llava):
    """The model's own attention layer: m identical keys/values at one position == one copy + bias log m."""
    model, _, _ = load_model(str(tiny_qwen if arch == "qwen2_5_vl" else tiny_llava), attn_implementation=attn)
    lm = model.model.language_model
    attn_mod = lm.layers[0].self_attn
    g = torch.Generator().manual_seed(3)
    d = lm.config.hidden_size
    before, dup, after = torch.randn(3, d, generator=g), torch.randn(1, d, generator=g), torch.randn(4, d, generator=g)
    for m in (2, 5):
        copies = torch.cat([before, dup.repeat(m, 1), after])[None]
        pos_copies = torch.tensor([0, 1, 2] + [3] * m + [4, 5, 6, 7])  # every copy at the same position
        one = torch.cat([before, dup, after])[None]
        pos_one = torch.arange(8)

        def run(h, pos, bias):
            position_ids = pos[None] if arch == "llava_onevision" else pos.view(1, 1, -1).expand(3, 1, -1)
            cos_sin = lm.rotary_emb(h, position_ids)
            mask = prefill_mask(torch.ones(1, h.shape[1], dtype=torch.long), bias[None], h.dtype)
            with torch.no_grad():
                return attn_mod(hidden_states=h, attention_mask=mask, position_embeddings=cos_sin)[0][0]

        out_copies = run(copies, pos_copies, torch.zeros(copies.shape[1]))
        bias = torch.zeros(8)
        bias[3] = math.log(m)
        out_one = run(one, pos_one, bias)
        # the queries after the copies see exactly the same attention output
        torch.testing.assert_close(out_copies[-4:], out_one[-4:], atol=1e-5, rtol=1e-4)
        if m > 1:  # and without the bias they do not (the test can fail)
            plain = run(one, pos_one, torch.zeros(8))
            assert (plain[-4:] - out_copies[-4:]).abs().max() > 1e-3


def test_retention_1_with_compensation_reproduces_unpruned_logits_for_a_batch(loaded):
    arch, model, processor, adapter = loaded
    videos = _videos()
    encoded = adapter.encode(videos, _timestamps(videos))
    plain, comp = [], []
    for enc in encoded:
        full = prune_video(enc, PruneSpec(method="iwp", retention=1.0), adapter.language_model)
        both = prune_video(enc, PruneSpec(method="iwp", retention=1.0, compensation="bias+merge"),
                           adapter.language_model)
        assert both.counts is not None and both.counts.tolist() == [1.0] * enc.embeds.shape[0]
        plain.append(adapter.splice(enc, full, PROMPT))
        comp.append(adapter.splice(enc, both, PROMPT))
        assert comp[-1].key_bias is not None and plain[-1].key_bias is None
    ref = prefill_logits(model, plain)  # the 2-D mask path (equal to transformers' own forward: test_splice)
    got = prefill_logits(model, comp)  # the 4-D float mask path with zero bias
    for b, seq in enumerate(plain):
        n = seq.embeds.shape[0]
        torch.testing.assert_close(got[b, -n:], ref[b, -n:], atol=1e-4, rtol=1e-4)


def _text_states(model, lm, seq: SplicedSequence, n_text: int):
    """Attention outputs of every layer and the logits at the last n_text positions (the text after the video)."""
    outs = []
    hooks = [layer.self_attn.register_forward_hook(lambda _m, _i, o: outs.append(o[0][0, -n_text:].float()))
             for layer in lm.layers]
    try:
        logits = prefill_logits(model, [seq])[0, -n_text:].float()
    finally:
        for h in hooks:
            h.remove()
    return outs, logits


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_identical_temporal_groups_pruned_to_one_group_compensation_is_much_closer(loaded):
    arch, model, processor, adapter = loaded
    rng = np.random.default_rng(5)
    frame = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
    video = np.stack([frame] * 8)  # 4 identical temporal groups (Qwen2.5-VL) / 8 identical frames (LLaVA)
    enc = adapter.encode([video], _timestamps([video]))[0]
    groups = enc.layout.n_chunks
    assert groups >= 4
    torch.testing.assert_close(enc.embeds[: enc.layout.chunk_sizes[0]], enc.embeds[-enc.layout.chunk_sizes[0]:])
    ids = adapter.full_input_ids(enc, PROMPT)
    n_text = len(ids) - int(torch.nonzero(ids == adapter.video_token_id).max()) - 1
    full = prune_video(enc, PruneSpec(), adapter.language_model)
    ref_attn, ref_logits = _text_states(model, adapter.language_model, adapter.splice(enc, full, PROMPT), n_text)
    errors = {}
    for comp in ("none", "bias", "bias+merge"):
        spec = PruneSpec(method="uniform", retention=1.0 / groups, compensation=comp)
        pruned = prune_video(enc, spec, adapter.language_model)
        assert pruned.keep.numel() == enc.layout.chunk_sizes[0]  # exactly one temporal group kept
        attn, logits = _text_states(model, adapter.language_model, adapter.splice(enc, pruned, PROMPT), n_text)
        errors[comp] = (float(np.mean([_rel(a, b) for a, b in zip(attn, ref_attn)])), _rel(logits, ref_logits),
                        pruned.residual)
    print(f"\n{arch}: one of {groups} identical groups kept; (attention-output rel. error, logits rel. error, "
          f"residual): {errors}")
    for comp in ("bias", "bias+merge"):
        assert errors[comp][0] < 0.5 * errors["none"][0]
        assert errors[comp][1] < 0.7 * errors["none"][1]  # logits: rotary differences between copies remain
        assert errors[comp][2] == pytest.approx(0.0, abs=1e-6)  # the kernel sees exact copies
    assert errors["none"][2] > 0.5


def test_batched_generation_with_biases_equals_one_by_one(loaded):
    arch, model, processor, adapter = loaded
    videos = _videos(7)
    encoded = adapter.encode(videos, _timestamps(videos))
    spec = PruneSpec(method="iwp", retention=0.25, compensation="bias")
    seqs = []
    for enc in encoded:
        pruned = prune_video(enc, spec, adapter.language_model)
        assert pruned.counts is not None and pruned.counts.max() > 1
        seqs.append(adapter.splice(enc, pruned, PROMPT))
    eos = {processor.tokenizer.eos_token_id} - {None}
    kwargs = dict(max_new_tokens=6, eos_token_ids=eos, pad_token_id=0)
    batched = greedy_generate(model, seqs, **kwargs).tokens
    single = [greedy_generate(model, [s], **kwargs).tokens[0] for s in seqs]
    assert batched == single
    # and the bias changes what is generated or scored: the same sequences without it give other logits
    plain = [SplicedSequence(s.embeds, s.positions) for s in seqs]
    assert not torch.allclose(prefill_logits(model, seqs)[:, -1], prefill_logits(model, plain)[:, -1], atol=1e-4)


def test_step_mask_is_padding_plus_bias():
    pad = torch.tensor([[0, 1, 1], [1, 1, 1]])
    bias = torch.tensor([[0.0, 0.5, 0.0], [1.0, 0.0, 0.0]])
    m = step_mask(pad, bias, torch.float32)
    assert m.shape == (2, 1, 1, 3)
    assert m[0, 0, 0, 0] == torch.finfo(torch.float32).min and m[0, 0, 0, 1] == 0.5 and m[1, 0, 0, 0] == 1.0
