"""One typed config for a labeling run: the CLI flags and the YAML file are views of `RunConfig`."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from iwp.registry import PRUNERS

DEFAULT_CAPTION_PROMPT = "Describe this video."


class ConfigError(ValueError):
    """Bad configuration: the message names the field and the reason."""


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # what to label and where the rows go
    input: str = Field(description="directory (recursive), glob, s3://prefix, or manifest .txt/.jsonl/.parquet")
    output: str = Field(description="output directory or s3://prefix for the Parquet dataset")
    model: str = Field(description="Hugging Face hub id, local model directory, or s3:// prefix")
    model_revision: Optional[str] = None
    trust_remote_code: bool = False
    task: Literal["caption", "qa"] = "caption"
    prompt: Optional[str] = None
    questions: Optional[str] = Field(None, description="file with one question per line (.txt) or {id?, question} per line (.jsonl)")

    # frame sampling, decided before decode so memory stays bounded
    num_frames: Optional[int] = Field(8, ge=1, le=1024)
    fps: Optional[float] = Field(None, gt=0)
    max_frames: int = Field(32, ge=1, le=1024)
    start: Optional[float] = Field(None, ge=0)
    end: Optional[float] = Field(None, gt=0)
    max_pixels: int = Field(224 * 224, ge=28 * 28, description="pixel budget per frame; frames are resized to fit it right after decode")
    decode_timeout_s: float = Field(120.0, gt=0)

    # model / generation
    batch_size: int = Field(4, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # pruning
    pruner: str = "none"
    retention: float = Field(1.0, gt=0, le=1)
    iwp_lambda: float = Field(0.3, ge=0, le=1)  # = iwp.IWPSettings defaults (tests check they agree)
    iwp_temperature: float = Field(1.0, gt=0)
    iwp_floor: float = Field(0.25, ge=0, le=1)
    iwp_chunking: Literal["temporal", "fixed"] = "temporal"
    iwp_head_agg: Literal["mean", "frobenius"] = "mean"
    iwp_layer: int = Field(0, ge=0)
    compensation: Literal["none", "bias", "merge", "bias+merge"] = Field(
        "none", description="give kept visual tokens the attention mass of the pruned tokens they stand for: "
                            "bias = log-count attention bias, merge = size-weighted mean embedding")
    compensation_assignment: Literal["global", "chunk"] = Field(
        "global", description="pruned tokens go to the most duplicated kept token of the whole video or of their temporal chunk")
    max_residual: Optional[float] = Field(None, gt=0)
    max_retention: float = Field(1.0, gt=0, le=1)
    seed: int = 0

    # cluster
    address: Optional[str] = None
    num_gpus_per_actor: Optional[float] = Field(None, ge=0, description="default: 1 when the cluster has GPUs, else 0")
    concurrency: int = Field(1, ge=1, description="model actors")
    decode_concurrency: Optional[int] = Field(None, ge=1, description="parallel decode tasks (default: Ray decides)")

    # run behaviour
    max_error_ratio: float = Field(1.0, ge=0, le=1)
    overwrite: bool = False
    retry_errors: bool = False
    run_id: Optional[str] = None
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
        if self.compensation != "none" and self.pruner == "none":
            raise ValueError("compensation needs a pruner (--pruner iwp, dycoke, ...); pruner 'none' drops nothing")
        if self.max_residual is not None and not self.pruner.startswith("iwp"):
            raise ValueError("max_residual (quality guard) needs an iwp pruner")
        if self.max_retention < self.retention:
            raise ValueError(f"max_retention ({self.max_retention}) must be >= retention ({self.retention})")
        if self.task == "qa" and not self.questions and not self.prompt:
            if not self.input.endswith(".jsonl"):  # a .jsonl manifest may carry per-video questions
                raise ValueError("task 'qa' needs --questions FILE or --prompt (or per-video questions in a .jsonl manifest)")
        return self

    # --- derived ---
    def labeling_hash(self) -> str:
        """Hash of everything that changes a row's text: resume skips rows with the same hash."""
        keys = ["model", "model_revision", "task", "prompt", "questions", "num_frames", "fps", "max_frames",
                "start", "end", "max_pixels", "max_new_tokens", "pruner", "retention", "iwp_lambda",
                "iwp_temperature", "iwp_floor", "iwp_chunking", "iwp_head_agg", "iwp_layer", "compensation",
                "compensation_assignment", "max_residual",
                "max_retention", "seed", "dtype"]
        payload = {k: getattr(self, k) for k in keys}
        if self.questions and Path(self.questions).is_file():
            payload["questions_sha"] = hashlib.sha256(Path(self.questions).read_bytes()).hexdigest()
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{field}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e.get("input"), dict) else ""))
    return "invalid config: " + "; ".join(lines)


def load_config(path: str | Path | None = None, **overrides: Any) -> RunConfig:
    """YAML file (optional) + overrides (CLI flags that were given); raises ConfigError naming the field."""
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
        data = {k.replace("-", "_"): v for k, v in loaded.items()}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig(**data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None
