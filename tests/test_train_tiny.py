"""`bench.train_tiny`: the per-token training labels say what the clip shows, and a short training run is a
normal, loadable model directory that the same seed reproduces exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench import synthetic_qa as sq
from bench import train_tiny as tt

PER_GROUP = (sq.SIZE // 28) ** 2


def _clip_with(pred, limit: int = 400) -> sq.SynthClip:
    for i in range(limit):
        clip = sq.make_clip("train", i)
        if pred(clip):
            return clip
    raise AssertionError("no such clip in the first clips")


def test_token_labels_match_the_scene():
    clip = _clip_with(lambda c: len(c.objects) >= 2 and any(o.appear > 0 for o in c.objects))
    tokens = sq.token_labels(clip)
    assert tokens.shape == (sq.FRAMES // sq.GROUP * PER_GROUP, 5)
    colours = list(sq.COLOURS)
    for o in clip.objects:
        mine = np.nonzero(tokens[:, 0] == 1 + colours.index(o.colour))[0]
        assert len(mine), o
        groups = mine // PER_GROUP
        # an object labels tokens only in the groups where it is visible
        assert groups.min() >= o.appear // sq.GROUP and groups.max() < -(-o.disappear // sq.GROUP)
        assert set(tokens[mine, 1]) == {1 + sq.SHAPES.index(o.shape)}
        assert set(tokens[mine, 2]) == {1 + list(sq.SIZES).index(o.size)}
        assert set(tokens[mine, 3]) == {1 + list(sq.DIRECTIONS).index(o.direction)}


def test_temporal_labels_look_back_in_time():
    clip = _clip_with(lambda c: len(c.objects) >= 2 and any(o.appear > 0 for o in c.objects)
                      and any(o.disappear < sq.FRAMES for o in c.objects))
    tokens = sq.token_labels(clip)
    lab = tt.temporal_labels(clip, tokens)
    colours = list(sq.COLOURS)
    for o in clip.objects:
        mine = tokens[:, 0] == 1 + colours.index(o.colour)
        assert set(lab[mine, 0]) == {1 + o.appear // sq.GROUP}
    assert (lab[tokens[:, 0] == 0, 0] == 0).all()
    seen = lab[::PER_GROUP, 1]
    gone = lab[::PER_GROUP, 2]
    assert (np.diff(seen) >= 0).all() and seen[-1] == len(clip.objects)
    assert seen[0] == sum(o.appear < sq.GROUP for o in clip.objects)
    assert (np.diff(gone) >= 0).all() and gone[-1] == sum(o.disappear < sq.FRAMES for o in clip.objects)


def test_token_labels_on_a_finer_grid_agree_with_the_scene():
    """At 168 px (6x6 tokens per group) every object still labels tokens of its own groups only, with its own
    attributes, and covers about the same share of the frame as on the 4x4 grid."""
    clip = _clip_with(lambda c: len(c.objects) >= 2 and any(o.appear > 0 for o in c.objects))
    coarse, fine = sq.token_labels(clip), sq.token_labels(clip, 6)
    assert fine.shape == (sq.FRAMES // sq.GROUP * 36, 5)
    colours = list(sq.COLOURS)
    for o in clip.objects:
        mine = np.nonzero(fine[:, 0] == 1 + colours.index(o.colour))[0]
        assert len(mine), o
        assert (mine // 36).min() >= o.appear // sq.GROUP and (mine // 36).max() < -(-o.disappear // sq.GROUP)
        assert set(fine[mine, 1]) == {1 + sq.SHAPES.index(o.shape)}
        share = [(lab[:, 0] == 1 + colours.index(o.colour)).mean() for lab in (coarse, fine)]
        assert share[1] == pytest.approx(share[0], abs=0.08)


@pytest.mark.parametrize("side", [112, 168])
def test_patchify_matches_the_processor(side):
    from dataclasses import replace

    from actors.model_shapes import TextShape, VisionShape

    small = replace(tt.TRAINED, text=TextShape(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vocab=None,
                                               tied=True, rope_theta=10000.0),
                    vision=VisionShape(depth=1, hidden=32, intermediate=64, heads=2, fullatt=(0,), tokens_per_second=4))
    _, processor = tt.build_model(0, small, frame_side=side)
    assert tt.check_patchify(processor, side) < 1e-4  # resize (168: bicubic upscale) + normalise + patch layout
    clip = sq.make_clip("val", 0)
    grid = processor.video_processor(videos=[clip.frames], return_tensors="pt")["video_grid_thw"].tolist()
    assert grid == [[sq.FRAMES // 2, side // 14, side // 14]]
    with pytest.raises(ValueError, match="frame_side"):
        tt.check_frame_side(150)


def _short_run(out, seed: int = 0) -> dict:
    return tt.train(out, seed=seed, steps=3, batch=2, questions=2, vision_steps=2, train_clips=8, eval_clips=2,
                    eval_every=0, warmup=2, threads=1)


def test_short_training_run_is_a_loadable_reproducible_model(tmp_path):
    from actors.splice import PruneSpec
    from bench.qa_scoring import QAItem, QAModel, answer_items

    a = _short_run(tmp_path / "a")
    b = _short_run(tmp_path / "b")
    for d in ("a", "b"):
        assert (tmp_path / d / "config.json").is_file() and (tmp_path / d / "train_summary.json").is_file()
    log = [json.loads(line) for line in open(tmp_path / "a" / "train_log.jsonl")]
    assert {e["event"] for e in log} >= {"start", "vision_step", "step", "final"}
    assert 0.0 <= a["test"]["mc_greedy"] <= 1.0 and a["test"]["questions"] > 0
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "same seed, same build: the weights must repeat"
    assert a["test"] == b["test"]
    # the output directory is a model the pipeline's loader takes, and it is trained (not the seed's init)
    qa = QAModel.load(str(tmp_path / "a"))
    init = tt.build_model(0)[0].state_dict()
    trained = qa.model.state_dict()
    assert init.keys() == trained.keys()
    assert any(not torch.equal(init[k], trained[k].to(init[k].dtype)) for k in init)
    clip = sq.make_clip("test", 0)
    enc = qa.encode([clip.frames], [clip.timestamps])
    q = clip.questions[0]
    (row,) = answer_items(qa, enc, [QAItem(0, q.prompt("mc"), q.answer, q.options, q.qtype)], PruneSpec(),
                          loglik=True)
    assert isinstance(row["text"], str)


@pytest.mark.parametrize("acc,expect", [(0.93, "meets"), (0.7, "BELOW")])
def test_readme_verdict_follows_the_measurement(acc, expect):
    lines = tt._can_do({"mc_greedy": acc, "mc_by_type": {"count": 0.95, "direction": 0.5}})
    assert expect in lines[0]
    assert any("count" in line and ">= 90%" in line for line in lines)
    assert any("direction" in line and "< 60%" in line for line in lines)
