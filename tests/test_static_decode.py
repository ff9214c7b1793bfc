"""The static-cache decode loop (actors.static_decode) gives exactly the tokens of the dynamic loop.

Tiny random-weight models of both architectures, a batch of three videos of different lengths (left
padding), with and without the compensation bias (a 4-D float mask), with no EOS, with EOS inside the
window for some rows (their later tokens are padding) and for every row (the loop stops at its next check).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.attention_bias import open_step_slot, static_key_row, static_prefill_mask
from actors.generation import greedy_generate
from actors.loading import load_model, make_adapter
from actors.splice import PruneSpec, prune_video
from actors.static_decode import StaticDecoder, cache_length

PROMPT = "Describe this video."
FRAME_COUNTS = (8, 4, 6)  # a batch of 3 videos of different lengths
NEW_TOKENS = 10


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava_onevision"])
def batches(request, tiny_qwen, tiny_llava):
    """(model, {compensation: spliced batch}) for one architecture."""
    path = tiny_qwen if request.param == "qwen2_5_vl" else tiny_llava
    model, processor, _ = load_model(str(path))
    # larger random LLM weights: at the init scale the tiny model says one token whatever it sees
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in [*model.model.language_model.parameters(), model.lm_head.weight]:
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    adapter = make_adapter(model, processor)
    rng = np.random.default_rng(3)
    videos = [rng.integers(0, 255, (t, 112, 112, 3), dtype=np.uint8) for t in FRAME_COUNTS]
    encoded = adapter.encode(videos, [list(np.arange(len(v)) / 8.0) for v in videos])
    out = {}
    for comp in ("none", "bias"):
        spec = PruneSpec(method="iwp", retention=0.25, compensation=comp)
        out[comp] = [adapter.splice(e, prune_video(e, spec, adapter.language_model), PROMPT) for e in encoded]
    assert any(s.key_bias is not None for s in out["bias"]) and all(s.key_bias is None for s in out["none"])
    return model, out


def _both(model, seqs, eos, decoder):
    kw = dict(max_new_tokens=NEW_TOKENS, eos_token_ids=eos, pad_token_id=0)
    return greedy_generate(model, seqs, **kw), decoder.generate(seqs, **kw)


@pytest.mark.parametrize("comp", ["none", "bias"])
def test_static_loop_gives_the_dynamic_loops_tokens(batches, comp):
    model, by_comp = batches
    seqs = by_comp[comp]
    decoder = StaticDecoder(model, eos_check_every=4)
    dyn, sta = _both(model, seqs, {-1}, decoder)  # no EOS: every row runs the whole window
    assert sta.tokens == dyn.tokens and sta.new_tokens == dyn.new_tokens == NEW_TOKENS
    assert len({tuple(t) for t in dyn.tokens}) > 1  # rows differ: the padding is exercised, not a copy

    # EOS inside the window for one row: its 3rd token ends it, the others go on (or end where it appears)
    stop = dyn.tokens[0][2]
    d2, s2 = _both(model, seqs, {stop}, decoder)  # the same decoder: its cache is reused and reset
    assert s2.tokens == d2.tokens and s2.new_tokens == d2.new_tokens
    assert d2.tokens[0] == dyn.tokens[0][:dyn.tokens[0].index(stop)]

    # EOS for every row by step 2: the dynamic loop stops at once, the static one at its next check
    eos = {row[1] for row in dyn.tokens}
    d3, s3 = _both(model, seqs, eos, decoder)
    assert s3.tokens == d3.tokens and s3.new_tokens == d3.new_tokens <= 2


def test_compiled_step_gives_the_same_tokens(batches):
    model, by_comp = batches
    seqs = by_comp["bias"]
    eos = {-1}
    plain = StaticDecoder(model).generate(seqs, max_new_tokens=4, eos_token_ids=eos, pad_token_id=0)
    # the CPU backend without code generation keeps the test cheap; it still traces the step through dynamo
    compiled = StaticDecoder(model, compile_step=True, compile_mode=None)
    compiled._step = torch.compile(compiled._plain_step, backend="aot_eager", dynamic=False)
    for _ in range(2):  # the second batch reuses the cache (reset in place) and the traced step
        out = compiled.generate(seqs, max_new_tokens=4, eos_token_ids=eos, pad_token_id=0)
        assert out.tokens == plain.tokens


def test_static_masks_are_causal_padding_bias_and_open_one_slot_per_step():
    pad = torch.tensor([[0, 1, 1], [1, 1, 1]])
    bias = torch.tensor([[0.0, 0.5, 0.0], [1.0, 0.0, 0.0]])
    neg = torch.finfo(torch.float32).min
    row = static_key_row(pad, bias, 5, torch.float32)
    assert row.tolist() == [[neg, 0.5, 0.0, neg, neg], [1.0, 0.0, 0.0, neg, neg]]
    pre = static_prefill_mask(row, 3)
    assert pre.shape == (2, 1, 3, 5)
    assert pre[1, 0, 0].tolist() == [1.0, neg, neg, neg, neg] and pre[1, 0, 2].tolist() == [1.0, 0.0, 0.0, neg, neg]
    step = row[:, None, None, :].clone()
    open_step_slot(step, 3)
    assert step[:, 0, 0, 3].tolist() == [0.0, 0.0] and step[0, 0, 0, 4] == neg
    assert cache_length(100, 32) == 192 and cache_length(1, 1) == 64


def test_eos_check_every_must_be_positive(batches):
    with pytest.raises(ValueError, match="eos_check_every"):
        StaticDecoder(batches[0], eos_check_every=0)


def test_captioner_with_the_static_loop_writes_the_same_rows(tiny_qwen):
    import json

    from actors.captioner import VideoCaptioner

    rng = np.random.default_rng(5)
    rows = []
    for i, t in enumerate((4, 6)):
        frames = rng.integers(0, 255, (t, 56, 56, 3), dtype=np.uint8)
        rows.append({"video_id": f"v{i}", "uri": f"mem://v{i}", "status": "ok", "frames": frames.tobytes(),
                     "frames_shape": list(frames.shape), "frame_timestamps": list(np.arange(t) / 4.0),
                     "prompts": json.dumps([["p0", PROMPT], ["p1", "What moves?"]])})
    spec = PruneSpec(method="iwp", retention=0.5, compensation="bias")
    texts = {}
    for loop in ("dynamic", "static"):
        cap = VideoCaptioner(model=str(tiny_qwen), prune=spec, max_new_tokens=5, batch_size=3, decode_loop=loop,
                             eos_check_every=2)
        assert (cap.decoder is None) == (loop == "dynamic")
        out = cap.label_videos(rows)
        assert [r["status"] for r in out] == ["ok"] * 4
        texts[loop] = [(r["video_id"], r["prompt_id"], r["text"], r["new_tokens"]) for r in out]
    assert texts["static"] == texts["dynamic"]
