"""RunConfig: YAML and flags are one object; bad values name the field and the reason."""
from __future__ import annotations

import pytest

from pipeline.config import ConfigError, RunConfig, load_config

BASE = dict(input="videos", output="out", model="m")


def test_yaml_and_overrides_merge_with_dashes(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("input: a\noutput: b\nmodel: c\nnum-frames: 12\npruner: iwp\nretention: 0.5\n")
    cfg = load_config(p, retention=0.25, batch_size=None)
    assert (cfg.num_frames, cfg.pruner, cfg.retention, cfg.batch_size) == (12, "iwp", 0.25, 4)


@pytest.mark.parametrize("overrides, field, reason", [
    ({"retention": 1.5}, "retention", "less than or equal to 1"),
    ({"pruner": "magic"}, "pruner", "unknown pruner 'magic'"),
    ({"num_frames": 0}, "num_frames", "greater than or equal to 1"),
    ({"task": "summarize"}, "task", "'caption' or 'qa'"),
    ({"bogus_option": 1}, "bogus_option", "unknown option"),
    ({"retention": 0.5}, "config", "needs a pruner"),
    ({"start": 5.0, "end": 2.0}, "config", "must be greater than start"),
    ({"iwp_layer": 3}, "iwp_layer", "only layer 0"),
    ({"pruner": "random", "max_residual": 0.1}, "config", "needs an iwp pruner"),
    ({"pruner": "iwp", "compensation": "weights"}, "compensation", "'auto', 'none', 'bias', 'merge' or 'bias+merge'"),
    ({"compensation": "bias"}, "config", "compensation needs a pruner"),
    ({"compile_decode": True}, "config", "compile_decode needs decode_loop 'static'"),
    ({"decode_loop": "fast"}, "decode_loop", "'dynamic' or 'static'"),
    ({"decode_loop": "static", "eos_check_every": 0}, "eos_check_every", "greater than or equal to 1"),
    ({"pruner": "iwp", "compensation_assignment": "frame"}, "compensation_assignment", "'global' or 'chunk'"),
])
def test_bad_values_name_the_field_and_reason(overrides, field, reason):
    with pytest.raises(ConfigError) as e:
        load_config(None, **{**BASE, **overrides})
    assert field in str(e.value) and reason in str(e.value)


def test_missing_required_field_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="model: Field required"):
        load_config(None, input="a", output="b")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_labeling_hash_tracks_what_changes_the_text():
    a = RunConfig(**BASE)
    assert a.labeling_hash() == RunConfig(**BASE, batch_size=16, concurrency=3).labeling_hash()
    assert a.labeling_hash() != RunConfig(**BASE, pruner="iwp", retention=0.5).labeling_hash()
    assert a.labeling_hash() != RunConfig(**BASE, max_new_tokens=8).labeling_hash()
    # the prompt is the row's prompt_id, not part of the labeling config: a new prompt adds rows only
    assert a.labeling_hash() == RunConfig(**BASE, prompt="What happens?").labeling_hash()
    iwp = RunConfig(**BASE, pruner="iwp", retention=0.5)
    assert iwp.labeling_hash() != RunConfig(**BASE, pruner="iwp", retention=0.5, compensation="none").labeling_hash()
    other = "cover" if iwp.iwp_selection == "pcmmr" else "pcmmr"
    assert iwp.labeling_hash() != RunConfig(**BASE, pruner="iwp", retention=0.5, iwp_selection=other).labeling_hash()
    # the IWP selection knobs are hashed only for IWP pruners: other pruners' hashes did not move
    dy = RunConfig(**BASE, pruner="dycoke", retention=0.5)
    assert "iwp_selection" not in dy.labeling_inputs() and "iwp_selection" in iwp.labeling_inputs()


def test_compensation_auto_is_the_pruners_default():
    """IWP's shipped defaults include the log-count bias; every other pruner runs as published; an explicit value wins."""
    from iwp.registry import default_compensation

    assert RunConfig(**BASE).compensation == "none"
    assert RunConfig(**BASE, pruner="iwp", retention=0.5).compensation == default_compensation("iwp") == "bias"
    assert RunConfig(**BASE, pruner="dycoke", retention=0.5).compensation == "none"
    assert RunConfig(**BASE, pruner="iwp", retention=0.5, compensation="none").compensation == "none"


def test_compensation_is_a_yaml_key_and_a_flag(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("input: a\noutput: b\nmodel: c\npruner: dycoke\nretention: 0.25\ncompensation: bias+merge\n")
    cfg = load_config(p, compensation_assignment="chunk")
    assert (cfg.compensation, cfg.compensation_assignment) == ("bias+merge", "chunk")


def test_config_iwp_defaults_match_the_library():
    """`framescribe run` and `iwp.IWPSettings` must not drift apart: one measured default each."""
    from iwp import IWPSettings

    from pipeline.config import RunConfig

    cfg, lib = RunConfig(input="x", output="y", model="m"), IWPSettings()
    assert (cfg.iwp_lambda, cfg.iwp_temperature, cfg.iwp_floor, cfg.iwp_chunking, cfg.iwp_head_agg,
            cfg.iwp_selection, cfg.iwp_chunk_budget) == (
        lib.lam, lib.temperature, lib.floor, lib.chunking, lib.head_agg, lib.selection, lib.chunk_budget)


def test_the_decode_loop_is_not_in_the_labeling_hash():
    """Both loops give the same tokens (tests/test_static_decode.py): switching must not relabel a corpus."""
    static = RunConfig(**BASE, decode_loop="static", compile_decode=True, eos_check_every=4)
    assert static.labeling_hash() == RunConfig(**BASE).labeling_hash()


@pytest.mark.parametrize("kw, previous", [
    ({}, "fdb54c00df82076c"),
    ({"pruner": "dycoke", "retention": 0.25}, "5b84b8abcacf7b15"),
    ({"pruner": "random", "retention": 0.5, "compensation": "bias"}, "40b7265961814cc5"),
])
def test_non_iwp_labeling_hash_is_what_the_previous_release_wrote(kw, previous):
    """Issue 13 moved IWP's floor default; pruners that never read it keep their hash, so finished outputs stay
    done. `previous`: labeling_hash() of the same config computed by the code at commit 3aaf9c2."""
    cfg = RunConfig(input="/data/videos", output="/data/out", model="Qwen/Qwen2.5-VL-7B-Instruct",
                    model_revision="abc123", **kw)
    assert cfg.labeling_hash() == previous


def test_legacy_hash_uses_the_old_default_of_an_unset_field():
    unset = RunConfig(input="/data/videos", output="/data/out", model="m", pruner="iwp", retention=0.25)
    old_default = RunConfig(input="/data/videos", output="/data/out", model="m", pruner="iwp", retention=0.25,
                            iwp_floor=0.25)
    new_default = RunConfig(input="/data/videos", output="/data/out", model="m", pruner="iwp", retention=0.25,
                            iwp_floor=1.0)
    assert unset.legacy_labeling_hash() == old_default.legacy_labeling_hash() != new_default.legacy_labeling_hash()
