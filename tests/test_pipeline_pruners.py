"""Every pruner runs through the same `pruner` option of the real Ray Data pipeline (Python API)."""
from __future__ import annotations

import math

import pyarrow.dataset as pads
import pytest

from iwp import PRUNERS
from pipeline.config import RunConfig
from pipeline.run import run_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_videos(tmp_path_factory, corpus):
    import shutil

    videos, _ = corpus
    d = tmp_path_factory.mktemp("two")
    for name in ("h264", "vfr"):
        shutil.copy(videos[name].path, d / videos[name].path.name)
    return d


@pytest.mark.parametrize("pruner", [p for p in PRUNERS if p != "none"])
def test_pruner_through_the_pipeline(ray_local, tmp_path, tiny_qwen, two_videos, pruner):
    cfg = RunConfig(input=str(two_videos), output=str(tmp_path / "out"), model=str(tiny_qwen), pruner=pruner,
                    retention=0.25, num_frames=4, max_new_tokens=2, batch_size=2)
    summary = run_pipeline(cfg)
    assert (summary.videos_ok, summary.videos_error) == (2, 0)
    rows = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
    assert len(rows) == 2
    for r in rows:
        assert r["status"] == "ok", r["error_message"]
        assert r["pruner"] == pruner
        assert r["visual_tokens_kept"] == math.ceil(0.25 * r["visual_tokens_full"])
        assert r["prune_ms"] is not None and r["prefill_ms"] is not None


@pytest.mark.parametrize("pruner, compensation", [("iwp", "bias"), ("dycoke", "bias+merge")])
def test_compensation_through_the_pipeline_is_recorded_in_rows(ray_local, tmp_path, tiny_qwen, two_videos, pruner,
                                                              compensation):
    cfg = RunConfig(input=str(two_videos), output=str(tmp_path / "out"), model=str(tiny_qwen), pruner=pruner,
                    retention=0.25, compensation=compensation, num_frames=4, max_new_tokens=2, batch_size=2)
    summary = run_pipeline(cfg)
    assert (summary.videos_ok, summary.videos_error) == (2, 0)
    rows = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
    assert len(rows) == 2
    for r in rows:
        assert r["status"] == "ok", r["error_message"]
        assert (r["pruner"], r["compensation"]) == (pruner, compensation)
        assert r["visual_tokens_kept"] == math.ceil(0.25 * r["visual_tokens_full"])
        assert r["iwp_residual"] is not None
