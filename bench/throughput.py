"""`framescribe bench pipeline`: how much of the model's speed the Ray Data pipeline delivers.

1. writes a folder of N small synthetic videos (cached in the work directory);
2. **model only**: decodes them up front, then feeds the `VideoCaptioner` (the very class the Ray actors
   run) batch after batch in this process — the ceiling the pipeline can reach;
3. **pipeline**: `run_pipeline` over the folder (discover → decode tasks → model actor → Parquet parts)
   for each (batch size, decode concurrency) setting.

Reported per setting: wall time, videos/s, and the model busy fraction = (Σ over rows of the model time
the captioner records: vision_ms + prune_ms once per video, prefill_ms + generate_ms per row) / wall time.
The pipeline wall time includes planning, Ray Data start-up, actor start-up (model load, also reported on
its own) and the final summary, as a user's run does. The **steady state** comes from the model actor's
own log of its calls (`FRAMESCRIBE_BATCH_LOG`, one line per batch): `startup_s` is the time from the
start of the run to the model's first batch; over the window from that batch's start to the last batch's
end, `steady_videos_per_s` is the throughput a long run converges to, `actor_busy` the share of the
window the actor spent inside its calls (the rest it waited for input) and `steady_busy` the share spent
in the timed model work (vision + prune + prefill + generate).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from bench.figures import save_figure

CSV_COLUMNS = (
    "mode", "batch_size", "decode_concurrency", "videos", "video_frames", "video_size", "frames", "max_pixels",
    "model",
    "arch", "size", "layers", "device", "pruner", "retention", "max_new_tokens", "wall_s", "videos_per_s",
    "model_s", "busy_fraction", "busy_excl_load", "startup_s", "steady_s", "steady_videos_per_s", "actor_busy",
    "steady_busy", "calls", "model_load_s", "vision_s", "prune_s", "prefill_s",
    "generate_s", "decode_s", "rows_ok", "rows_error", "vs_model_only", "load_avg", "commit", "created_at",
)


@dataclass
class PipelineBenchConfig:
    videos: int = 16
    video_frames: int = 32         # frames in each file
    video_size: int = 128          # square side of each file
    frames: int = 8                # frames sampled per video (--num-frames of a run)
    max_pixels: int = 224 * 224    # pixel budget per frame (--max-pixels of a run); 448*448 for 3b/7b shapes
    arch: str = "qwen2_5_vl"
    size: str = "tiny"
    layers: Optional[int] = None
    vision_layers: Optional[int] = None
    model: Optional[str] = None    # a saved model directory instead of a built shape
    pruner: str = "iwp"
    retention: float = 0.25
    batch_sizes: tuple[int, ...] = (2, 4)
    decode_concurrency: tuple[Optional[int], ...] = (None, 2)  # None: Ray Data decides (a run's default)
    max_new_tokens: int = 16
    device: str = "auto"
    num_cpus: Optional[int] = None  # local Ray only (default: all)
    workdir: Path = Path(".framescribe-cache/bench-pipeline")
    out: Path = Path("bench-out/pipeline")

    def __post_init__(self) -> None:
        if self.videos < 1 or self.frames < 1 or self.video_frames < 1 or self.video_size < 16:
            raise ValueError("videos, frames, video_frames must be >= 1 and video_size >= 16")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError("batch_sizes: each must be >= 1")
        if not self.decode_concurrency or any(c is not None and c < 1 for c in self.decode_concurrency):
            raise ValueError("decode_concurrency: each must be >= 1")
        if self.pruner == "none" and self.retention != 1.0:
            raise ValueError("retention < 1 needs a pruner")


def make_video_folder(cfg: PipelineBenchConfig) -> Path:
    """N h264 clips (moving square over a texture); written once per (N, frames, size)."""
    from pipeline.sample_videos import make_moving_shapes, write_video

    folder = cfg.workdir / f"videos_{cfg.videos}x{cfg.video_frames}f_{cfg.video_size}px"
    done = folder / ".complete"
    if done.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(cfg.videos):
        frames = make_moving_shapes(cfg.video_frames, cfg.video_size, cfg.video_size, seed=i)
        write_video(folder / f"v{i:04d}.mp4", frames, fps=8, codec="h264")
    done.write_text("ok")
    return folder


def model_dir(cfg: PipelineBenchConfig) -> Path:
    """A saved model for the actors to load: `--model`, the tiny test model, or a built shape (cached)."""
    if cfg.model:
        return Path(cfg.model)
    resolution = int(cfg.max_pixels ** 0.5) // 28 * 28
    name = f"{cfg.arch}-{cfg.size}-L{cfg.layers or 'full'}-V{cfg.vision_layers or 'full'}-R{resolution}"
    path = cfg.workdir / "models" / name
    if (path / "config.json").is_file():
        return path
    if cfg.size == "tiny" and cfg.layers is None and cfg.vision_layers is None:
        from actors.tiny_model import make_tiny_model

        return make_tiny_model(path, cfg.arch)
    import torch

    from actors.model_shapes import build_model

    # random weights: built where they will run (bf16 on a GPU), saved once for the actors to load
    gpu = torch.cuda.is_available() and cfg.device != "cpu"
    built = build_model(cfg.arch, cfg.size, device=torch.device("cuda" if gpu else "cpu"),
                        dtype=torch.bfloat16 if gpu else torch.float32, layers=cfg.layers,
                        vision_layers=cfg.vision_layers, resolution=resolution)
    tmp = path.with_name(path.name + ".partial")
    built.model.save_pretrained(tmp)
    built.processor.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def _model_seconds(rows: list[dict]) -> dict:
    """Σ model time from output rows: per-video parts once per video, per-row parts per row."""
    per_video: dict[str, dict] = {}
    out = {"vision_s": 0.0, "prune_s": 0.0, "prefill_s": 0.0, "generate_s": 0.0, "decode_s": 0.0}
    ok = err = 0
    for r in rows:
        if r.get("status") != "ok":
            err += 1
            continue
        ok += 1
        out["prefill_s"] += (r.get("prefill_ms") or 0.0) / 1e3
        out["generate_s"] += (r.get("generate_ms") or 0.0) / 1e3
        per_video.setdefault(r["video_id"], r)
    for r in per_video.values():
        out["vision_s"] += (r.get("vision_ms") or 0.0) / 1e3
        out["prune_s"] += (r.get("prune_ms") or 0.0) / 1e3
        out["decode_s"] += (r.get("decode_ms") or 0.0) / 1e3
    out["model_s"] = out["vision_s"] + out["prune_s"] + out["prefill_s"] + out["generate_s"]
    out["rows_ok"], out["rows_error"] = ok, err
    return out


def read_batch_log(path: Path, since: float, until: float) -> list[dict]:
    """The model calls logged between two epoch times, by start time."""
    if not path.is_file():
        return []
    calls = []
    for line in path.read_text().splitlines():
        try:
            c = json.loads(line)
        except ValueError:
            continue
        if since <= c["start"] <= until:
            calls.append(c)
    return sorted(calls, key=lambda c: c["start"])


def steady_state(calls: list[dict], run_start: float, videos: int, model_s: float) -> dict:
    """Start-up and steady-state numbers from the actor's call log (NaN without a log)."""
    nan = float("nan")
    if not calls:
        return {"startup_s": nan, "steady_s": nan, "steady_videos_per_s": nan, "actor_busy": nan,
                "steady_busy": nan, "calls": 0}
    window = max(1e-9, calls[-1]["end"] - calls[0]["start"])
    in_calls = sum(c["end"] - c["start"] for c in calls)
    return {"startup_s": calls[0]["start"] - run_start, "steady_s": window, "steady_videos_per_s": videos / window,
            "actor_busy": in_calls / window, "steady_busy": model_s / window, "calls": len(calls)}


def _prune_spec(cfg: PipelineBenchConfig):
    from actors.splice import PruneSpec

    return PruneSpec(method=cfg.pruner, retention=cfg.retention)


def _decoded_rows(folder: Path, cfg: PipelineBenchConfig) -> list[dict]:
    """The rows the decode tasks would hand the model actor, made in this process."""
    from pipeline.config import RunConfig
    from pipeline.decode import SamplingSpec
    from pipeline.discover import discover_inputs
    from pipeline.run import decode_row

    run_cfg = RunConfig(input=str(folder), output=str(cfg.workdir / "unused"), model="unused", num_frames=cfg.frames,
                        max_pixels=cfg.max_pixels)
    spec = SamplingSpec.from_config(run_cfg)
    items = [{"video_id": v.video_id, "uri": v.uri, "prompts": json.dumps(v.prompts)} for v in discover_inputs(run_cfg)]
    return [decode_row(it, spec=spec, timeout_s=None, s3_endpoint=None, anon=False) for it in items]


def bench_model_only(cfg: PipelineBenchConfig, folder: Path, model: Path, *, log=print) -> tuple[list[dict], float]:
    """The VideoCaptioner fed pre-decoded rows, one Arrow batch at a time (no Ray)."""
    import pyarrow as pa
    import torch

    from actors.captioner import VideoCaptioner

    rows = _decoded_rows(folder, cfg)
    if torch.cuda.is_available() is False or cfg.device == "cpu":
        torch.set_num_threads(1)  # a Ray actor with num_cpus=1 gets OMP_NUM_THREADS=1: compare like with like
    t0 = time.perf_counter()
    cap = VideoCaptioner(model=str(model), prune=_prune_spec(cfg), max_new_tokens=cfg.max_new_tokens,
                         batch_size=cfg.batch_sizes[0], device=cfg.device)
    load_s = time.perf_counter() - t0
    log(f"model load {load_s:.2f}s")
    results = []
    for b in cfg.batch_sizes:
        cap.batch_size = b
        cap(pa.Table.from_pylist(rows[:b]))  # warm-up
        t0 = time.perf_counter()
        out_rows: list[dict] = []
        in_calls = 0.0
        for start in range(0, len(rows), b):
            tc = time.perf_counter()
            out_rows += cap(pa.Table.from_pylist(rows[start:start + b])).to_pylist()
            in_calls += time.perf_counter() - tc
        wall = time.perf_counter() - t0
        secs = _model_seconds(out_rows)
        results.append({"mode": "model_only", "batch_size": b, "decode_concurrency": "", "wall_s": wall,
                        "videos_per_s": len(rows) / wall, "busy_fraction": secs["model_s"] / wall,
                        "busy_excl_load": secs["model_s"] / wall, "startup_s": 0.0, "steady_s": wall,
                        "steady_videos_per_s": len(rows) / wall, "actor_busy": in_calls / wall,
                        "steady_busy": secs["model_s"] / wall, "calls": -(-len(rows) // b), **secs})
        log(f"model only, batch {b}: {len(rows) / wall:.2f} videos/s")
    del cap  # free the GPU for the pipeline's actors
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return results, load_s


def bench_full_pipeline(cfg: PipelineBenchConfig, folder: Path, model: Path, load_s: float, *, log=print) -> list[dict]:
    import pyarrow.compute as pc
    import ray

    from pipeline.config import RunConfig
    from pipeline.output import read_rows
    from pipeline.run import run_pipeline

    from actors.captioner import BATCH_LOG_ENV

    batch_log = cfg.workdir / "batch-log.jsonl"
    os.environ[BATCH_LOG_ENV] = str(batch_log.resolve())  # local Ray started below inherits it
    if not ray.is_initialized():
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {BATCH_LOG_ENV: str(batch_log.resolve())}})
    results = []
    for b in cfg.batch_sizes:
        for c in cfg.decode_concurrency:
            out = cfg.workdir / "labels" / f"b{b}_c{c or 'auto'}"
            run_cfg = RunConfig(input=str(folder), output=str(out), model=str(model), num_frames=cfg.frames,
                                max_pixels=cfg.max_pixels,
                                pruner=cfg.pruner, retention=cfg.retention, batch_size=b, decode_concurrency=c,
                                max_new_tokens=cfg.max_new_tokens, device=cfg.device, overwrite=True)
            start = time.time()
            t0 = time.perf_counter()
            summary = run_pipeline(run_cfg)
            wall = time.perf_counter() - t0
            calls = read_batch_log(batch_log, start, time.time())
            t = read_rows(str(out))
            rows = t.filter(pc.equal(t["run_id"], summary.run_id)).to_pylist()
            secs = _model_seconds(rows)
            steady = steady_state(calls, start, cfg.videos, secs["model_s"])
            results.append({"mode": "pipeline", "batch_size": b, "decode_concurrency": c or "auto", "wall_s": wall,
                            "videos_per_s": cfg.videos / wall, "busy_fraction": secs["model_s"] / wall,
                            "busy_excl_load": secs["model_s"] / max(1e-9, wall - load_s), **secs, **steady})
            log(f"pipeline, batch {b}, decode concurrency {c}: {cfg.videos / wall:.2f} videos/s, "
                f"model busy {secs['model_s'] / wall:.0%}; steady {steady['steady_videos_per_s']:.2f} videos/s, "
                f"model busy {steady['steady_busy']:.0%} (actor in calls {steady['actor_busy']:.0%}), "
                f"start-up {steady['startup_s']:.1f}s")
    return results


def run_pipeline_bench(cfg: PipelineBenchConfig, *, log=print) -> tuple[list[dict], Path, Path]:
    from bench.speed import git_commit

    folder = make_video_folder(cfg)
    model = model_dir(cfg)
    log(f"{cfg.videos} videos in {folder}; model {model}")
    model_only, load_s = bench_model_only(cfg, folder, model, log=log)
    pipeline = bench_full_pipeline(cfg, folder, model, load_s, log=log)
    import torch

    device = "cuda" if (cfg.device in ("auto", "cuda") and torch.cuda.is_available()) else "cpu"
    common = {"videos": cfg.videos, "video_frames": cfg.video_frames, "video_size": cfg.video_size,
              "frames": cfg.frames, "max_pixels": cfg.max_pixels, "model": str(model), "arch": cfg.arch,
              "size": cfg.size if not cfg.model else "",
              "layers": cfg.layers or "", "device": device, "pruner": cfg.pruner, "retention": cfg.retention,
              "max_new_tokens": cfg.max_new_tokens, "model_load_s": round(load_s, 3),
              "load_avg": round(os.getloadavg()[0], 2), "commit": git_commit(),
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    best_model_only = {r["batch_size"]: r["videos_per_s"] for r in model_only}
    rows = []
    for r in model_only + pipeline:
        row = {**common, **r}
        row["vs_model_only"] = r["videos_per_s"] / best_model_only[r["batch_size"]]
        rows.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in
                     ((k, row.get(k, "")) for k in CSV_COLUMNS)})
    cfg.out.mkdir(parents=True, exist_ok=True)
    stem = f"pipeline_{cfg.arch}_{cfg.size if not cfg.model else 'model'}_{device}"
    csv_path, png_path = cfg.out / f"{stem}.csv", cfg.out / f"{stem}.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
        w.writeheader()
        w.writerows(rows)
    plot_pipeline(rows, png_path)
    return rows, csv_path, png_path


def _label(r: dict) -> str:
    if r["mode"] == "model_only":
        return f"model only\nb={r['batch_size']}"
    return f"pipeline\nb={r['batch_size']} d={r['decode_concurrency']}"


def plot_pipeline(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_label(r) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = ["tab:green" if r["mode"] == "model_only" else "tab:blue" for r in rows]
    from matplotlib.patches import Patch

    bars = [Patch(facecolor="tab:green", label="model only (whole run)"),
            Patch(facecolor="tab:blue", label="pipeline (whole run)")]
    ax1.bar(labels, [r["videos_per_s"] for r in rows], color=colors)
    steady = ax1.scatter(labels, [float(r["steady_videos_per_s"]) if r["steady_videos_per_s"] != "" else float("nan")
                                  for r in rows], color="black", marker="D", zorder=3, label="steady state")
    ax1.legend(handles=[*bars, steady], fontsize=7)
    ax1.set_ylabel("videos / s")
    ax1.set_title("throughput")
    ax1.tick_params(axis="x", labelsize=7)
    ax2.bar(labels, [100 * r["busy_fraction"] for r in rows], color=colors)
    ax2.scatter(labels, [100 * float(r["steady_busy"]) if r["steady_busy"] != "" else float("nan") for r in rows],
                color="black", marker="D", zorder=3, label="model busy, steady state")
    ax2.axhline(90, color="red", lw=0.8, ls="--", label="target 90%")
    ax2.set_ylabel("% of wall time")
    ax2.set_title("model busy fraction")
    ax2.tick_params(axis="x", labelsize=7)
    handles, _ = ax2.get_legend_handles_labels()
    ax2.legend(handles=[*bars, *handles], fontsize=7, loc="lower left")
    r0 = rows[0]
    save_figure(fig, path, f"{r0['videos']} videos, {r0['frames']} frames sampled, {r0['arch']} {r0['size']} "
                 f"{r0['pruner']}@{r0['retention']}, {r0['device']}")


def print_pipeline(rows: list[dict], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title="bench pipeline (wall-clock)")
    for c in ("mode", "batch", "decode conc.", "wall s", "videos/s", "× model only", "model s", "busy",
              "busy (excl. load)", "start-up s", "steady videos/s", "actor in calls", "steady model busy",
              "vision s", "prune s", "prefill s", "generate s", "decode s (tasks)"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["mode"], str(r["batch_size"]), str(r["decode_concurrency"]), f"{r['wall_s']:.2f}",
                  f"{r['videos_per_s']:.2f}", f"{r['vs_model_only']:.2f}", f"{r['model_s']:.2f}",
                  f"{r['busy_fraction']:.0%}", f"{r['busy_excl_load']:.0%}", _fmt(r.get("startup_s"), "{:.2f}"),
                  _fmt(r.get("steady_videos_per_s"), "{:.2f}"), _fmt(r.get("actor_busy"), "{:.0%}"),
                  _fmt(r.get("steady_busy"), "{:.0%}"), f"{r['vision_s']:.2f}",
                  f"{r['prune_s']:.2f}", f"{r['prefill_s']:.2f}", f"{r['generate_s']:.2f}", f"{r['decode_s']:.2f}")
    console.print(t)


def _fmt(v, spec: str) -> str:
    if v is None or v == "" or (isinstance(v, float) and v != v):
        return "-"
    return spec.format(v)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.replace(" ", "").split(",") if x)


def _concurrency(text: str) -> tuple[Optional[int], ...]:
    return tuple(None if x == "auto" else int(x) for x in text.replace(" ", "").split(",") if x)


def command(
    videos: int = typer.Option(16, help="number of synthetic videos in the folder"),
    video_frames: int = typer.Option(32, help="frames in each video file"),
    video_size: int = typer.Option(128, help="square frame side of each file (pixels)"),
    frames: int = typer.Option(8, help="frames sampled per video (a run's --num-frames)"),
    max_pixels: int = typer.Option(224 * 224, help="pixel budget per frame (a run's --max-pixels); "
                                                   "448*448=200704 for the 3b/7b shapes"),
    arch: str = typer.Option("qwen2_5_vl", help="qwen2_5_vl | llava_onevision"),
    size: str = typer.Option("tiny", help="tiny | small | 3b | 7b (random weights, saved once to --workdir)"),
    layers: Optional[int] = typer.Option(None, help="LLM layers of the built shape"),
    vision_layers: Optional[int] = typer.Option(None, help="vision blocks of the built shape"),
    model: Optional[str] = typer.Option(None, help="a saved model directory instead of --arch/--size"),
    pruner: str = typer.Option("iwp"),
    retention: float = typer.Option(0.25),
    batch_sizes: str = typer.Option("2,4", help="comma-separated model batch sizes"),
    decode_concurrency: str = typer.Option("auto,2", help="comma-separated parallel decode tasks; auto: Ray decides"),
    max_new_tokens: int = typer.Option(16),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs of the local Ray instance (default: all)"),
    workdir: Path = typer.Option(Path(".framescribe-cache/bench-pipeline"), help="videos, model and labels"),
    out: Path = typer.Option(Path("bench-out/pipeline"), help="directory for the CSV and PNG"),
):
    """Model-only vs full Ray Data pipeline throughput and the model busy fraction."""
    from rich.console import Console

    console = Console(width=None if Console().is_terminal else 200)
    err = Console(stderr=True)
    try:
        cfg = PipelineBenchConfig(videos=videos, video_frames=video_frames, video_size=video_size, frames=frames,
                                  max_pixels=max_pixels,
                                  arch=arch, size=size, layers=layers, vision_layers=vision_layers, model=model,
                                  pruner=pruner, retention=retention, batch_sizes=_ints(batch_sizes),
                                  decode_concurrency=_concurrency(decode_concurrency), max_new_tokens=max_new_tokens,
                                  device=device, num_cpus=num_cpus, workdir=workdir, out=out)
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    rows, csv_path, png_path = run_pipeline_bench(cfg, log=err.print)
    print_pipeline(rows, console)
    console.print(f"wrote {csv_path} and {png_path}")
