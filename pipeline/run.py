"""The Ray Data graph of a labeling run: discover → decode (CPU tasks) → model actors → atomic Parquet parts."""
from __future__ import annotations

import json
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline import __version__
from pipeline.config import ConfigError, RunConfig
from pipeline.discover import VideoInput, discover_inputs
from pipeline.output import CHECKPOINT_ROWS, STATE_DIR, CompactionReport, OutputIndex, compact
from pipeline.storage import Location, check_bucket, storage_options


@dataclass
class RunSummary:
    run_id: str
    output: str
    labeling_hash: str
    videos_total: int = 0
    videos_skipped: int = 0          # already labeled for this config (resume)
    videos_ok: int = 0
    videos_error: int = 0
    rows: int = 0
    frames_decoded: int = 0
    visual_tokens_full: int = 0
    visual_tokens_kept: int = 0
    seconds: float = 0.0
    error_types: dict = field(default_factory=dict)
    duplicates_removed: int = 0      # rows dropped by compaction (start + end of the run): one row per key
    log_file: str = ""               # Ray's logs and warnings of this run

    @property
    def videos_per_s(self) -> float:
        done = self.videos_ok + self.videos_error
        return done / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_ratio(self) -> float:
        done = self.videos_ok + self.videos_error
        return self.videos_error / done if done else 0.0


class ErrorRatioExceeded(RuntimeError):
    def __init__(self, summary: RunSummary, limit: float):
        super().__init__(f"{summary.videos_error} of {summary.videos_ok + summary.videos_error} videos failed "
                         f"({summary.error_ratio:.0%}), above --max-error-ratio {limit:.0%}")
        self.summary = summary


def decode_row(row: dict, *, spec, timeout_s: float, s3_endpoint: str | None, anon: bool) -> dict:
    """Ray Data map fn: decode one video's sampled frames; every failure becomes an error record."""
    from pipeline.decode import DecodeError, decode_video
    from pipeline.storage import get_fs as _get_fs

    out = {"video_id": row["video_id"], "uri": row["uri"], "prompts": row["prompts"],
           "reference": row.get("reference"), "status": "ok",
           "error_type": None, "error_message": None, "frames": b"", "frames_shape": [0, 0, 0, 3],
           "frame_timestamps": [], "frames_sampled": 0, "duration_s": None, "fps": None, "width": None,
           "height": None, "decode_ms": None}
    try:
        fs, path = _get_fs(row["uri"], s3_endpoint=s3_endpoint, anon=anon)
        video = decode_video(row["uri"], spec, filesystem=fs, timeout_s=timeout_s)
    except DecodeError as e:
        return {**out, "status": "error", "error_type": e.error_type, "error_message": e.message}
    except Exception as e:  # never let one file kill the dataset
        return {**out, "status": "error", "error_type": "read_error", "error_message": f"{type(e).__name__}: {e}"}
    return {**out, "frames": video.frames.tobytes(), "frames_shape": list(video.frames.shape),
            "frame_timestamps": [float(t) for t in video.timestamps], "frames_sampled": int(video.frames.shape[0]),
            "duration_s": video.duration_s, "fps": video.fps, "width": video.width, "height": video.height,
            "decode_ms": video.decode_ms}


@dataclass
class RunPlan:
    """What a run will do, known before Ray starts (also what `--dry-run` prints)."""
    inputs: list[VideoInput]
    todo: list[VideoInput]
    index: OutputIndex
    n_videos: int                    # distinct videos found (a URI listed twice is one video)
    duplicates_removed: int = 0
    limited_from: int | None = None  # videos to do before --limit

    @property
    def rows_todo(self) -> int:
        return sum(len(v.prompts) for v in self.todo)


def preflight(cfg: RunConfig) -> tuple[RunConfig, list[VideoInput]]:
    """Everything that can fail fast, before the lease and Ray: model (its hub revision pinned), input listing,
    output access. Returns the config with `model_revision` resolved to a commit, and the inputs."""
    from actors.loading import ModelLoadError, check_model_available, resolve_revision

    opts = storage_options(cfg.model, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)
    check_bucket(cfg.model, "model", s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)
    check_bucket(cfg.input, "input", s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)
    check_bucket(cfg.output, "output", s3_endpoint=cfg.s3_endpoint, anon=cfg.anon, write=True)
    try:
        check_model_available(cfg.model, revision=cfg.model_revision, storage_options=opts)
        revision = resolve_revision(cfg.model, cfg.model_revision)
    except ModelLoadError as e:
        raise ConfigError(str(e)) from None
    if revision != cfg.model_revision:  # a branch or tag moves: rows and the labeling hash name the commit
        cfg = cfg.model_copy(update={"model_revision": revision})
    return cfg, discover_inputs(cfg)


def prepare_output(cfg: RunConfig) -> OutputIndex:
    """Under the output's lease (a dry run: without it, read only): --overwrite clears the output; then one
    listing and one key-column read of it (`OutputIndex`) serve resume, compaction and the summary."""
    try:
        out = Location.resolve(cfg.output, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)
        if cfg.overwrite and not cfg.dry_run:
            for p in out.fs.glob(out.path("*.parquet")) + out.fs.glob(out.path("_tmp-*")):
                out.fs.rm(p)
        if not cfg.dry_run:
            out.fs.makedirs(out.root, exist_ok=True)
        index = OutputIndex(out) if cfg.overwrite else OutputIndex.load(out)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"output: cannot use {cfg.output!r}: {type(e).__name__}: {e}") from None
    return index


def todo_from(inputs: list[VideoInput], index: OutputIndex, labeling_hash: str, *,
              include_errors: bool) -> list[VideoInput]:
    """The videos with (video, prompt) pairs not committed yet for this labeling config (resume)."""
    missing = index.missing(inputs, labeling_hash, include_errors=include_errors)
    if not missing.any():  # a finished job: nothing to walk through
        return []
    todo: dict[str, VideoInput] = {}
    k = 0
    for v in inputs:  # resume: only the (video, prompt) pairs not committed yet for this labeling config
        flags = missing[k:k + len(v.prompts)]
        k += len(v.prompts)
        if not flags.any() and v.video_id not in todo:
            continue
        pairs = [pp for pp, m in zip(v.prompts, flags) if m]
        if v.video_id in todo:  # the same URI listed twice (manifest): one row per (video, prompt)
            have = {pid for pid, _ in todo[v.video_id].prompts}
            todo[v.video_id].prompts.extend(pp for pp in pairs if pp[0] not in have)
        else:
            todo[v.video_id] = VideoInput(v.uri, pairs, v.reference)
    return list(todo.values())


def plan_run(cfg: RunConfig, inputs: list[VideoInput]) -> RunPlan:
    """After preflight: index the output, heal it (compaction), and work out the (video, prompt) pairs
    still to do."""
    index = prepare_output(cfg)
    # exactly once: heal duplicates a killed run (or a killed compaction) may have left, before Ray starts
    dups = 0 if (cfg.overwrite or cfg.dry_run) else _compact(cfg, index, before_run=True).duplicates_removed
    todo = todo_from(inputs, index, cfg.labeling_hash(), include_errors=not cfg.retry_errors)
    plan = RunPlan(inputs=inputs, todo=todo, index=index,
                   n_videos=len({v.video_id for v in inputs}), duplicates_removed=dups)
    if cfg.limit is not None and len(plan.todo) > cfg.limit:
        plan.limited_from = len(plan.todo)
        plan.todo = plan.todo[:cfg.limit]
    return plan


@dataclass
class Estimate:
    sample: int = 0                         # to-do videos decoded as a sample
    decode_s_per_video: float | None = None
    previous_videos_per_s: float | None = None  # from the latest earlier run's summary in the state folder
    eta_s: float | None = None


def estimate(cfg: RunConfig, plan: RunPlan, *, sample: int = 3) -> Estimate:
    """Time estimate for a dry run: decode a few to-do videos here (no Ray, no model), and take the rate
    of the latest earlier run on this output when there is one (that includes the model)."""
    from pipeline.decode import DecodeError, SamplingSpec, decode_video

    est = Estimate()
    spec = SamplingSpec.from_config(cfg)
    times = []
    for v in plan.todo[:sample]:
        t = time.perf_counter()
        try:
            fs = Location.resolve(v.uri, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon).fs
            decode_video(v.uri, spec, filesystem=fs)
        except DecodeError:
            pass  # a failing file costs its time too
        times.append(time.perf_counter() - t)
    if times:
        est.sample, est.decode_s_per_video = len(times), sum(times) / len(times)
    out = plan.index.loc
    try:
        states = sorted(out.fs.glob(out.path(STATE_DIR, "run-*.json")))
        rates = [json.loads(out.fs.cat_file(p)).get("videos_per_s") for p in states[-5:]]
        rates = [r for r in rates if r]
        est.previous_videos_per_s = rates[-1] if rates else None
    except Exception:
        pass
    if est.previous_videos_per_s:
        est.eta_s = len(plan.todo) / est.previous_videos_per_s
    elif est.decode_s_per_video is not None:  # decode only: a lower bound (one CPU, no model time)
        est.eta_s = len(plan.todo) * est.decode_s_per_video
    return est


def _gpu_count() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


MAX_INPUT_BLOCKS = 2000  # small blocks early: decode starts at once and a slow file holds back few others


def input_blocks(todo: list[VideoInput]) -> list:
    """The to-do list as Arrow tables, one per input block: columns, not a Python dict per video
    (at 10^6 videos ~150 MB of Arrow instead of ~1 GB of dicts), up to MAX_INPUT_BLOCKS blocks."""
    import pyarrow as pa

    table = pa.table({"video_id": [v.video_id for v in todo], "uri": [v.uri for v in todo],
                      "prompts": [json.dumps(v.prompts) for v in todo],
                      "reference": pa.array([v.reference for v in todo], pa.string())})
    rows = max(1, -(-len(todo) // MAX_INPUT_BLOCKS))
    return [table.slice(i, rows) for i in range(0, len(todo), rows)] or [table]


def build_dataset(cfg: RunConfig, todo: list[VideoInput], run_id: str, labeling_hash: str, *,
                  progress_counter=None):
    """The lazy Ray Data graph (nothing runs until it is written)."""
    import ray

    from actors.captioner import VideoCaptioner
    from pipeline.progress import counting
    from actors.splice import PruneSpec
    from iwp import IWPSettings
    from pipeline.decode import SamplingSpec

    ds = ray.data.from_arrow(input_blocks(todo))
    ds = ds.map(decode_row, fn_kwargs=dict(spec=SamplingSpec.from_config(cfg), timeout_s=cfg.decode_timeout_s,
                                           s3_endpoint=cfg.s3_endpoint, anon=cfg.anon),
                num_cpus=1, concurrency=cfg.decode_concurrency,
                # retries cover a decode worker that died; they also keep Ray from fusing decode into the
                # model actor (fusion needs equal remote args), so decoding runs ahead in its own CPU tasks
                max_retries=3)
    gpus = cfg.num_gpus_per_actor if cfg.num_gpus_per_actor is not None else (1.0 if _gpu_count() > 0 else 0.0)
    prune = PruneSpec(method=cfg.pruner, retention=cfg.retention, layer=cfg.iwp_layer, seed=cfg.seed,
                      max_residual=cfg.max_residual, max_retention=cfg.max_retention,
                      compensation=cfg.compensation, compensation_assignment=cfg.compensation_assignment,
                      settings=IWPSettings(lam=cfg.iwp_lambda, temperature=cfg.iwp_temperature, floor=cfg.iwp_floor,
                                           chunking=cfg.iwp_chunking, head_agg=cfg.iwp_head_agg, seed=cfg.seed))
    row_defaults = {"model": cfg.model, "model_revision": cfg.model_revision, "labeling_hash": labeling_hash,
                    "run_id": run_id, "pipeline_version": __version__,
                    "created_at": datetime.now(timezone.utc)}
    ds = ds.map_batches(
        counting(VideoCaptioner), batch_format="pyarrow", batch_size=cfg.batch_size, concurrency=cfg.concurrency,
        num_gpus=gpus, num_cpus=0 if gpus else 1,
        fn_constructor_kwargs=dict(model=cfg.model, prune=prune, max_new_tokens=cfg.max_new_tokens,
                                   batch_size=cfg.batch_size, revision=cfg.model_revision,
                                   trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype,
                                   device="cuda" if gpus and cfg.device == "auto" else cfg.device,
                                   storage_options=storage_options(cfg.model, s3_endpoint=cfg.s3_endpoint,
                                                                   anon=cfg.anon),
                                   row_defaults=row_defaults, progress_counter=progress_counter))
    return ds


def summarize(cfg: RunConfig, index: OutputIndex, run_id: str, labeling_hash: str, n_total: int,
              n_skipped: int, seconds: float) -> RunSummary:
    t = index.rows_of_run(run_id, ["video_id", "status", "error_type", "frames_sampled", "visual_tokens_full",
                                   "visual_tokens_kept"])
    s = RunSummary(run_id=run_id, output=cfg.output, labeling_hash=labeling_hash, videos_total=n_total,
                   videos_skipped=n_skipped, rows=t.num_rows, seconds=seconds)
    per_video: dict[str, dict] = {}
    for r in t.to_pylist():
        v = per_video.setdefault(r["video_id"], r)
        if r["status"] == "error":
            v["status"] = "error"
    for r in per_video.values():
        if r["status"] == "ok":
            s.videos_ok += 1
            s.frames_decoded += r["frames_sampled"] or 0
            s.visual_tokens_full += r["visual_tokens_full"] or 0
            s.visual_tokens_kept += r["visual_tokens_kept"] or 0
        else:
            s.videos_error += 1
            s.error_types[r["error_type"]] = s.error_types.get(r["error_type"], 0) + 1
    return s


def write_state(cfg: RunConfig, out: Location, summary: RunSummary) -> None:
    from pipeline.decode import SamplingSpec

    out.fs.makedirs(out.path(STATE_DIR), exist_ok=True)
    # the sampling lets `framescribe report` decode the very frames the model saw
    payload = {**asdict(summary), "videos_per_s": summary.videos_per_s, "pipeline_version": __version__,
               "finished_at": datetime.now(timezone.utc).isoformat(),
               "sampling": asdict(SamplingSpec.from_config(cfg)), "decode_timeout_s": cfg.decode_timeout_s}
    with out.fs.open(out.path(STATE_DIR, f"run-{summary.run_id}.json"), "w") as f:
        json.dump(payload, f, indent=2, default=str)


def _compact(cfg: RunConfig, index: OutputIndex, *, before_run: bool) -> CompactionReport:
    """Compaction of the output (see `compact`): duplicates before the run; after it, small parts too."""
    try:
        return compact(index, part_rows=None if before_run else cfg.part_rows)
    except Exception as e:
        if not before_run:
            raise
        raise ConfigError(f"output: cannot compact {cfg.output!r}: {type(e).__name__}: {e}") from None


def log_path_for(cfg: RunConfig, out: Location, run_id: str) -> Path:
    """Where the run's log file is written: in the output's state folder when the output is local disk,
    else in a local temp folder (uploaded to the state folder at the end)."""
    if not out.remote:
        return Path(out.root) / STATE_DIR / "logs" / f"run-{run_id}.log"
    return Path(tempfile.gettempdir()) / "framescribe-logs" / f"run-{run_id}.log"


def _label(cfg: RunConfig, plan: RunPlan, run_id: str, labeling_hash: str, console) -> None:
    """The Ray part of a run: the dataset is written while a progress display follows it."""
    import ray

    from pipeline.progress import ProgressCounter, ProgressDisplay
    from pipeline.sink import AtomicParquetSink

    if not ray.is_initialized():
        ray.init(address=cfg.address, include_dashboard=False if cfg.address is None else None,
                 log_to_driver=cfg.verbose)
    ray.data.DataContext.get_current().enable_progress_bars = cfg.verbose
    counter = ray.remote(num_cpus=0)(ProgressCounter).remote()
    ds = build_dataset(cfg, plan.todo, run_id, labeling_hash, progress_counter=counter)
    prompts = {len(v.prompts) for v in plan.todo}
    unit = "videos" if prompts == {1} else "labels (video x prompt)"
    with ProgressDisplay(lambda: ray.get(counter.get.remote(), timeout=5), plan.rows_todo, unit,
                         stream=console.console, live=console.is_tty and not cfg.verbose):
        ds.write_datasink(AtomicParquetSink(cfg.output, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon,
                                            checkpoint_rows=min(cfg.part_rows, CHECKPOINT_ROWS)))
    ray.kill(counter)


def _keep_log(out: Location, log_path: Path) -> str:
    """The log file's final place: uploaded to the output's state folder when that is object storage."""
    if not out.remote or not log_path.is_file():
        return str(log_path) if log_path.is_file() else ""
    try:
        dest = out.path(STATE_DIR, "logs", log_path.name)
        out.fs.put_file(str(log_path), dest)
        log_path.unlink()  # the temp copy: the object is the log now
        return f"{out.uri.split('://', 1)[0]}://{dest}"
    except Exception:  # losing the upload must not fail a finished run; the local copy stays
        return str(log_path)


def output_lease(cfg: RunConfig, log=print):
    """The output's lease as this config asks for it (see pipeline/lease.py)."""
    from pipeline.lease import hold_output_lease, lease_owner

    return hold_output_lease(cfg.output, ttl_s=cfg.lease_ttl, wait=cfg.wait_lease, wait_timeout_s=cfg.wait_timeout,
                             owner=lease_owner(cfg.run_id), s3_endpoint=cfg.s3_endpoint, anon=cfg.anon, log=log)


def run_pipeline(cfg: RunConfig, *, inputs: list[VideoInput] | None = None, lease=None,
                 log=print) -> RunSummary | RunPlan:
    """Run a labeling job end to end; returns the summary (raises ConfigError before any Ray work).
    With `dry_run`, returns the `RunPlan` and labels nothing (no lease, nothing written).

    The run holds the output's lease from before its first write to after its last: pass `lease` when the
    caller already holds it (jobs.incremental); else it is taken here (LeaseHeld when another run has it).
    """
    t0 = time.perf_counter()
    cfg, discovered = preflight(cfg)
    inputs = discovered if inputs is None else inputs
    if cfg.dry_run:
        return plan_run(cfg, inputs)
    if lease is not None:
        return _run_held(cfg, inputs, t0)
    with ExitStack() as held:
        try:
            held.enter_context(output_lease(cfg, log=log))
        except OSError as e:  # the output cannot hold a lease (permissions, store down): fix it locally
            raise ConfigError(f"output: cannot take the lease on {cfg.output!r}: {type(e).__name__}: {e}") from None
        return _run_held(cfg, inputs, t0)


def _run_held(cfg: RunConfig, inputs: list[VideoInput], t0: float) -> RunSummary:
    from pipeline.progress import ConsoleRoute

    run_id = cfg.run_id or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    labeling_hash = cfg.labeling_hash()
    plan = plan_run(cfg, inputs)
    index, out = plan.index, plan.index.loc
    log_path = log_path_for(cfg, out, run_id)
    log_file = ""
    if plan.todo:  # a run with nothing to do imports no Ray at all
        try:
            with ConsoleRoute(log_path, verbose=cfg.verbose) as console:
                _label(cfg, plan, run_id, labeling_hash, console)
        finally:
            log_file = _keep_log(out, log_path)
        index.refresh()  # one more listing: only the parts this run wrote are read
    report = _compact(cfg, index, before_run=False)  # retried tasks, --retry-errors: one row per key
    skipped = plan.n_videos - (plan.limited_from or len(plan.todo))  # --limit leaves the rest to do, not skipped
    summary = summarize(cfg, index, run_id, labeling_hash, plan.n_videos, skipped, time.perf_counter() - t0)
    summary.duplicates_removed = plan.duplicates_removed + report.duplicates_removed
    summary.log_file = log_file
    write_state(cfg, out, summary)
    if summary.error_ratio > cfg.max_error_ratio:
        raise ErrorRatioExceeded(summary, cfg.max_error_ratio)
    return summary
