"""One typed config for a labeling run: the CLI flags and the YAML file are views of `RunConfig`."""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import posixpath
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from iwp.registry import PRUNERS, default_compensation

DEFAULT_CAPTION_PROMPT = "Describe this video."


class ConfigError(ValueError):
    """Bad configuration: the message names the field and the reason."""


def canonical_location(value: str) -> str:
    """One spelling per place: URLs without `./`, `//` or a trailing slash; local paths absolute and normalised
    (a relative path is taken from the current folder)."""
    if "://" in value and not value.startswith("file://"):
        scheme, rest = value.split("://", 1)
        rest = posixpath.normpath(rest) if rest.strip("/") else rest
        return f"{scheme}://{rest.strip('/') if rest.strip('/') else rest}"
    return os.path.abspath(os.path.expanduser(value.removeprefix("file://")))


def is_local_path_like(value: str) -> bool:
    """A model reference that names a local folder rather than a hub id."""
    return value.startswith(("/", "./", "../", "~", "file://")) or Path(value.rstrip("/")).exists()


def canonical_model(value: str) -> str:
    """A local model folder by its absolute path; a hub id or URL in one spelling (no trailing slash)."""
    if "://" in value and not value.startswith("file://"):
        return canonical_location(value)
    return canonical_location(value) if is_local_path_like(value) else value.strip("/")


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # what to label and where the rows go
    input: str = Field(description="directory (recursive), glob, s3://prefix, or manifest .txt/.jsonl/.parquet")
    output: str = Field(description="output directory or s3://prefix for the Parquet dataset")
    model: str = Field(description="Hugging Face hub id, local model directory, or s3:// prefix")
    model_revision: Optional[str] = Field(None, description="hub revision (branch, tag or commit) of the model")
    trust_remote_code: bool = Field(False, description="allow the model's own Python code from the hub")
    task: Literal["caption", "qa"] = Field("caption", description="caption: one prompt per video; qa: questions")
    prompt: Optional[str] = Field(None, description="the caption prompt, or one extra question for qa "
                                                    f"(caption default: {DEFAULT_CAPTION_PROMPT!r})")
    questions: Optional[str] = Field(None, description="file with one question per line (.txt) or "
                                                       "{id?, question} per line (.jsonl; id becomes prompt_id)")

    # frame sampling, decided before decode so memory stays bounded
    num_frames: Optional[int] = Field(8, ge=1, le=1024, description="frames per video, evenly spaced (unused with --fps)")
    fps: Optional[float] = Field(None, gt=0, description="sample this many frames per second instead of --num-frames")
    max_frames: int = Field(32, ge=1, le=1024, description="cap on frames per video with --fps")
    start: Optional[float] = Field(None, ge=0, description="clip start in seconds")
    end: Optional[float] = Field(None, gt=0, description="clip end in seconds")
    max_pixels: int = Field(224 * 224, ge=28 * 28, description="pixel budget per frame; frames are resized to fit it right after decode")
    decode_timeout_s: float = Field(120.0, gt=0, description="seconds one video may take to decode (else an error row)")

    # model / generation
    batch_size: int = Field(4, ge=1, description="videos per model batch")
    max_new_tokens: int = Field(64, ge=1, description="longest answer, in tokens (greedy decoding)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="model weights' dtype")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the model runs (auto: cuda when the actor has a GPU)")

    # decode loop: the same tokens either way (tests/test_static_decode.py), so none of these is in the labeling hash
    decode_loop: Literal["dynamic", "static"] = Field(
        "dynamic", description="greedy decoding over a growing cache (dynamic) or a static KV cache with masks "
                               "and positions allocated once, the loop made for GPUs (static; docs/benchmarks.md)")
    compile_decode: bool = Field(False, description="with decode_loop static: compile the decoding step "
                                 "(torch.compile; CUDA graphs on a GPU); the first batch of each shape compiles")
    eos_check_every: int = Field(8, ge=1, description="with decode_loop static: decoding steps between checks "
                                 "whether every answer has ended (the loop's only host synchronisation)")

    # vision skip: a temporal group whose frames repeat the last encoded group reuses its embeddings
    vision_skip: bool = Field(False, description="skip the vision tower on temporal groups that repeat an earlier one "
                              "(off by default: why, and its quality run, in docs/benchmarks.md)")
    vision_skip_threshold: float = Field(1.0, ge=0, description="mean absolute pixel difference (0-255, ~32 px "
                                         "copy) at or below which a group counts as a repeat (= actors.vision_skip)")

    # pruning
    pruner: str = Field("none", description="visual-token pruner (none keeps every token)",
                        json_schema_extra={"choices": PRUNERS})
    retention: float = Field(1.0, gt=0, le=1, description="fraction of visual tokens kept, ceil(R*N)")
    iwp_lambda: float = Field(0.3, ge=0, le=1, description="IWP: weight of duplication against magnitude")  # = iwp.IWPSettings defaults (tests check they agree)
    iwp_temperature: float = Field(1.0, gt=0, description="IWP: key-kernel temperature")
    iwp_floor: float = Field(1.0, ge=0, le=1, description="IWP: share of the budget spread evenly over chunks")
    iwp_chunking: Literal["temporal", "fixed"] = Field("temporal", description="IWP: chunks per temporal token group or fixed size")
    iwp_head_agg: Literal["mean", "frobenius"] = Field("mean", description="IWP: how attention heads are combined")
    iwp_selection: Literal["pcmmr", "cover"] = Field("cover", description="IWP: inside a temporal group, pick by "
                                                     "magnitude − duplication (pcmmr) or by coverage gain (cover)")
    iwp_chunk_budget: Literal["floor", "novelty", "size", "global"] = Field(
        "novelty", description="IWP: split the budget over temporal groups: floor + global rest, ∝ novelty, ∝ size, "
                             "or no groups")
    iwp_layer: int = Field(0, ge=0, description="IWP: decoder layer whose keys/values score tokens (only 0)")
    compensation: Literal["auto", "none", "bias", "merge", "bias+merge"] = Field(
        "auto", description="give kept visual tokens the attention mass of the pruned tokens they stand for: "
                            "bias = log-count attention bias, merge = size-weighted mean embedding; auto = the "
                            "pruner's default (bias for iwp, none for the others)")
    compensation_assignment: Literal["global", "chunk"] = Field(
        "global", description="pruned tokens go to the most duplicated kept token of the whole video or of their temporal chunk")
    max_residual: Optional[float] = Field(None, gt=0, description="IWP quality guard: raise retention until the residual is below this")
    max_retention: float = Field(1.0, gt=0, le=1, description="highest retention the quality guard may use")
    seed: int = Field(0, description="seed of the random pruner and IWP tie-breaks")

    # cluster
    address: Optional[str] = Field(None, description="Ray cluster address (default: a local Ray)")
    num_gpus_per_actor: Optional[float] = Field(None, ge=0, description="GPUs per model actor (default: 1 when the cluster has GPUs, else 0)")
    concurrency: int = Field(1, ge=1, description="model actors")
    decode_concurrency: Optional[int] = Field(None, ge=1, description="parallel decode tasks (default: Ray decides)")
    decode_memory_mb: int = Field(1024, ge=64, description="memory (MiB) each decode task reserves on its node, so large videos cannot oversubscribe it")
    model_retries: int = Field(2, ge=1, description="retries of a batch whose model actor died; a video in that many crashed attempts becomes a model_crash row")

    # run behaviour
    max_error_ratio: float = Field(1.0, ge=0, le=1, description="exit 3 when more than this fraction of videos failed")
    overwrite: bool = Field(False, description="remove framescribe's parts from the output first (other files stay)")
    retry_errors: bool = Field(False, description="redo error rows of this labeling config")
    max_run_attempts: int = Field(3, ge=1, description="runs that try a (video, prompt) whose error is retryable (storage, timeout); later runs retry such rows by themselves until then")
    run_id: Optional[str] = Field(None, description="id of this run (default: time + random suffix)")
    part_rows: int = Field(50_000, ge=1, description="target rows per output Parquet part; smaller parts are merged at the end of a run")
    dry_run: bool = Field(False, description="print the plan (found, already labeled, to do, time estimate) and label nothing")
    limit: Optional[int] = Field(None, ge=1, description="label only the first N videos still to do (a pilot run)")
    verbose: bool = Field(False, description="show Ray's own logs on the console (else they go to the run's log file)")
    s3_endpoint: Optional[str] = Field(None, description="S3-compatible endpoint URL (else AWS_ENDPOINT_URL / AWS config)")
    anon: bool = Field(False, description="anonymous object-store access")

    # one writer per output: the lease OUT/_framescribe/lease.json (pipeline/lease.py)
    lease_ttl: float = Field(600.0, ge=1, description="seconds the output's lease lasts without renewal (renewed every "
                             "ttl/3); after a crash on another machine the next run waits at most this long")
    wait_lease: bool = Field(False, description="when another run holds the output's lease, wait for it instead of "
                             "exiting (code 4; a scheduled incremental run exits 0)")
    wait_timeout: Optional[float] = Field(None, gt=0, description="with wait_lease: give up after this many seconds")

    @field_validator("pruner")
    @classmethod
    def _known_pruner(cls, v: str) -> str:
        if v not in PRUNERS:
            raise ValueError(f"unknown pruner {v!r}; choose one of {', '.join(PRUNERS)}")
        return v

    @field_validator("iwp_layer")
    @classmethod
    def _layer_zero_only(cls, v: int) -> int:
        if v != 0:  # a deeper layer needs the full sequence through the earlier layers
            raise ValueError("only layer 0 is implemented (keys/values of deeper layers need the full sequence)")
        return v

    @field_validator("input", "output", "model")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be greater than start ({self.start})")
        if self.pruner == "none" and self.retention != 1.0:
            raise ValueError("retention < 1 needs a pruner (--pruner iwp, random, ...); pruner 'none' keeps every token")
        if self.compensation == "auto":  # resolved once, so rows, hash and run record name what ran
            self.compensation = default_compensation(self.pruner)
        if self.compensation != "none" and self.pruner == "none":
            raise ValueError("compensation needs a pruner (--pruner iwp, dycoke, ...); pruner 'none' drops nothing")
        if self.compile_decode and self.decode_loop != "static":
            raise ValueError("compile_decode needs decode_loop 'static' (the dynamic loop changes shapes every step)")
        if self.max_residual is not None and not self.pruner.startswith("iwp"):
            raise ValueError("max_residual (quality guard) needs an iwp pruner")
        if self.max_retention < self.retention:
            raise ValueError(f"max_retention ({self.max_retention}) must be >= retention ({self.retention})")
        if self.task == "qa" and not self.questions and not self.prompt:
            if not self.input.endswith(".jsonl"):  # a .jsonl manifest may carry per-video questions
                raise ValueError("task 'qa' needs --questions FILE or --prompt (or per-video questions in a .jsonl manifest)")
        return self

    # --- derived ---
    def skip_threshold(self) -> float | None:
        """The vision-skip threshold the model actor uses, None when the skip is off."""
        return self.vision_skip_threshold if self.vision_skip else None

    def labeling_inputs(self) -> dict[str, Any]:
        """What the labeling hash covers (README "Versioning"): every option that changes a row's text,
        in one spelling. The prompt itself is the row's `prompt_id`, so --prompt/--questions are not here
        (adding a question adds rows, it does not redo the others); `num_frames` counts only without
        `fps` and `max_frames` only with it (the sampler reads one or the other)."""
        fps_mode = self.fps is not None
        return {"hash_version": HASH_VERSION, "model": canonical_model(self.model),
                "model_revision": self.model_revision, "task": self.task,
                "num_frames": None if fps_mode else self.num_frames, "fps": self.fps,
                "max_frames": self.max_frames if fps_mode else None, "start": self.start, "end": self.end,
                "max_pixels": self.max_pixels, "max_new_tokens": self.max_new_tokens, "pruner": self.pruner,
                "retention": self.retention, "iwp_lambda": self.iwp_lambda, "iwp_temperature": self.iwp_temperature,
                # only IWP selection reads the floor: other pruners hash the value their v2 rows carry (the
                # default before issue 13 moved it to 1.0), so their finished outputs stay done
                "iwp_floor": self.iwp_floor if self.pruner.startswith("iwp") else LEGACY_DEFAULTS["iwp_floor"],
                "iwp_chunking": self.iwp_chunking, "iwp_head_agg": self.iwp_head_agg,
                # only for IWP pruners (the others' hashes stay as they were before these knobs existed)
                **({"iwp_selection": self.iwp_selection, "iwp_chunk_budget": self.iwp_chunk_budget}
                   if self.pruner.startswith("iwp") else {}),
                "iwp_layer": self.iwp_layer, "compensation": self.compensation,
                "compensation_assignment": self.compensation_assignment, "max_residual": self.max_residual,
                "max_retention": self.max_retention, "seed": self.seed, "dtype": self.dtype,
                # only while the skip is on (off: the frames the tower sees are exactly the unskipped ones)
                **({"vision_skip_threshold": self.vision_skip_threshold} if self.vision_skip else {})}

    def labeling_hash(self) -> str:
        """Hash of everything that changes a row's text, normalised: resume skips rows with the same hash."""
        return hashlib.sha256(json.dumps(self.labeling_inputs(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def legacy_labeling_hash(self) -> str:
        """The hash framescribe 0.1.0 gave this config as spelled (rows of schema version 1); used only to
        recognise and migrate those rows."""
        keys = ["model", "model_revision", "task", "prompt", "questions", "num_frames", "fps", "max_frames",
                "start", "end", "max_pixels", "max_new_tokens", "pruner", "retention", "iwp_lambda",
                "iwp_temperature", "iwp_floor", "iwp_chunking", "iwp_head_agg", "iwp_layer", "max_residual",
                "max_retention", "seed", "dtype"]
        payload = {k: LEGACY_DEFAULTS[k] if k in LEGACY_DEFAULTS and k not in self.model_fields_set else getattr(self, k)
                   for k in keys}  # a field left unset had 0.1.0's default then
        if self.questions and Path(self.questions).is_file():
            payload["questions_sha"] = hashlib.sha256(Path(self.questions).read_bytes()).hexdigest()
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


LEGACY_DEFAULTS = {"iwp_floor": 0.25}  # 0.1.0 defaults of fields whose default has changed since
HASH_VERSION = 2  # bumped whenever labeling_inputs() changes meaning (README "Versioning")
PATH_FIELDS = ("input", "output", "questions")  # in a YAML file, relative to the file's folder


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(field, list(RunConfig.model_fields), n=1, cutoff=0.6)
            msg = f"unknown option{f'; did you mean {close[0]!r}?' if close else ''}"
        lines.append(f"{field}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e.get("input"), dict) else ""))
    return "invalid config: " + "; ".join(lines)


def load_config(path: str | Path | None = None, *, relative_to_file: bool = True, **overrides: Any) -> RunConfig:
    """YAML file (optional) + overrides (CLI flags that were given); raises ConfigError naming the field.

    `relative_to_file`: relative paths in the file are taken from the file's folder (off for `submit`, whose
    paths are read on the cluster, where relative local paths are refused)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config: {p} must be a mapping of option: value")
        data = {str(k).replace("-", "_"): v for k, v in loaded.items()}
        if relative_to_file:
            data = _relative_to_file(data, p.resolve().parent)
    data.update({k: v.value if isinstance(v, Enum) else v for k, v in overrides.items() if v is not None})  # CLI choices are Enums
    try:
        return RunConfig(**data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def _relative_to_file(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Relative local paths in a YAML file name places next to the file, wherever the command runs
    (as manifests do). A model value is rewritten only when that folder exists (else it is a hub id)."""
    out = dict(data)
    for key in (*PATH_FIELDS, "model"):
        v = out.get(key)
        if not isinstance(v, str) or not v.strip() or "://" in v or v.startswith(("/", "~")):
            continue
        if key == "model" and not (folder / v).exists():
            continue
        out[key] = str(folder / v)
    return out
