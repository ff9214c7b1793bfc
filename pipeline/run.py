"""The Ray Data graph of a labeling run: discover → decode (CPU tasks) → model actors → atomic Parquet parts."""
from __future__ import annotations

import json
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow.compute as pc

from pipeline import __version__
from pipeline.config import ConfigError, RunConfig
from pipeline.discover import VideoInput, discover_inputs
from pipeline.output import STATE_DIR, AtomicParquetSink, compact_duplicates, done_keys, read_rows
from pipeline.storage import check_bucket, get_fs, join, storage_options


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


def prepare_output(cfg: RunConfig) -> set:
    """Under the output's lease: --overwrite clears it; returns the (video, prompt) keys already done."""
    try:
        fs, root = get_fs(cfg.output, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)
        if cfg.overwrite:
            for p in fs.glob(join(root, "*.parquet")) + fs.glob(join(root, "_tmp-*")):
                fs.rm(p)
        fs.makedirs(root, exist_ok=True)
        return set() if cfg.overwrite else done_keys(cfg.output, cfg.labeling_hash(),
                                                     include_errors=not cfg.retry_errors,
                                                     s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"output: cannot use {cfg.output!r}: {type(e).__name__}: {e}") from None


def _gpu_count() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def build_dataset(cfg: RunConfig, todo: list[VideoInput], run_id: str, labeling_hash: str):
    """The lazy Ray Data graph (nothing runs until it is written)."""
    import ray

    from actors.captioner import VideoCaptioner
    from actors.splice import PruneSpec
    from iwp import IWPSettings
    from pipeline.decode import SamplingSpec

    items = [{"video_id": v.video_id, "uri": v.uri, "prompts": json.dumps(v.prompts), "reference": v.reference}
             for v in todo]
    # small blocks early: decode starts at once and a slow file holds back few others
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 2000)))
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
        VideoCaptioner, batch_format="pyarrow", batch_size=cfg.batch_size, concurrency=cfg.concurrency,
        num_gpus=gpus, num_cpus=0 if gpus else 1,
        fn_constructor_kwargs=dict(model=cfg.model, prune=prune, max_new_tokens=cfg.max_new_tokens,
                                   batch_size=cfg.batch_size, revision=cfg.model_revision,
                                   trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype,
                                   device="cuda" if gpus and cfg.device == "auto" else cfg.device,
                                   storage_options=storage_options(cfg.model, s3_endpoint=cfg.s3_endpoint,
                                                                   anon=cfg.anon),
                                   row_defaults=row_defaults, skip_threshold=cfg.skip_threshold()))
    return ds


def summarize(cfg: RunConfig, run_id: str, labeling_hash: str, n_total: int, n_skipped: int,
              seconds: float) -> RunSummary:
    t = read_rows(cfg.output, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon,
                  columns=["video_id", "status", "error_type", "frames_sampled", "visual_tokens_full",
                           "visual_tokens_kept", "run_id", "prompt_id"])
    t = t.filter(pc.equal(t["run_id"], run_id))
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


def write_state(cfg: RunConfig, summary: RunSummary) -> None:
    fs, root = get_fs(cfg.output, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)
    fs.makedirs(join(root, STATE_DIR), exist_ok=True)
    from pipeline.decode import SamplingSpec

    # the sampling lets `framescribe report` decode the very frames the model saw
    payload = {**asdict(summary), "videos_per_s": summary.videos_per_s, "pipeline_version": __version__,
               "finished_at": datetime.now(timezone.utc).isoformat(),
               "sampling": asdict(SamplingSpec.from_config(cfg)), "decode_timeout_s": cfg.decode_timeout_s}
    with fs.open(join(root, STATE_DIR, f"run-{summary.run_id}.json"), "w") as f:
        json.dump(payload, f, indent=2, default=str)


def _compact(cfg: RunConfig, *, before_run: bool) -> int:
    """Compaction of the output (see `compact_duplicates`); returns the number of rows dropped."""
    try:
        return compact_duplicates(cfg.output, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon).duplicates_removed
    except Exception as e:
        if not before_run:
            raise
        raise ConfigError(f"output: cannot compact {cfg.output!r}: {type(e).__name__}: {e}") from None


def output_lease(cfg: RunConfig, log=print):
    """The output's lease as this config asks for it (see pipeline/lease.py)."""
    from pipeline.lease import hold_output_lease, lease_owner

    return hold_output_lease(cfg.output, ttl_s=cfg.lease_ttl, wait=cfg.wait_lease, wait_timeout_s=cfg.wait_timeout,
                             owner=lease_owner(cfg.run_id), s3_endpoint=cfg.s3_endpoint, anon=cfg.anon, log=log)


def run_pipeline(cfg: RunConfig, *, inputs: list[VideoInput] | None = None, lease=None,
                 log=print) -> RunSummary:
    """Run a labeling job end to end; returns the summary (raises ConfigError before any Ray work).

    The run holds the output's lease from before its first write to after its last: pass `lease` when the
    caller already holds it (jobs.incremental); else it is taken here (LeaseHeld when another run has it).
    """
    t0 = time.perf_counter()
    cfg, discovered = preflight(cfg)
    inputs = discovered if inputs is None else inputs
    if lease is not None:
        return _run_held(cfg, inputs, t0)
    with ExitStack() as held:
        try:
            held.enter_context(output_lease(cfg, log=log))
        except OSError as e:  # the output cannot hold a lease (permissions, store down): fix it locally
            raise ConfigError(f"output: cannot take the lease on {cfg.output!r}: {type(e).__name__}: {e}") from None
        return _run_held(cfg, inputs, t0)


def _run_held(cfg: RunConfig, inputs: list[VideoInput], t0: float) -> RunSummary:
    import ray

    run_id = cfg.run_id or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    labeling_hash = cfg.labeling_hash()
    done = prepare_output(cfg)
    # exactly once: heal duplicates a killed run (or a killed compaction) may have left, before Ray starts
    dups = 0 if cfg.overwrite else _compact(cfg, before_run=True)
    todo: dict[str, VideoInput] = {}
    for v in inputs:  # resume: only the (video, prompt) pairs not committed yet for this labeling config
        missing = [(pid, p) for pid, p in v.prompts if (v.video_id, pid) not in done]
        if v.video_id in todo:  # the same URI listed twice (manifest): one row per (video, prompt)
            have = {pid for pid, _ in todo[v.video_id].prompts}
            todo[v.video_id].prompts.extend((pid, p) for pid, p in missing if pid not in have)
        elif missing:
            todo[v.video_id] = VideoInput(v.uri, missing, v.reference)
    todo = list(todo.values())
    if todo:
        if not ray.is_initialized():
            ray.init(address=cfg.address, include_dashboard=False if cfg.address is None else None,
                     log_to_driver=True)
        build_dataset(cfg, todo, run_id, labeling_hash).write_datasink(
            AtomicParquetSink(cfg.output, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon))
        dups += _compact(cfg, before_run=False)  # --retry-errors rows, retried tasks: one row per key
    n_videos = len({v.video_id for v in inputs})  # a URI listed twice is one video
    summary = summarize(cfg, run_id, labeling_hash, n_videos, n_videos - len(todo), time.perf_counter() - t0)
    summary.duplicates_removed = dups
    write_state(cfg, summary)
    if summary.error_ratio > cfg.max_error_ratio:
        raise ErrorRatioExceeded(summary, cfg.max_error_ratio)
    return summary
