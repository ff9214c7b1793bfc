"""Input discovery: a directory, glob, object-store prefix or manifest → one `VideoInput` per video."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from pipeline.config import DEFAULT_CAPTION_PROMPT, ConfigError, RunConfig
from pipeline.storage import get_fs

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
                    ".flv", ".wmv", ".3gp", ".ogv", ".gif"}
MANIFEST_EXTENSIONS = (".txt", ".jsonl", ".parquet")


@dataclass(slots=True)
class VideoInput:
    """One video of the run and its prompts. Slots and a video id hashed once: a million of these are
    ~300 MiB of driver memory (see docs/benchmarks.md, bench scale)."""
    uri: str
    prompts: list[tuple[str, str]] = field(default_factory=list)  # (prompt_id, prompt)
    reference: str | None = None  # a manifest's `reference` (e.g. a ground-truth caption), copied into the rows
    video_id: str = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self.video_id = video_id_for(self.uri)


def video_id_for(uri: str) -> str:
    """Stable id of a video: the hash of its URI (same file, same id across runs and machines)."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:20]


def prompt_id_for(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]


def _with_protocol(fs, path: str, original: str) -> str:
    if "://" in original and not original.startswith("file://"):
        protocol = original.split("://", 1)[0]
        return f"{protocol}://{path}"
    return path


def _is_video(path: str) -> bool:
    return PurePosixPath(path).suffix.lower() in VIDEO_EXTENSIONS


def load_questions(path: str, cfg: RunConfig) -> list[str]:
    fs, p = get_fs(path, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)
    if not fs.exists(p):
        raise ConfigError(f"questions: file {path!r} does not exist")
    text = fs.cat_file(p).decode("utf-8")
    if path.endswith(".jsonl"):
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"questions: {path} line {i} is not JSON: {e}") from None
                out.append(obj["question"] if isinstance(obj, dict) else str(obj))
        return out
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def default_prompts(cfg: RunConfig) -> list[str]:
    prompts: list[str] = []
    if cfg.task == "caption":
        prompts = [cfg.prompt or DEFAULT_CAPTION_PROMPT]
    else:
        if cfg.prompt:
            prompts.append(cfg.prompt)
        if cfg.questions:
            prompts += load_questions(cfg.questions, cfg)
    return prompts


def _prompt_pairs(prompts: list[str]) -> list[tuple[str, str]]:
    seen, out = set(), []
    for p in prompts:
        if p not in seen:  # the same question twice would give two rows with one key
            seen.add(p)
            out.append((prompt_id_for(p), p))
    return out


def _manifest_rows(cfg: RunConfig, fs, path: str) -> list[dict]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        if "uri" not in table.column_names:
            raise ConfigError(f"input: manifest {cfg.input} has no 'uri' column (columns: {table.column_names})")
        return table.to_pylist()
    text = fs.cat_file(path).decode("utf-8")
    if path.endswith(".jsonl"):
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"input: manifest {cfg.input} line {i} is not JSON: {e}") from None
            if not isinstance(obj, dict) or not obj.get("uri"):
                raise ConfigError(f"input: manifest {cfg.input} line {i} has no 'uri'")
            rows.append(obj)
        return rows
    return [{"uri": ln.strip()} for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def resolve_relative(uri: str, manifest: str) -> str:
    if "://" in uri or uri.startswith("/"):
        return uri
    base = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
    return f"{base}/{uri}"


def discover_inputs(cfg: RunConfig) -> list[VideoInput]:
    """All videos the run covers, in a stable order, each with its prompts. Missing manifest entries stay in."""
    fs, path = get_fs(cfg.input, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)
    prompts = default_prompts(cfg)
    try:
        is_manifest = path.endswith(MANIFEST_EXTENSIONS) and fs.isfile(path)
        if is_manifest:
            inputs = []
            shared = _prompt_pairs(prompts)  # rows without prompts of their own share one list (never mutated)
            for row in _manifest_rows(cfg, fs, path):
                uri = resolve_relative(str(row["uri"]), cfg.input)
                if len(row) == 1:
                    inputs.append(VideoInput(uri, shared))
                    continue
                own = list(prompts)
                if row.get("prompt"):
                    own = [row["prompt"]] if cfg.task == "caption" else own + [row["prompt"]]
                if row.get("questions"):
                    qs = row["questions"]
                    own += [qs] if isinstance(qs, str) else list(qs)
                if row.get("question"):
                    own.append(row["question"])
                reference = row.get("reference")
                inputs.append(VideoInput(uri, _prompt_pairs(own), None if reference is None else str(reference)))
        elif any(c in path for c in "*?["):
            shared = _prompt_pairs(prompts)
            inputs = [VideoInput(_with_protocol(fs, p, cfg.input), shared)
                      for p, info in sorted(fs.glob(path, detail=True).items()) if info.get("type") == "file"]
        elif fs.isdir(path):
            shared = _prompt_pairs(prompts)
            inputs = [VideoInput(_with_protocol(fs, p, cfg.input), shared) for p in sorted(fs.find(path))
                      if _is_video(p)]
        elif fs.isfile(path):
            inputs = [VideoInput(cfg.input if "://" in cfg.input else path, _prompt_pairs(prompts))]
        else:
            raise ConfigError(f"input: {cfg.input!r} does not exist (expected a directory, glob, s3:// prefix or manifest)")
    except ConfigError:
        raise
    except Exception as e:  # credentials, endpoint, permissions: fail before any cluster work
        raise ConfigError(f"input: cannot list {cfg.input!r}: {type(e).__name__}: {e}") from None
    empty = [v.uri for v in inputs if not v.prompts]
    if empty:
        raise ConfigError(f"questions: no prompt for {len(empty)} video(s), e.g. {empty[0]!r}; "
                          f"give --prompt, --questions or per-video questions")
    return inputs
