"""A run people can watch, and a pilot before a big run, through the real CLI: `--dry-run` prints the
plan and starts nothing; `--limit N` labels only N videos; the console shows progress lines and the
summary while Ray's own logs and warnings go to the run's log file."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow
FAST = ("--num-frames", "2", "--max-new-tokens", "3", "--batch-size", "2")


@pytest.fixture(scope="module")
def six_videos(tmp_path_factory) -> Path:
    from pipeline.sample_videos import make_moving_shapes, write_video

    d = tmp_path_factory.mktemp("six")
    for i in range(6):
        write_video(d / f"clip_{i}.mp4", make_moving_shapes(4, 64, 64, seed=i), fps=4)
    return d


def test_dry_run_then_limit_then_dry_run(tmp_path, tiny_qwen, six_videos):
    ray_tmp = tempfile.mkdtemp(prefix="fsp", dir="/tmp")
    out = tmp_path / "labels"
    base = ["run", "--input", str(six_videos), "--output", str(out), "--model", str(tiny_qwen), *FAST]
    try:
        r = run_cli(*base, "--dry-run", env={"RAY_TMPDIR": ray_tmp})
        assert r.returncode == 0, r.stderr[-3000:]
        assert "inputs found" in r.stdout and "6 videos" in r.stdout and "decode sample" in r.stdout
        assert not out.exists()                                   # nothing written, not even the folder
        assert not any(Path(ray_tmp).iterdir())                   # no Ray started

        r = run_cli(*base, "--limit", "2", env={"RAY_TMPDIR": ray_tmp})
        assert r.returncode == 0, r.stderr[-3000:]
        rows = pads.dataset(str(out), format="parquet").to_table()
        assert rows.num_rows == 2 and set(rows["status"].to_pylist()) == {"ok"}
        assert len(list(out.glob("*.parquet"))) == 1              # one part, not one per batch
        assert "progress: videos 2/2 (100.0%)  ok 2  error 0" in r.stderr
        noise = [ln for ln in r.stderr.splitlines() if "WARNING" in ln or "Warning" in ln or "INFO" in ln]
        assert not noise, noise                                   # Ray's own lines are in the log file
        logs = list((out / "_framescribe" / "logs").glob("run-*.log"))
        assert len(logs) == 1 and logs[0].stat().st_size > 0
        assert str(logs[0]) in r.stdout.replace("\n", "") or "log file" in r.stdout

        r = run_cli(*base, "--dry-run", env={"RAY_TMPDIR": ray_tmp})
        assert r.returncode == 0, r.stderr[-3000:]
        assert "2 videos (this labeling config)" in r.stdout and "4 videos, 4 rows" in r.stdout
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
