"""Decode memory benchmark: peak RSS of decoding a fixed number of frames from a long and a short video.

    python -m bench.decode_memory --out DIR            # 10-minute 720p video (+ a 10 s one)
    python -m bench.decode_memory --out DIR --quick    # tiny variant (smoke test)

Writes the videos once (PyAV, libx264, low frame rate, simple moving-box frames generated one at a
time, so writing needs little memory), then decodes each (video, frame count, read mode) in a fresh
Python subprocess with `pipeline.decode.decode_video` and records that process's peak RSS
(VmHWM, i.e. `ru_maxrss` without the parent's peak that Linux carries over exec), its peak RSS right
before the decode (after importing the decoder), and the decode time. Read modes:

- `path`:   a local file opened by path (FFmpeg reads only the parts it needs);
- `stream`: the same file through a non-local fsspec filesystem (`DirFileSystem`), i.e. the code
            path s3:// objects take: decord gets a file-like object and reads the object whole.

Prints a table and saves `decode_memory.csv` and `decode_memory.png` in DIR.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

FIELDS = ["video", "duration_s", "width", "height", "fps", "file_mib", "mode", "frames", "frames_out",
          "baseline_rss_mib", "peak_rss_mib", "decode_delta_mib", "decode_s", "error"]


def write_long_video(path: Path, seconds: float, width: int, height: int, fps: int, gop: int | None = None) -> Path:
    """A `seconds`-long h264 video of a moving box over a gradient, one frame in memory at a time."""
    import av
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial" + path.suffix)
    yy, xx = np.mgrid[0:height, 0:width]
    background = np.stack([(xx * 255 // max(1, width - 1)), (yy * 255 // max(1, height - 1)),
                           np.full_like(xx, 96)], axis=-1).astype(np.uint8)
    box = max(8, min(width, height) // 6)
    n = max(1, int(round(seconds * fps)))
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "28", **({"g": str(gop)} if gop else {})}
        for i in range(n):
            frame = background.copy()
            x = (i * 7) % max(1, width - box)
            y = (i * 3) % max(1, height - box)
            frame[y:y + box, x:x + box] = (230, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


def _status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MiB, from /proc/self/status (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_rss_mib() -> float:
    """Peak RSS of this process. VmHWM where there is one: `ru_maxrss` survives exec on Linux, so a child
    started by a big parent would report the parent's peak (the exact case of this benchmark)."""
    hwm = _status_mib("VmHWM")
    return hwm if hwm == hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(video: str, frames: int, mode: str, max_pixels: int) -> dict:
    """Runs in a fresh process: decode once, report peak RSS."""
    import PIL.Image  # noqa: F401  (resize_to_budget)

    from pipeline.decode import DecodeError, SamplingSpec, decord_module, decode_video

    decord_module()  # the baseline includes the decoder library: what is left is the decode itself
    spec = SamplingSpec(num_frames=frames, max_pixels=max_pixels)
    filesystem, uri = None, video
    if mode == "stream":
        from fsspec.implementations.dirfs import DirFileSystem
        from fsspec.implementations.local import LocalFileSystem

        filesystem, uri = DirFileSystem(path=str(Path(video).parent), fs=LocalFileSystem()), Path(video).name
    t0 = time.perf_counter()
    out = {"baseline_rss_mib": round(_peak_rss_mib(), 1), "error": ""}
    try:
        v = decode_video(uri, spec, filesystem=filesystem)
        out.update(frames_out=int(v.frames.shape[0]), duration_s=round(v.duration_s, 2), fps=v.fps,
                   width=v.width, height=v.height)
    except DecodeError as e:
        out.update(frames_out=0, error=f"{e.error_type}: {e.message}")
    out["decode_s"] = round(time.perf_counter() - t0, 3)
    out["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    out["decode_delta_mib"] = round(out["peak_rss_mib"] - out["baseline_rss_mib"], 1)
    return out


def measure(video: Path, frames: int, mode: str, max_pixels: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "bench.decode_memory", "--child", str(video),
                        "--frames", str(frames), "--modes", mode, "--max-pixels", str(max_pixels)],
                       capture_output=True, text=True, timeout=1800,
                       cwd=str(Path(__file__).resolve().parents[1]))
    if r.returncode != 0:
        raise RuntimeError(f"decode subprocess failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['video']}\n{r['mode']}, {r['frames']} fr" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4.5))
    base = [r["baseline_rss_mib"] for r in rows]
    delta = [max(0.0, r["peak_rss_mib"] - r["baseline_rss_mib"]) for r in rows]
    ax.bar(labels, base, label="RSS after imports", color="#9bb")
    ax.bar(labels, delta, bottom=base, label="added by the decode (peak)", color="#c44")
    for i, r in enumerate(rows):
        ax.text(i, r["peak_rss_mib"], f"{r['peak_rss_mib']:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("peak RSS (MiB)")
    ax.set_title("decode_video peak memory: fixed frame count, fresh process per bar")
    ax.legend(loc="upper left", fontsize=8)
    plt.xticks(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="output folder (videos, CSV, PNG)")
    ap.add_argument("--long-seconds", type=float, default=600.0)
    ap.add_argument("--short-seconds", type=float, default=10.0)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--fps", type=int, default=5)
    ap.add_argument("--gop", type=int, default=None, help="keyframe interval (default: libx264's, 250)")
    ap.add_argument("--frames", default="8,32", help="frame counts to sample, comma separated")
    ap.add_argument("--modes", default="path,stream", help="path (local file) and/or stream (file-like, as s3://)")
    ap.add_argument("--max-pixels", type=int, default=224 * 224)
    ap.add_argument("--quick", action="store_true", help="tiny variant: 4 s and 1 s at 128x72, 4 frames")
    ap.add_argument("--child", metavar="VIDEO", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, int(a.frames), a.modes, a.max_pixels)))
        return 0
    if a.out is None:
        ap.error("--out is required")
    if a.quick:
        a.long_seconds, a.short_seconds, a.width, a.height, a.frames = 4.0, 1.0, 128, 72, "4"
    out = a.out
    videos = out / "videos"
    made = {}
    for name, seconds in (("long", a.long_seconds), ("short", a.short_seconds)):
        p = videos / f"{name}_{seconds:g}s_{a.width}x{a.height}_{a.fps}fps{f'_g{a.gop}' if a.gop else ''}.mp4"
        if not p.is_file():
            t0 = time.perf_counter()
            write_long_video(p, seconds, a.width, a.height, a.fps, a.gop)
            print(f"wrote {p.name} ({p.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s",
                  flush=True)
        made[name] = p
    rows = []
    for name, p in made.items():
        for frames in [int(x) for x in a.frames.split(",")]:
            for mode in a.modes.split(","):
                m = measure(p, frames, mode, a.max_pixels)
                rows.append({"video": name, "file_mib": round(p.stat().st_size / 2**20, 2), "mode": mode,
                             "frames": frames, **m})
                print(f"  {name:5s} {mode:6s} {frames:3d} frames: peak {m['peak_rss_mib']:.0f} MiB "
                      f"(+{m['decode_delta_mib']:.0f}), {m['decode_s']:.2f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "decode_memory.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows, out / "decode_memory.png")
    head = f"{'video':6s} {'size':>9s} {'duration':>9s} {'mode':6s} {'frames':>6s} {'baseline':>9s} " \
           f"{'peak RSS':>9s} {'decode +':>9s} {'time':>7s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['video']:6s} {r['file_mib']:7.1f}Mi {r.get('duration_s', 0):8.1f}s {r['mode']:6s} "
              f"{r['frames']:6d} {r['baseline_rss_mib']:7.0f}Mi {r['peak_rss_mib']:7.0f}Mi "
              f"{r['decode_delta_mib']:7.0f}Mi {r['decode_s']:6.2f}s" + (f"  {r['error']}" if r["error"] else ""))
    print(f"saved {out / 'decode_memory.csv'} and {out / 'decode_memory.png'}")
    return 0 if not any(r["error"] for r in rows) else 1


def command(out: Path, long_seconds: float = 600.0, short_seconds: float = 10.0, width: int = 1280,
            height: int = 720, fps: int = 5, frames: str = "8,32", modes: str = "path,stream",
            quick: bool = False) -> None:
    """Peak RSS of decode_video on a long and a short video (fresh process per decode); CSV + PNG in OUT."""
    import typer

    argv = ["--out", str(out), "--long-seconds", str(long_seconds), "--short-seconds", str(short_seconds),
            "--width", str(width), "--height", str(height), "--fps", str(fps), "--frames", frames, "--modes", modes]
    raise typer.Exit(main(argv + (["--quick"] if quick else [])))


if __name__ == "__main__":
    raise SystemExit(main())
