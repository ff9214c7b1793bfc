"""The decode memory benchmark runs (tiny variant) and writes its files; importing the decoder does not
drag in the CUDA libraries of torch's nvidia-* packages."""
from __future__ import annotations

import csv
import subprocess
import sys

from tests.conftest import REPO


def test_bench_decode_memory_quick_writes_table_csv_and_png(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.decode_memory", "--out", str(tmp_path), "--quick"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "peak RSS" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "decode_memory.csv")))
    assert len(rows) == 4 and {x["video"] for x in rows} == {"long", "short"}
    assert {x["mode"] for x in rows} == {"path", "stream"}
    assert all(int(x["frames_out"]) == 4 and float(x["peak_rss_mib"]) > 0 and not x["error"] for x in rows)
    assert (tmp_path / "decode_memory.png").stat().st_size > 1000
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 2


def test_decoder_import_skips_cuda_libraries():
    code = ("from pipeline.decode import decord_module; decord_module(); import sys; "
            "maps = open('/proc/self/maps').read(); "
            "print('cublas' in maps or 'cudnn' in maps, 'nvidia' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"], r.stdout
