"""Vision skip: repeated temporal groups reuse an encoded group's embeddings, on tiny models of both architectures."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.loading import load_model, make_adapter
from actors.vision_skip import DEFAULT_SKIP_THRESHOLD, encoded_groups, group_differences, repeat_sources
from pipeline.config import RunConfig


def _frame(seed, side=112):
    return np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)


def test_repeat_sources_points_copies_at_the_last_encoded_group():
    a, b = _frame(1), _frame(2)
    frames = np.stack([a, a, a, a, b, b, a, a])  # groups of 2: A A B A
    assert repeat_sources(frames, 2, 0.0) == [0, 0, 2, 3]  # A after B is compared with B: encoded again
    assert repeat_sources(frames, 2, None) == [0, 1, 2, 3]
    assert repeat_sources(frames, 1, 0.0) == [0, 0, 0, 0, 4, 4, 6, 6]
    assert encoded_groups([0, 0, 2, 3]) == [0, 2, 3]
    assert group_differences(frames, 2)[1] == 0.0 and group_differences(frames, 2)[2] > 10


def test_slow_drift_is_compared_with_the_last_encoded_group_not_chained():
    base = np.full((64, 64, 3), 100, dtype=np.uint8)
    frames = np.stack([base + i for i in range(6)])  # each frame +1 grey level: diff 1 to the previous one
    assert repeat_sources(frames, 1, 1.0) == [0, 0, 2, 2, 4, 4]


def test_odd_frame_count_is_padded_like_the_processor():
    a = _frame(3)
    assert repeat_sources(np.stack([a, a, a]), 2, 0.0) == [0, 0]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava_onevision"])
def loaded(request, tiny_qwen, tiny_llava):
    path = tiny_qwen if request.param == "qwen2_5_vl" else tiny_llava
    model, processor, _ = load_model(str(path))
    return request.param, model, processor


def test_skipped_groups_are_exact_copies_and_match_the_full_tower(loaded):
    arch, model, processor = loaded
    a, b, c = _frame(4), _frame(5), _frame(6)
    videos = [np.stack([a, a, a, a, b, b, b, b]), np.stack([c, c, a, a]), np.stack([b, c, a, b, c, a])]
    ts = [list(np.arange(len(v)) / 4.0) for v in videos]
    full = make_adapter(model, processor).encode(videos, ts)
    skip = make_adapter(model, processor, skip_threshold=0.0).encode(videos, ts)
    group = model.config.vision_config.temporal_patch_size if arch == "qwen2_5_vl" else 1
    expected_encoded = {"qwen2_5_vl": [2, 2, 3], "llava_onevision": [2, 2, 6]}[arch]
    for v, f, s, n_enc in zip(videos, full, skip, expected_encoded):
        sources = repeat_sources(v, group, 0.0)
        assert s.meta["groups_encoded"] == n_enc == len(encoded_groups(sources))
        assert s.layout == f.layout and s.embeds.shape == f.embeds.shape
        per = s.layout.chunk_sizes[0]
        for g, src in enumerate(sources):  # a copy is bit for bit its source group's embeddings
            assert torch.equal(s.embeds[g * per:(g + 1) * per], s.embeds[src * per:(src + 1) * per])
        torch.testing.assert_close(s.embeds, f.embeds, atol=1e-4, rtol=1e-4)  # = running the tower on every group
        if f.trailing is not None:
            torch.testing.assert_close(s.trailing, f.trailing)
    assert all("groups_encoded" in f.meta and f.meta["groups_encoded"] == f.layout.n_chunks for f in full)


def test_config_default_and_labeling_hash():
    base = dict(input="in", output="out", model="m")
    assert RunConfig(**base).vision_skip_threshold == DEFAULT_SKIP_THRESHOLD
    assert RunConfig(**base).skip_threshold() is None  # off by default until its quality run is done
    on = RunConfig(**base, vision_skip=True)
    assert on.skip_threshold() == DEFAULT_SKIP_THRESHOLD
    assert RunConfig(**base, vision_skip=True, vision_skip_threshold=2.0).labeling_hash() != on.labeling_hash()
    off = RunConfig(**base, vision_skip=False)
    assert off.skip_threshold() is None and off.labeling_hash() != on.labeling_hash()
    assert RunConfig(**base, vision_skip=False, vision_skip_threshold=2.0).labeling_hash() == off.labeling_hash()
