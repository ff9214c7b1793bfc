"""`framescribe bench scale`: the costs that grow with the corpus, measured at 10^6.

On local disk and on an S3-protocol server (a local moto server unless --s3-endpoint is given):
- a synthetic output of N labeled rows, written as compacted parts (PART_ROWS rows each) and as the
  small parts the writer before issue 15 made (one part per model batch of 4 rows, at a smaller N:
  writing 250 000 objects is not a benchmark a shared machine can run; time per part is linear);
- a manifest of N lines.
Each measurement runs in a fresh Python process and reports its wall time and peak RSS (the driver's
memory): discovery (manifest → VideoInput list), resume planning (discovery + one listing + one key read
of the output + the to-do list), compaction (duplicate check; merging the small parts), and the bytes
fetched vs the object size when 8 frames are sampled from a 10-minute h264 mp4 (faststart and not).
Writes docs/benchmarks/scale.csv (and prints the table).
"""
from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import typer

LABELING_HASH = "benchscalehash01"
PROMPT = "Describe this video."


def _uris(n: int, prefix: str) -> list[str]:
    return [f"{prefix}/videos/{i // 1000:04d}/clip_{i:08d}.mp4" for i in range(n)]


def synthetic_rows(uris: list[str], labeling_hash: str = LABELING_HASH, *, manifest: str | None = None):
    """Output rows as a run would write them (caption text ~150 characters, every column filled); videos are
    keyed as discovery keys them for `manifest` (local paths relative to its folder)."""
    import pyarrow as pa

    from pipeline.discover import input_root, prompt_id_for, video_id_for, video_key
    from pipeline.output import OUTPUT_SCHEMA, conform

    n = len(uris)
    rng = np.random.default_rng(0)
    words = np.array("a the red blue square moves left right across frame slowly quickly over textured "
                     "background while camera stays still and light changes".split())
    text = [" ".join(words[rng.integers(0, len(words), 24)]) for _ in range(min(n, 5000))]
    now = datetime.now(timezone.utc)
    cols = {
        "video_id": [video_id_for(video_key(u, input_root(manifest) if manifest else None)) for u in uris], "uri": uris, "prompt_id": [prompt_id_for(PROMPT)] * n,
        "prompt": [PROMPT] * n, "text": [text[i % len(text)] for i in range(n)], "status": ["ok"] * n,
        "model": ["tiny-qwen2_5_vl"] * n, "pruner": ["iwp"] * n, "retention": [0.25] * n,
        "visual_tokens_full": [512] * n, "visual_tokens_kept": [128] * n, "frames_sampled": [8] * n,
        "frame_timestamps": [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]] * n, "duration_s": [8.0] * n,
        "labeling_hash": [labeling_hash] * n, "run_id": ["bench-scale"] * n, "created_at": [now] * n,
    }
    table = pa.table({k: pa.array(v, OUTPUT_SCHEMA.field(k).type) for k, v in cols.items()})
    return conform(table)


def write_output(uri: str, uris: list[str], rows_per_part: int, *, s3_endpoint: str | None,
                 labeling_hash: str = LABELING_HASH, manifest: Path | None = None) -> int:
    """Parts of `rows_per_part` rows each, through the real atomic writer; returns the part count."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.output import write_part
    from pipeline.storage import Location

    loc = Location.resolve(uri, s3_endpoint=s3_endpoint)
    table = synthetic_rows(uris, labeling_hash, manifest=str(manifest) if manifest else None)
    slices = [table.slice(i, rows_per_part) for i in range(0, table.num_rows, rows_per_part)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda t: write_part(t, uri, location=loc), slices))
    return len(slices)


def write_manifest(path: Path, uris: list[str]) -> None:
    path.write_text("\n".join(uris) + "\n")


def make_long_video(path: Path, *, seconds: int = 600, fps: int = 10, size: tuple[int, int] = (320, 240),
                    bitrate: int = 1_000_000, gop_s: float = 2.0, faststart: bool = True) -> Path:
    """A `seconds`-long h264 mp4 at ~`bitrate` b/s with a keyframe every `gop_s` seconds."""
    import av

    w, h = size
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), mode="w", format="mp4", options=options) as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.bit_rate = bitrate
        g = str(int(gop_s * fps))
        s.options = {"g": g, "keyint_min": g, "sc_threshold": "0", "preset": "ultrafast",
                     "x264-params": f"nal-hrd=cbr:vbv-maxrate={bitrate // 1000}:vbv-bufsize={bitrate // 1000}"
                                    f":bitrate={bitrate // 1000}:log-level=error"}
        for i in range(seconds * fps):
            img = np.roll(base, i * 3, axis=1)
            img[(i * 2) % (h - 40):(i * 2) % (h - 40) + 40, 100:140] = (230, 40, 40)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def measure_finished_rerun(workdir: Path, n: int) -> dict:
    """`framescribe run` (the real CLI, a fresh process) over a finished job of `n` videos: wall time, and
    whether Ray was started (its temp dir stays empty)."""
    from actors.tiny_model import make_tiny_model
    from pipeline.config import RunConfig

    model = make_tiny_model(workdir / "tiny-model", "qwen2_5_vl")
    uris = _uris(n, str(workdir / "corpus"))
    manifest = workdir / "rerun-manifest.txt"
    write_manifest(manifest, uris)
    out = workdir / "rerun-out"
    cfg = RunConfig(input=str(manifest), output=str(out), model=str(model))
    write_output(str(out), uris, 1000, s3_endpoint=None, labeling_hash=cfg.labeling_hash(), manifest=manifest)  # 10 parts
    ray_tmp = Path(tempfile.mkdtemp(prefix="fsb", dir="/tmp"))
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--input", str(manifest), "--output", str(out),
                        "--model", str(model)], capture_output=True, text=True,
                       env={**os.environ, "RAY_TMPDIR": str(ray_tmp), "HF_HUB_OFFLINE": "1"}, timeout=600)
    seconds = time.perf_counter() - t
    ray_started = any(ray_tmp.iterdir())
    if r.returncode != 0 or "nothing to do" not in r.stdout:  # a finished job must plan nothing
        raise RuntimeError(r.stdout[-1000:] + r.stderr[-2000:])
    return {"storage": "local", "measurement": f"re-run of a finished job (CLI, {n} videos)", "rows": n,
            "seconds": seconds, "ray_started": ray_started,
            "nothing_to_do": "nothing to do" in r.stdout}


# --- measurements: each runs in its own process (python -m bench.scale measure KIND ...) ---------------

def _measure(kind: str, args: dict) -> dict:
    from pipeline.config import RunConfig
    from pipeline.storage import Location

    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = ru0.ru_utime + ru0.ru_stime
    out: dict = {}
    if kind == "discovery":
        from pipeline.discover import discover_inputs

        cfg = RunConfig(input=args["input"], output=args["output"], model="none", s3_endpoint=args["s3"])
        out["videos"] = len(discover_inputs(cfg))
    elif kind == "resume":
        from pipeline.discover import discover_inputs
        from pipeline.output import OutputIndex
        from pipeline.run import todo_from

        cfg = RunConfig(input=args["input"], output=args["output"], model="none", s3_endpoint=args["s3"])
        inputs = discover_inputs(cfg)
        t1 = time.perf_counter()
        index = OutputIndex.load(Location.resolve(cfg.output, s3_endpoint=cfg.s3_endpoint))
        out["index_s"] = time.perf_counter() - t1
        todo = todo_from(inputs, index, LABELING_HASH, include_errors=True)
        out.update(videos=len(inputs), parts=len(index.live), rows_indexed=index.keys.num_rows, todo=len(todo))
    elif kind == "compact":
        from pipeline.output import OutputIndex, compact

        index = OutputIndex.load(Location.resolve(args["output"], s3_endpoint=args["s3"]))
        parts_before = len(index.live)
        rep = compact(index, part_rows=args.get("part_rows"))
        out.update(parts_before=parts_before, parts_after=len(index.live), merged=rep.parts_merged,
                   duplicates=rep.duplicates_removed)
    elif kind == "sample":
        from pipeline.decode import SamplingSpec
        from pipeline.decode_ranged import decode_ranged, open_ranged

        loc = Location.resolve(args["video"], s3_endpoint=args["s3"])
        size = loc.fs.info(loc.root)["size"]
        with open_ranged(loc.fs, loc.root, size) as f:
            v = decode_ranged(args["video"], f, SamplingSpec(num_frames=8))
            fetched = f.cache.total_requested_bytes
        out.update(object_bytes=size, fetched_bytes=fetched, fetched_pct=100.0 * fetched / size,
                   frames=int(v.frames.shape[0]))
    out["seconds"] = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)  # CPU time: what the wall time is on an idle machine
    out["cpu_s"] = ru.ru_utime + ru.ru_stime - cpu0
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


def _peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it restarts at exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_measure(kind: str, args: dict, env: dict) -> dict:
    r = subprocess.run([sys.executable, "-m", "bench.scale", kind, json.dumps(args)], env=env,
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"measure {kind} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _moto() -> tuple[str, subprocess.Popen]:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except Exception:
            time.sleep(0.2)
    return endpoint, proc


def command(rows: int = typer.Option(1_000_000, help="labeled rows in the synthetic output / lines in the manifest"),
            small_rows: int = typer.Option(20_000, help="rows written as small parts of 4 rows (the old writer)"),
            s3_rows: int = typer.Option(1_000_000, help="rows for the S3 measurements (0: skip S3)"),
            long_video_s: int = typer.Option(600, help="length of the long video for the ranged-read measurement"),
            rerun_videos: int = typer.Option(10_000, help="videos of the finished job that is run again"),
            workdir: Path = typer.Option(Path(tempfile.gettempdir()) / "framescribe-bench-scale"),
            out_csv: Path = typer.Option(Path("docs/benchmarks/scale.csv"))):
    """Discovery, resume planning, compaction at 10^6 rows and ranged reads of long videos, local and S3."""
    import shutil

    import boto3

    from pipeline.output import PART_ROWS

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    results: list[dict] = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}

    def record(storage: str, what: str, kind: str, args: dict, **extra):
        m = _run_measure(kind, args, env)
        row = {"storage": storage, "measurement": what, **extra, **m}
        results.append(row)
        typer.echo(json.dumps(row))
        if kind == "resume" and m["todo"] != 0:  # keys must match discovery's
            raise RuntimeError(f"{storage} {what}: {m['todo']} videos left to do over a finished output")

    def scenario(storage: str, base: str, n: int, s3: str | None):
        uris = _uris(n, "s3://videos-bucket" if s3 else str(workdir / "corpus"))
        manifest = workdir / f"manifest-{storage}-{n}.txt"
        write_manifest(manifest, uris)
        t = time.perf_counter()
        n_parts = write_output(f"{base}/compacted", uris, PART_ROWS, s3_endpoint=s3, manifest=manifest)
        typer.echo(f"{storage}: wrote {n} rows as {n_parts} parts in {time.perf_counter() - t:.1f} s")
        a = {"input": str(manifest), "output": f"{base}/compacted", "s3": s3}
        record(storage, "discovery (manifest)", "discovery", a, rows=n)
        record(storage, "resume planning, compacted parts", "resume", a, rows=n)
        record(storage, "compaction check, compacted parts", "compact", {**a, "part_rows": PART_ROWS}, rows=n)
        small_uris = uris[:small_rows]
        small_manifest = workdir / f"manifest-{storage}-small.txt"
        write_manifest(small_manifest, small_uris)
        t = time.perf_counter()
        n_parts = write_output(f"{base}/small", small_uris, 4, s3_endpoint=s3, manifest=small_manifest)
        typer.echo(f"{storage}: wrote {len(small_uris)} rows as {n_parts} parts in {time.perf_counter() - t:.1f} s")
        a = {"input": str(small_manifest), "output": f"{base}/small", "s3": s3}
        record(storage, "resume planning, small parts (old writer)", "resume", a, rows=len(small_uris))
        record(storage, "merge small parts", "compact", {**a, "part_rows": PART_ROWS}, rows=len(small_uris))
        record(storage, "resume planning, after merge", "resume", a, rows=len(small_uris))

    row = measure_finished_rerun(workdir, rerun_videos)
    results.append(row)
    typer.echo(json.dumps(row))
    scenario("local", str(workdir / "out"), rows, None)
    endpoint, proc = _moto()
    try:
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="bench-out")
        if s3_rows:
            scenario("s3 (moto)", "s3://bench-out/labels", s3_rows, endpoint)
        for faststart in (True, False):
            name = f"long-{'faststart' if faststart else 'moov-at-end'}.mp4"
            path = make_long_video(workdir / name, seconds=long_video_s, faststart=faststart)
            client.upload_file(str(path), "bench-out", f"videos/{name}")
            record("s3 (moto)", f"8 frames of a {long_video_s // 60}-min h264 mp4, "
                                f"{'faststart' if faststart else 'moov at the end'}", "sample",
                   {"video": f"s3://bench-out/videos/{name}", "s3": endpoint})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in results for k in r))
    with out_csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(results)
    typer.echo(f"wrote {out_csv}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(_measure(sys.argv[1], json.loads(sys.argv[2]))))
