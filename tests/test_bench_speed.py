"""CPU smoke tests of the speed and pipeline benchmarks: they run on tiny shapes and write their CSV and
PNG with the expected columns. No timing assertions (this machine's timings mean nothing)."""
from __future__ import annotations

import csv
import math

import pytest

from tests.conftest import run_cli


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bench_speed_cli_writes_csv_png_and_ratio_table(tmp_path):
    from bench.speed import CSV_COLUMNS

    out = tmp_path / "speed"
    r = run_cli("bench", "speed", "--size", "tiny", "--frames", "4", "--batch-size", "2", "--retentions", "1,0.25",
                "--repeats", "1", "--warmup", "0", "--max-new-tokens", "3", "--clock", "process", "--out", str(out),
                "--compensation", "bias", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "prefill ×" in r.stdout and "e2e ×" in r.stdout
    csv_path = out / "speed_qwen2_5_vl_tiny_L2_f4_b2_cpu.csv"
    rows = _rows(csv_path)
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert [(x["pruner"], float(x["retention"])) for x in rows] == [("none", 1.0), ("iwp", 1.0), ("iwp", 0.25)]
    none, full, quarter = rows
    assert [x["compensation"] for x in rows] == ["none", "bias", "bias"]
    assert none["layers"] == none["layers_full"] == "2" and none["device"] == "cpu" and none["clock"] == "process"
    assert int(quarter["visual_tokens_kept"]) == math.ceil(0.25 * int(quarter["visual_tokens"]))
    assert int(full["visual_tokens_kept"]) == int(full["visual_tokens"])
    assert float(none["prefill_speedup"]) == 1.0 and float(none["e2e_speedup"]) == 1.0
    for x in rows:
        assert int(x["decode_steps"]) == 2  # EOS disabled: max_new_tokens - 1 decode forwards after the prefill
        for k in ("prefill_ms", "vision_ms", "decode_ms_per_token", "peak_mem_mb", "videos_per_s", "kv_cache_mb"):
            assert float(x[k]) > 0, k
    assert (out / "speed_qwen2_5_vl_tiny_L2_f4_b2_cpu.png").stat().st_size > 5000


@pytest.mark.parametrize("content,skipped", [("static", True), ("panning", False)])
def test_bench_speed_content_and_vision_skip_report_the_skipped_share(tmp_path, content, skipped):
    out = tmp_path / "speed"
    r = run_cli("bench", "speed", "--size", "tiny", "--frames", "8", "--batch-size", "1", "--retentions", "0.25",
                "--repeats", "1", "--warmup", "0", "--max-new-tokens", "2", "--clock", "process", "--out", str(out),
                "--content", content, "--vision-skip", "1.0", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(out / f"speed_qwen2_5_vl_tiny_L2_f8_b1_{content}_cpu.csv")
    assert [(x["pruner"], x["vision_skip_threshold"]) for x in rows] == [
        ("none", ""), ("iwp", ""), ("none", "1.0"), ("iwp", "1.0")]
    for x in rows:
        assert x["content"] == content and int(x["groups"]) == 4  # 8 frames, 2 per temporal group
        without_skip = x["vision_skip_threshold"] == ""
        assert (int(x["groups_encoded"]) == 4) == (without_skip or not skipped)
        assert float(x["groups_skipped_share"]) == 1 - int(x["groups_encoded"]) / 4
    assert "groups enc." in r.stdout


def test_bench_speed_rejects_an_unknown_content():
    r = run_cli("bench", "speed", "--content", "sports")
    assert r.returncode == 2 and "content" in r.stderr


def test_bench_speed_llava_batched_prune_and_layer_override(tmp_path):
    from bench.speed import CSV_COLUMNS, SpeedConfig, run_speed

    cfg = SpeedConfig(arch="llava_onevision", size="tiny", frames=3, batch_size=2, retentions=(0.5, 0.25),
                      prune_modes=("per_video", "batched"), max_new_tokens=2, repeats=1, warmup=0, layers=1,
                      decode_loops=("dynamic", "static"), out=tmp_path)
    rows, csv_path, png_path = run_speed(cfg, log=lambda m: None)
    cases = [("none", "per_video", 1.0), ("iwp", "per_video", 0.5), ("iwp", "per_video", 0.25),
             ("iwp", "batched", 0.5), ("iwp", "batched", 0.25)]
    assert [(x["pruner"], x["prune_mode"], x["retention"], x["decode_loop"]) for x in rows] == [
        (*c, d) for d in ("dynamic", "static") for c in cases]
    assert all(x["decode_steps"] == 1 and x["decode_ms_per_token"] > 0 for x in rows)
    assert rows[5]["eos_check_every"] == 8 and rows[0]["eos_check_every"] == ""
    assert csv_path.name == "speed_llava_onevision_tiny_L1_f3_b2_dynamic-static_cpu.csv"
    # the batched (lockstep) selection keeps exactly as many tokens as the per-video path
    assert rows[1]["visual_tokens_kept"] == rows[3]["visual_tokens_kept"]
    # the fidelity residual is timed apart from the pruning (the run's rows record prune_ms without it)
    assert rows[0]["residual_ms"] == 0 and rows[1]["residual_ms"] > 0 and rows[1]["prune_ms"] > 0
    assert rows[3]["residual_ms"] > 0 and rows[3]["prune_ms"] > 0  # the batched path too
    assert rows[0]["layers"] == 1 and rows[0]["layers_full"] == 2
    assert rows[0]["prefill_ms_full_depth_est"] > rows[0]["prefill_ms"]  # extrapolated to 2 layers
    assert tuple(_rows(csv_path)[0].keys()) == CSV_COLUMNS and png_path.stat().st_size > 5000


def test_bench_speed_rejects_bad_options(tmp_path):
    from bench.speed import SpeedConfig

    with pytest.raises(ValueError, match="fastv"):
        SpeedConfig(pruners=("fastv",))
    with pytest.raises(ValueError, match="retentions"):
        SpeedConfig(retentions=(0.0,))
    with pytest.raises(ValueError, match="threads 1"):
        SpeedConfig(clock="process", threads=2)
    r = run_cli("bench", "speed", "--size", "huge", "--out", str(tmp_path), timeout=120)
    assert r.returncode == 2 and "size" in r.stderr


def test_model_shapes_match_the_published_configs():
    from actors.model_shapes import get_shape

    q7, q3 = get_shape("qwen2_5_vl", "7b"), get_shape("qwen2_5_vl", "3b")
    assert (q7.text.hidden, q7.text.layers, q7.text.heads, q7.text.kv_heads, q7.text.intermediate) == (
        3584, 28, 28, 4, 18944)
    assert (q3.text.hidden, q3.text.layers, q3.text.heads, q3.text.kv_heads, q3.text.intermediate) == (
        2048, 36, 16, 2, 11008)
    assert (q7.vision.depth, q7.vision.hidden) == (32, 1280)


@pytest.mark.slow
def test_bench_pipeline_cli_writes_csv_png_with_busy_fraction(tmp_path):
    from bench.throughput import CSV_COLUMNS

    out = tmp_path / "out"
    r = run_cli("bench", "pipeline", "--videos", "4", "--video-frames", "8", "--video-size", "64", "--frames", "4",
                "--batch-sizes", "2", "--decode-concurrency", "2", "--max-new-tokens", "2", "--num-cpus", "2",
                "--workdir", str(tmp_path / "work"), "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(out / "pipeline_qwen2_5_vl_tiny_cpu.csv")
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert [(x["mode"], x["batch_size"], x["decode_concurrency"]) for x in rows] == [
        ("model_only", "2", ""), ("pipeline", "2", "2")]
    for x in rows:
        assert int(x["rows_ok"]) == 4 and int(x["rows_error"]) == 0
        assert float(x["videos_per_s"]) > 0 and 0 < float(x["busy_fraction"]) <= 1.5
    pipe = rows[1]
    assert int(pipe["calls"]) >= 2 and float(pipe["startup_s"]) > 0  # the actors' batch log was read
    assert (out / "pipeline_qwen2_5_vl_tiny_cpu.png").stat().st_size > 5000
