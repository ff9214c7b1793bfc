"""The pruning seam on tiny models of the real architectures: equivalence, exact budgets, positions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from actors.generation import greedy_generate, prefill_logits
from actors.loading import load_model, make_adapter
from actors.splice import PruneSpec, prune_video
from iwp import PRUNERS

PROMPT = "Describe this video."
FRAME_COUNTS = (8, 4, 6)  # a batch of 3 videos of different lengths


def _videos(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (t, 112, 112, 3), dtype=np.uint8) for t in FRAME_COUNTS]


def _timestamps(videos, fps=8.0):
    return [list(np.arange(len(v)) / fps) for v in videos]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava_onevision"])
def loaded(request, tiny_qwen, tiny_llava):
    path = tiny_qwen if request.param == "qwen2_5_vl" else tiny_llava
    model, processor, _ = load_model(str(path))
    return request.param, model, processor, make_adapter(model, processor)


def _reference_logits(arch, model, processor, video, fps=8.0):
    """The unmodified transformers forward on the processor's own inputs."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    kwargs = {"do_sample_frames": False} if arch == "qwen2_5_vl" else {}
    inputs = processor(text=[text], videos=[video], return_tensors="pt", **kwargs)
    if arch == "qwen2_5_vl":  # the same seconds-per-token-group the adapter derives from timestamps
        inputs["second_per_grid_ts"] = torch.tensor([model.config.vision_config.temporal_patch_size / fps])
    with torch.no_grad():
        return model(**inputs).logits[0]


def test_retention_1_reproduces_unpruned_logits_for_a_batch(loaded):
    arch, model, processor, adapter = loaded
    videos = _videos()
    encoded = adapter.encode(videos, _timestamps(videos))
    seqs = []
    for enc in encoded:
        full = prune_video(enc, PruneSpec(method="iwp", retention=1.0), adapter.language_model)
        assert full.keep.numel() == enc.embeds.shape[0]
        seqs.append(adapter.splice(enc, full, PROMPT))
    batched = prefill_logits(model, seqs)  # left-padded batch of 3 different lengths
    for b, video in enumerate(videos):
        ref = _reference_logits(arch, model, processor, video)
        got = batched[b, -ref.shape[0]:]
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("retention", [0.25, 0.5])
def test_llm_receives_exactly_ceil_r_n_visual_tokens(loaded, retention):
    arch, model, processor, adapter = loaded
    videos = _videos(1)
    encoded = adapter.encode(videos, _timestamps(videos))
    for enc in encoded:
        n = enc.embeds.shape[0]
        pruned = prune_video(enc, PruneSpec(method="iwp", retention=retention), adapter.language_model)
        seq = adapter.splice(enc, pruned, PROMPT)
        full_ids = adapter.full_input_ids(enc, PROMPT)
        n_text = int((full_ids != adapter.video_token_id).sum())
        n_extra = 0 if enc.trailing is None else enc.trailing.shape[0]
        assert pruned.keep.numel() == math.ceil(retention * n)
        assert seq.embeds.shape[0] == n_text + math.ceil(retention * n) + n_extra


def test_kept_tokens_carry_their_original_positions(loaded):
    arch, model, processor, adapter = loaded
    videos = _videos(2)[:1]
    enc = adapter.encode(videos, _timestamps(videos))[0]
    full = adapter.splice(enc, prune_video(enc, PruneSpec(), adapter.language_model), PROMPT)
    pruned = prune_video(enc, PruneSpec(method="iwp", retention=0.25), adapter.language_model)
    seq = adapter.splice(enc, pruned, PROMPT)
    ids = adapter.full_input_ids(enc, PROMPT)
    video_idx = torch.nonzero(ids == adapter.video_token_id).squeeze(1)[: enc.embeds.shape[0]]
    keep_mask = ids != adapter.video_token_id
    keep_mask[video_idx[pruned.keep]] = True
    if enc.trailing is not None:
        keep_mask[torch.nonzero(ids == adapter.video_token_id).squeeze(1)[enc.embeds.shape[0]:]] = True
    # every kept token (text and visual) has the position it had in the full sequence
    assert torch.equal(seq.positions, full.positions[:, keep_mask])
    # text after the video keeps its original (large) positions: decoding continues after them
    assert seq.positions.max() == full.positions.max()
    # the kept visual embeddings are the vision tower's, unchanged (iwp selects, does not merge)
    kept_rows = torch.nonzero(keep_mask).squeeze(1)
    visual_rows = torch.isin(kept_rows, video_idx[pruned.keep])
    torch.testing.assert_close(seq.embeds[visual_rows], enc.embeds[pruned.keep])


@pytest.mark.parametrize("method", [m for m in PRUNERS if m != "none"])
def test_every_pruner_runs_through_the_seam_and_generates(loaded, method):
    arch, model, processor, adapter = loaded
    videos = _videos(3)
    encoded = adapter.encode(videos, _timestamps(videos))
    spec = PruneSpec(method=method, retention=0.25)
    seqs, kept = [], []
    for enc in encoded:
        scores = None
        if method == "fastv":
            scores = torch.rand(enc.embeds.shape[0], generator=torch.Generator().manual_seed(0))
        pruned = prune_video(enc, spec, adapter.language_model, attn_scores=scores)
        kept.append((pruned.keep.numel(), math.ceil(0.25 * enc.embeds.shape[0])))
        assert pruned.residual is not None and 0.0 <= pruned.residual <= 1.0 + 1e-6
        seqs.append(adapter.splice(enc, pruned, PROMPT))
    assert all(k == want for k, want in kept)
    tok = processor.tokenizer
    out = greedy_generate(model, seqs, max_new_tokens=3, eos_token_ids={tok.eos_token_id},
                          pad_token_id=tok.pad_token_id)
    assert len(out.tokens) == len(videos)


def test_greedy_generate_matches_transformers_generate_unpruned(tiny_qwen):
    """Our decode loop (explicit positions, left padding) continues exactly like HF generate."""
    model, processor, _ = load_model(str(tiny_qwen))
    adapter = make_adapter(model, processor)
    video = _videos(4)[0]
    enc = adapter.encode([video], _timestamps([video]))[0]
    seq = adapter.splice(enc, prune_video(enc, PruneSpec(), adapter.language_model), PROMPT)
    ours = greedy_generate(model, [seq], max_new_tokens=6, eos_token_ids={-1}, pad_token_id=0).tokens[0]
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], videos=[video], return_tensors="pt", do_sample_frames=False)
    inputs["second_per_grid_ts"] = torch.tensor([2 / 8.0])
    ref = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None, min_new_tokens=6)
    assert ours == ref[0, inputs["input_ids"].shape[1]:].tolist()


def test_quality_guard_raises_the_budget_until_the_residual_is_under_the_limit(tiny_qwen):
    model, processor, _ = load_model(str(tiny_qwen))
    adapter = make_adapter(model, processor)
    videos = _videos(5)[:1]
    enc = adapter.encode(videos, _timestamps(videos))[0]
    base = prune_video(enc, PruneSpec(method="iwp", retention=0.1), adapter.language_model)
    limit = base.residual * 0.5
    guarded = prune_video(enc, PruneSpec(method="iwp", retention=0.1, max_residual=limit, max_retention=1.0),
                          adapter.language_model)
    assert guarded.retention_used > 0.1
    assert guarded.residual <= limit
    assert guarded.keep.numel() == math.ceil(guarded.retention_used * enc.embeds.shape[0])
    capped = prune_video(enc, PruneSpec(method="iwp", retention=0.1, max_residual=1e-9, max_retention=0.3),
                         adapter.language_model)
    assert capped.retention_used == pytest.approx(0.3)
