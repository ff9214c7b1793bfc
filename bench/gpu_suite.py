"""One speed run for the GPU suite (bench/gpu/run_suite.sh): `bench.speed` without Ray, decord or the CLI.

Prints one plain line per case (vision, prune, prefill, decode per step, end to end, peak memory, groups
encoded) and writes the same CSV as `framescribe bench speed`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from actors.vision_skip import DEFAULT_SKIP_THRESHOLD
from bench.speed import SpeedConfig, row_case, run_speed

COLUMNS = ("decode_loop", "vision_ms", "prune_ms", "prefill_ms", "decode_ms_per_token", "e2e_ms", "peak_mem_mb",
           "groups_encoded", "groups", "e2e_speedup")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--content", default="static")
    p.add_argument("--size", default="7b")
    p.add_argument("--retentions", default="1,0.25")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench-out/gpu"))
    p.add_argument("--decode-loops", default="dynamic", help="comma-separated: dynamic, static, compiled")
    p.add_argument("--no-vision-skip", action="store_true", help="only the cases without the vision skip")
    p.add_argument("--compensation", default="none", help="none | bias (the log-count attention bias, a 4-D mask)")
    a = p.parse_args()
    cfg = SpeedConfig(size=a.size, device="cuda", frames=16, batch_size=4, max_new_tokens=32, repeats=a.repeats,
                      retentions=tuple(float(x) for x in a.retentions.split(",")), content=a.content,
                      vision_skip_threshold=None if a.no_vision_skip else DEFAULT_SKIP_THRESHOLD, out=a.out,
                      decode_loops=tuple(a.decode_loops.split(",")), compensation=a.compensation)
    rows, csv_path, _ = run_speed(cfg)
    print("case", *COLUMNS, sep="\t")
    for r in rows:
        print(row_case(r).label, *(r[c] for c in COLUMNS), sep="\t")
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
