"""The Ray Data graph of a labeling run: discover → decode (CPU tasks) → model actors → atomic Parquet parts."""
from __future__ import annotations

import json
import sys
import tempfile
import time
import uuid
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline import __version__
from pipeline.config import ConfigError, RunConfig
from pipeline.discover import VIDEO_EXTENSIONS, VideoInput, discover_inputs
from pipeline.output import (CHECKPOINT_ROWS, SCHEMA_VERSION, STATE_DIR, CompactionReport, OutputIndex, compact,
                             foreign_parquet, migrate_legacy_rows)
from pipeline.storage import Location, check_bucket, check_local_writable, join, storage_options


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
    other_configs: dict = field(default_factory=dict)  # labeling_hash -> rows of other labeling configs in the output
    notices: list = field(default_factory=list)        # what the run said at its start (also printed to stderr)

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


# Errors that may go away by themselves (storage throttling, 5xx, resets, timeouts; a slow read shows up as a
# decode timeout): their rows say retryable and the next runs retry them, up to --max-run-attempts runs.
RETRYABLE_ERRORS = ("read_error", "decode_timeout")


def decode_row(row: dict, *, spec, timeout_s: float, s3_endpoint: str | None, anon: bool) -> dict:
    """Ray Data map fn: decode one video's sampled frames; every failure becomes an error record."""
    out = _decode_record(row, spec=spec, timeout_s=timeout_s, s3_endpoint=s3_endpoint, anon=anon)
    out["retryable"] = out["error_type"] in RETRYABLE_ERRORS if out["status"] == "error" else None
    out["run_attempt"] = int(row.get("run_attempt") or 1)
    return out


def _decode_record(row: dict, *, spec, timeout_s: float, s3_endpoint: str | None, anon: bool) -> dict:
    from pipeline.decode import DecodeError, decode_video
    from pipeline.storage import get_fs as _get_fs

    out = {"video_id": row["video_id"], "uri": row["uri"], "prompts": row["prompts"],
           "reference": row.get("reference"), "status": "ok",
           "error_type": None, "error_message": None, "frames": b"", "frames_shape": [0, 0, 0, 3],
           "frame_timestamps": [], "frames_sampled": 0, "duration_s": None, "fps": None, "width": None,
           "height": None, "decode_ms": None, "decoder": None}
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
            "decode_ms": video.decode_ms, "decoder": video.decoder}


@dataclass
class OutputState:
    index: OutputIndex              # one listing + one key-column read of the output (after --overwrite, migration)
    other_configs: dict             # labeling_hash -> rows of other configs already in the output
    notices: list[str]              # what the user should know before the work starts


@dataclass
class RunPlan:
    """What a run will do, known before Ray starts (also what `--dry-run` prints)."""
    inputs: list[VideoInput]
    todo: list[VideoInput]
    index: OutputIndex
    n_videos: int                    # distinct videos found (a URI listed twice is one video)
    duplicates_removed: int = 0
    limited_from: int | None = None  # videos to do before --limit
    run_attempts: dict = field(default_factory=dict)   # video_id -> run attempt of its rows (retried retryable errors)
    other_configs: dict = field(default_factory=dict)
    notices: list = field(default_factory=list)

    @property
    def rows_todo(self) -> int:
        return sum(len(v.prompts) for v in self.todo)


def notice(notices: list[str], message: str) -> None:
    notices.append(message)
    print(f"framescribe: {message}", file=sys.stderr, flush=True)


def preflight(cfg: RunConfig, *, empty_ok: bool = False) -> tuple[RunConfig, list[VideoInput]]:
    """Everything that can fail fast, before the lease and Ray: model (its hub revision pinned), input listing
    (an input with no videos is a config error unless `empty_ok`), questions, output access. Returns the
    config with `model_revision` resolved to a commit, and the inputs."""
    from actors.loading import ModelLoadError, check_model_available, resolve_revision

    opts = storage_options(cfg.model, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)
    check_bucket(cfg.model, "model", s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)
    check_bucket(cfg.input, "input", s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)
    check_bucket(cfg.output, "output", s3_endpoint=cfg.s3_endpoint, anon=cfg.anon, write=True)
    check_local_writable(cfg.output, "output")
    try:
        check_model_available(cfg.model, revision=cfg.model_revision, storage_options=opts)
        revision = resolve_revision(cfg.model, cfg.model_revision)
    except ModelLoadError as e:
        raise ConfigError(str(e)) from None
    if revision != cfg.model_revision:  # a branch or tag moves: rows and the labeling hash name the commit
        cfg = cfg.model_copy(update={"model_revision": revision})
    inputs = discover_inputs(cfg)
    if not inputs and not empty_ok:
        raise ConfigError(f"input: no videos in {cfg.input!r} (looked for {', '.join(sorted(VIDEO_EXTENSIONS))}"
                          f" files, recursively); check the path")
    return cfg, inputs


def prepare_output(cfg: RunConfig) -> OutputState:
    """Under the output's lease (a dry run: without it, read only): --overwrite, migration of old rows; then
    one listing and one key-column read of the output (`OutputIndex`) serve resume, compaction and the summary.

    The output folder is the user's: only framescribe's parts (`part-<hex>.parquet`), its temp objects and
    its state folder are ever read, rewritten or deleted. A folder holding other Parquet files is refused
    (they would mix into any reader's dataset), other files are left alone."""
    import pyarrow as pa
    import pyarrow.compute as pc

    notices: list[str] = []
    labeling_hash = cfg.labeling_hash()
    try:
        out = Location.resolve(cfg.output, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)
        fs, root = out.fs, out.root
        if not cfg.dry_run:
            fs.makedirs(root, exist_ok=True)
        fs.invalidate_cache(root)
        foreign = foreign_parquet(fs, root) if fs.exists(root) else []
        if foreign:
            raise ConfigError(f"output: {cfg.output!r} holds Parquet files framescribe did not write, e.g. "
                              f"{foreign[0]!r}; framescribe never touches them and they would mix into the "
                              f"dataset: move them or choose another --output")
        if cfg.overwrite:
            if not cfg.dry_run:
                old = OutputIndex.load(out)  # framescribe's own parts and temp objects only
                parts = sorted(old.live)
                hashes = old.keys["labeling_hash"].cast(pa.string()).value_counts().to_pylist() if parts else []
                for p in parts + sorted(old.tmp):
                    fs.rm_file(p)
                if parts:
                    rows = sum(h["counts"] for h in hashes)
                    others = [h for h in hashes if h["values"] != labeling_hash]
                    notice(notices, f"--overwrite removed {len(parts)} part(s) with {rows} rows from {cfg.output}"
                           + (f", {sum(h['counts'] for h in others)} of them of {len(others)} other labeling "
                              f"config(s) ({', '.join(str(h['values']) for h in others)})" if others else "")
                           + "; other files there were left alone")
            index = OutputIndex(out)
        else:
            if not cfg.dry_run:
                migrated = migrate_legacy_rows(cfg.output, legacy_hash=cfg.legacy_labeling_hash(),
                                               labeling_hash=labeling_hash, key_for_uri=_key_for_uri(cfg),
                                               s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)
                if migrated:
                    notice(notices, f"migrated {migrated} rows written by an earlier framescribe for this labeling "
                           f"config to schema version {SCHEMA_VERSION} (labeling_hash {labeling_hash})")
            index = OutputIndex.load(out)
        if not cfg.dry_run:
            fs.makedirs(join(root, STATE_DIR), exist_ok=True)
            fs.pipe_file(join(root, STATE_DIR, "schema.json"), json.dumps(
                {"schema_version": SCHEMA_VERSION, "pipeline_version": __version__,
                 "note": "rows with a null schema_version were written by framescribe 0.1.0 (schema version 1)"},
                indent=2).encode())
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"output: cannot use {cfg.output!r}: {type(e).__name__}: {e}") from None
    hashes = index.keys["labeling_hash"].cast(pa.string())
    others = hashes.filter(pc.not_equal(hashes, labeling_hash))
    other_configs = {h["values"]: h["counts"] for h in others.value_counts().to_pylist()}
    if other_configs:
        notice(notices, f"{cfg.output} already holds {sum(other_configs.values())} rows of {len(other_configs)} "
               f"other labeling config(s) ({', '.join(other_configs)}); this run's rows have labeling_hash "
               f"{labeling_hash}. Read one config with: pyarrow.dataset.dataset(OUT).to_table(filter="
               f"pyarrow.compute.field('labeling_hash') == '{labeling_hash}')")
    return OutputState(index, other_configs, notices)


def _key_for_uri(cfg: RunConfig):
    """uri (as an old row stored it) -> (canonical uri, video key) under this run's input root."""
    from pipeline.discover import canonical_uri, input_root, video_key

    root = input_root(cfg.input)

    def key(uri: str) -> tuple[str, str]:
        canonical = canonical_uri(uri)
        return canonical, video_key(canonical, root)
    return key


def todo_from(inputs: list[VideoInput], index: OutputIndex, labeling_hash: str, *,
              include_errors: bool, max_run_attempts: int | None = None) -> list[VideoInput]:
    """The videos with (video, prompt) pairs not committed yet for this labeling config (resume). Errors count
    as done (with `include_errors`), except retryable ones tried by fewer than `max_run_attempts` runs."""
    missing = index.missing(inputs, labeling_hash, include_errors=include_errors, max_run_attempts=max_run_attempts)
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
            todo[v.video_id] = VideoInput(v.uri, pairs, v.key, v.reference)
    return list(todo.values())


def plan_run(cfg: RunConfig, inputs: list[VideoInput]) -> RunPlan:
    """After preflight: index the output (after --overwrite / migration), heal it (compaction), and work out
    the (video, prompt) pairs still to do."""
    state = prepare_output(cfg)
    index = state.index
    labeling_hash = cfg.labeling_hash()
    # exactly once: heal duplicates a killed run (or a killed compaction) may have left, before Ray starts
    dups = 0 if (cfg.overwrite or cfg.dry_run) else _compact(cfg, index, before_run=True).duplicates_removed
    todo = todo_from(inputs, index, labeling_hash, include_errors=not cfg.retry_errors,
                     max_run_attempts=cfg.max_run_attempts)
    plan = RunPlan(inputs=inputs, todo=todo, index=index, n_videos=len({v.video_id for v in inputs}),
                   duplicates_removed=dups, other_configs=state.other_configs, notices=state.notices)
    if cfg.limit is not None and len(plan.todo) > cfg.limit:
        plan.limited_from = len(plan.todo)
        plan.todo = plan.todo[:cfg.limit]
    if plan.todo and not cfg.overwrite:
        # retryable rows retried by this run: their rows count one more run attempt
        for (vid, _pid), n in index.retry_attempts(labeling_hash, cfg.max_run_attempts).items():
            plan.run_attempts[vid] = max(plan.run_attempts.get(vid, 1), n + 1)
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


def input_blocks(todo: list[VideoInput], run_attempts: dict[str, int] | None = None) -> list:
    """The to-do list as Arrow tables, one per input block: columns, not a Python dict per video
    (at 10^6 videos ~150 MB of Arrow instead of ~1 GB of dicts), up to MAX_INPUT_BLOCKS blocks."""
    import pyarrow as pa

    run_attempts = run_attempts or {}
    table = pa.table({"video_id": [v.video_id for v in todo], "uri": [v.uri for v in todo],
                      "prompts": [json.dumps(v.prompts) for v in todo],
                      "reference": pa.array([v.reference for v in todo], pa.string()),
                      "run_attempt": pa.array([run_attempts.get(v.video_id, 1) for v in todo], pa.int64())})
    rows = max(1, -(-len(todo) // MAX_INPUT_BLOCKS))
    return [table.slice(i, rows) for i in range(0, len(todo), rows)] or [table]


def attempts_root(cfg: RunConfig, labeling_hash: str) -> str:
    """Where model attempts that died are remembered (actors.attempts)."""
    return join(cfg.output, STATE_DIR, "attempts", labeling_hash)


# Ray also spends a retry each time a call reaches an actor that is gone but not yet restarting (a lost node
# fails a queued batch this way two or three times in a row); these calls never ran, so they get headroom.
ACTOR_UNAVAILABLE_RETRIES = 20


def model_task_retries(cfg: RunConfig) -> int:
    """Ray's retries of a batch whose actor died: bounded, never Ray's default of forever. A batch needs at
    most one crash with everyone in it, then `model_retries - 1` isolated crashes per video before every
    video has its row (the ledger in actors.attempts enforces --model-retries per video), plus the
    headroom above."""
    return 1 + cfg.batch_size * max(1, cfg.model_retries - 1) + ACTOR_UNAVAILABLE_RETRIES


def build_dataset(cfg: RunConfig, todo: list[VideoInput], run_id: str, labeling_hash: str,
                  run_attempts: dict[str, int] | None = None, *, progress_counter=None):
    """The lazy Ray Data graph (nothing runs until it is written)."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from actors.captioner import VideoCaptioner
    from pipeline.progress import counting
    from actors.splice import PruneSpec
    from iwp import IWPSettings
    from pipeline.decode import SamplingSpec

    ds = ray.data.from_arrow(input_blocks(todo, run_attempts))
    # Decode runs in its own CPU tasks, never inside the model actor: its declared memory differs from the
    # model stage's resources, which Ray Data never fuses (tests/test_reliability.py checks the plan).
    # The memory reservation keeps a node from starting more decodes than it can hold.
    ds = ds.map(decode_row, fn_kwargs=dict(spec=SamplingSpec.from_config(cfg), timeout_s=cfg.decode_timeout_s,
                                           s3_endpoint=cfg.s3_endpoint, anon=cfg.anon),
                compute=TaskPoolStrategy(size=cfg.decode_concurrency), num_cpus=1,
                memory=cfg.decode_memory_mb * 1024 * 1024)
    gpus = cfg.num_gpus_per_actor if cfg.num_gpus_per_actor is not None else (1.0 if _gpu_count() > 0 else 0.0)
    prune = PruneSpec(method=cfg.pruner, retention=cfg.retention, layer=cfg.iwp_layer, seed=cfg.seed,
                      max_residual=cfg.max_residual, max_retention=cfg.max_retention,
                      compensation=cfg.compensation, compensation_assignment=cfg.compensation_assignment,
                      settings=IWPSettings(lam=cfg.iwp_lambda, temperature=cfg.iwp_temperature, floor=cfg.iwp_floor,
                                           chunking=cfg.iwp_chunking, head_agg=cfg.iwp_head_agg,
                                           selection=cfg.iwp_selection, chunk_budget=cfg.iwp_chunk_budget,
                                           seed=cfg.seed))
    row_defaults = {"model": cfg.model, "model_revision": cfg.model_revision, "labeling_hash": labeling_hash,
                    "run_id": run_id, "pipeline_version": __version__,
                    "created_at": datetime.now(timezone.utc), "schema_version": SCHEMA_VERSION}
    with warnings.catch_warnings():
        # Ray 2.60 takes max_restarts / max_task_retries only as **ray_remote_args, which it marks deprecated
        # (removal announced for 2.64, hence ray<2.64 in pyproject.toml); without them it retries forever.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        ds = ds.map_batches(
            counting(VideoCaptioner), batch_format="pyarrow", batch_size=cfg.batch_size,
            compute=ActorPoolStrategy(size=cfg.concurrency), num_gpus=gpus, num_cpus=0 if gpus else 1,
            max_restarts=-1, max_task_retries=model_task_retries(cfg),
            fn_constructor_kwargs=dict(model=cfg.model, prune=prune, max_new_tokens=cfg.max_new_tokens,
                                       batch_size=cfg.batch_size, revision=cfg.model_revision,
                                       trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype,
                                       device="cuda" if gpus and cfg.device == "auto" else cfg.device,
                                       storage_options=storage_options(cfg.model, s3_endpoint=cfg.s3_endpoint,
                                                                       anon=cfg.anon),
                                       row_defaults=row_defaults,
                                       attempts_root=attempts_root(cfg, labeling_hash),
                                       attempts_storage_options=storage_options(
                                           cfg.output, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon),
                                       max_crashes=cfg.model_retries,
                                       skip_threshold=cfg.skip_threshold(),
                                       decode_loop=cfg.decode_loop, compile_decode=cfg.compile_decode,
                                       eos_check_every=cfg.eos_check_every,
                                       progress_counter=progress_counter))
    return ds


def clear_attempts(cfg: RunConfig, labeling_hash: str) -> None:
    from actors.attempts import AttemptLedger

    AttemptLedger(attempts_root(cfg, labeling_hash),
                  storage_options(cfg.output, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)).clear()


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


def run_record(cfg: RunConfig, summary: RunSummary, *, status: str, exit_code: int, started_at: datetime,
               error: str | None = None) -> dict:
    """What `OUT/_framescribe/run-<run_id>.json` holds: outcome, when, what was labeled with what, counts."""
    from pipeline.decode import SamplingSpec

    return {**asdict(summary), "videos_per_s": summary.videos_per_s,  # the counts, as the summary table
            "status": status, "exit_code": exit_code, "error": error, "started_at": started_at.isoformat(),
            "finished_at": datetime.now(timezone.utc).isoformat(),
            "input": cfg.input, "model": cfg.model, "model_revision": cfg.model_revision, "task": cfg.task,
            "pruning": {k: getattr(cfg, k) for k in (
                "pruner", "retention", "iwp_lambda", "iwp_temperature", "iwp_floor", "iwp_chunking",
                "iwp_head_agg", "iwp_selection", "iwp_chunk_budget", "iwp_layer", "compensation", "compensation_assignment", "max_residual",
                "max_retention", "seed")},
            "labeling_inputs": cfg.labeling_inputs(), "schema_version": SCHEMA_VERSION,
            "pipeline_version": __version__,
            # the sampling lets `framescribe report` decode the very frames the model saw
            "sampling": asdict(SamplingSpec.from_config(cfg)), "decode_timeout_s": cfg.decode_timeout_s}


def write_state(cfg: RunConfig, record: dict) -> None:
    out = Location.resolve(cfg.output, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)
    out.fs.makedirs(out.path(STATE_DIR), exist_ok=True)
    out.fs.pipe_file(out.path(STATE_DIR, f"run-{record['run_id']}.json"),
                     json.dumps(record, indent=2, default=str).encode())


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


def _label(cfg: RunConfig, plan: RunPlan, run_id: str, labeling_hash: str, console, address: str | None) -> None:
    """The Ray part of a run: the dataset is written while a progress display follows it."""
    import ray

    from pipeline.progress import ProgressCounter, ProgressDisplay
    from pipeline.sink import AtomicParquetSink

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False if address == "local" else None,
                 log_to_driver=cfg.verbose)
    ray.data.DataContext.get_current().enable_progress_bars = cfg.verbose
    clear_attempts(cfg, labeling_hash)  # crashes of an earlier (killed) run do not count against this one
    counter = ray.remote(num_cpus=0)(ProgressCounter).remote()
    ds = build_dataset(cfg, plan.todo, run_id, labeling_hash, plan.run_attempts, progress_counter=counter)
    prompts = {len(v.prompts) for v in plan.todo}
    unit = "videos" if prompts == {1} else "labels (video x prompt)"
    with ProgressDisplay(lambda: ray.get(counter.get.remote(), timeout=5), plan.rows_todo, unit,
                         stream=console.console, live=console.is_tty and not cfg.verbose):
        ds.write_datasink(AtomicParquetSink(cfg.output, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon,
                                            checkpoint_rows=min(cfg.part_rows, CHECKPOINT_ROWS)))
    ray.kill(counter)
    clear_attempts(cfg, labeling_hash)


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


def run_pipeline(cfg: RunConfig, *, inputs: list[VideoInput] | None = None, lease=None, log=print,
                 empty_ok: bool = False) -> RunSummary | RunPlan:
    """Run a labeling job end to end; returns the summary (raises ConfigError before any Ray work).
    With `dry_run`, returns the `RunPlan` and labels nothing (no lease, nothing written).

    The run holds the output's lease from before its first write to after its last: pass `lease` when the
    caller already holds it (jobs.incremental); else it is taken here (LeaseHeld when another run has it).
    `empty_ok`: an input with no videos is nothing to do (the incremental job) instead of a config error.
    """
    import ray

    from pipeline.cluster import resolve_address

    t0, started_at = time.perf_counter(), datetime.now(timezone.utc)
    address = None if ray.is_initialized() else resolve_address(cfg.address)  # fails fast, before any work
    cfg, discovered = preflight(cfg, empty_ok=empty_ok)
    inputs = discovered if inputs is None else inputs
    if cfg.dry_run:
        return plan_run(cfg, inputs)
    if lease is not None:
        return _run_held(cfg, inputs, t0, started_at, address)
    with ExitStack() as held:
        try:
            held.enter_context(output_lease(cfg, log=log))
        except OSError as e:  # the output cannot hold a lease (permissions, store down): fix it locally
            raise ConfigError(f"output: cannot take the lease on {cfg.output!r}: {type(e).__name__}: {e}") from None
        return _run_held(cfg, inputs, t0, started_at, address)


def _run_held(cfg: RunConfig, inputs: list[VideoInput], t0: float, started_at: datetime,
              address: str | None) -> RunSummary:
    """Under the lease: prepare the output, label, record how the run ended in run-<run_id>.json."""
    from pipeline.progress import ConsoleRoute

    run_id = cfg.run_id or started_at.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    labeling_hash = cfg.labeling_hash()
    plan = plan_run(cfg, inputs)
    index, out = plan.index, plan.index.loc
    partial = RunSummary(run_id=run_id, output=cfg.output, labeling_hash=labeling_hash,
                         other_configs=plan.other_configs, notices=plan.notices)
    log_path = log_path_for(cfg, out, run_id)
    log_file = ""
    try:
        if plan.todo:  # a run with nothing to do starts no Ray
            try:
                with ConsoleRoute(log_path, verbose=cfg.verbose) as console:
                    _label(cfg, plan, run_id, labeling_hash, console, address)
            finally:
                log_file = _keep_log(out, log_path)
            index.refresh()  # one more listing: only the parts this run wrote are read
        report = _compact(cfg, index, before_run=False)  # retried tasks, --retry-errors: one row per key
        skipped = plan.n_videos - (plan.limited_from or len(plan.todo))  # --limit leaves the rest to do, not skipped
        summary = summarize(cfg, index, run_id, labeling_hash, plan.n_videos, skipped, time.perf_counter() - t0)
    except BaseException as e:  # the record says how the run ended, then the error goes on
        interrupted = isinstance(e, KeyboardInterrupt)
        partial.seconds, partial.log_file = time.perf_counter() - t0, log_file
        try:
            write_state(cfg, run_record(cfg, partial, status="interrupted" if interrupted else "failed",
                                        exit_code=130 if interrupted else 1, started_at=started_at,
                                        error=f"{type(e).__name__}: {e}"))
        except Exception:
            pass
        raise
    summary.duplicates_removed = plan.duplicates_removed + report.duplicates_removed
    summary.log_file = log_file
    summary.other_configs, summary.notices = plan.other_configs, plan.notices
    exceeded = summary.error_ratio > cfg.max_error_ratio
    write_state(cfg, run_record(cfg, summary, status="error_ratio_exceeded" if exceeded else "ok",
                                exit_code=3 if exceeded else 0, started_at=started_at))
    if exceeded:
        raise ErrorRatioExceeded(summary, cfg.max_error_ratio)
    return summary
