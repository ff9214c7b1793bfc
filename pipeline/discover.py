"""Input discovery: a directory, glob, object-store prefix or manifest → one `VideoInput` per video."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from pipeline.config import DEFAULT_CAPTION_PROMPT, ConfigError, RunConfig, canonical_location
from pipeline.storage import get_fs, is_remote

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
                    ".flv", ".wmv", ".3gp", ".ogv", ".gif"}
MANIFEST_EXTENSIONS = (".txt", ".jsonl", ".parquet")


@dataclass(slots=True)
class VideoInput:
    """One video of the run and its prompts. Slots and a video id hashed once: a million of these are
    ~300 MiB of driver memory (see docs/benchmarks.md, bench scale)."""
    uri: str                                                       # canonical (see `canonical_location`)
    prompts: list[tuple[str, str]] = field(default_factory=list)  # (prompt_id, prompt)
    key: str | None = None  # what identifies the video (`video_key`); the uri when not given
    reference: str | None = None  # a manifest's `reference` (e.g. a ground-truth caption), copied into the rows
    video_id: str = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self.video_id = video_id_for(self.key or self.uri)



def jsonl_objects(text: str, where: str):
    """(line number, parsed object) for each non-blank line of a .jsonl text; a bad line is a ConfigError
    naming `where` and the line."""
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where} line {i} is not JSON: {e}") from None

def video_id_for(key: str) -> str:
    """Stable id of a video: the hash of its key (same file, same id across runs and machines)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]


def video_key(uri: str, root: str | None) -> str:
    """What identifies a video: a local file by its path relative to the input root (a corpus mounted at
    another path keeps its labels), anything else (object storage, files outside the root) by its
    canonical URI."""
    if root and uri.startswith(root.rstrip("/") + "/"):
        return uri[len(root.rstrip("/")) + 1:]
    return uri


def input_root(cfg_input: str) -> str | None:
    """The folder local video keys are relative to: the input directory, a glob's fixed leading folder,
    a manifest's or a single file's folder. None for object storage (keys are whole URIs)."""
    if is_remote(cfg_input):
        return None
    path = canonical_location(cfg_input)
    if any(c in cfg_input for c in "*?["):
        fixed = []
        for part in path.split("/"):
            if any(c in part for c in "*?["):
                break
            fixed.append(part)
        return "/".join(fixed) or "/"
    from pathlib import Path

    return path if Path(path).is_dir() else str(Path(path).parent)


def prompt_id_for(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]


def _with_protocol(fs, path: str, original: str) -> str:
    if "://" in original and not original.startswith("file://"):
        protocol = original.split("://", 1)[0]
        return f"{protocol}://{path}"
    return path


def _is_video(path: str) -> bool:
    return PurePosixPath(path).suffix.lower() in VIDEO_EXTENSIONS


def load_questions(path: str, cfg: RunConfig) -> list[str | tuple[str, str]]:
    """Questions of a .txt (one per line, # comments) or .jsonl file ({"question": ..., "id"?: ...} per line;
    the id becomes the rows' prompt_id). A bad line fails fast naming the file, the line and the field."""
    fs, p = get_fs(path, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)
    if not fs.exists(p):
        raise ConfigError(f"questions: file {path!r} does not exist")
    try:
        text = fs.cat_file(p).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"questions: {path} is not UTF-8 text: {e}") from None
    if path.endswith(".jsonl"):
        out = []
        for i, obj in jsonl_objects(text, f"questions: {path}"):
            if isinstance(obj, str) and obj.strip():
                out.append(obj)
                continue
            if not isinstance(obj, dict):
                raise ConfigError(f"questions: {path} line {i}: expected an object "
                                  f'{{"question": ..., "id": ...}} or a string, got {type(obj).__name__}')
            q = obj.get("question")
            if not isinstance(q, str) or not q.strip():
                raise ConfigError(f"questions: {path} line {i}: field 'question' is missing or empty "
                                  f"(keys: {', '.join(map(str, obj)) or 'none'})")
            qid = obj.get("id")
            if qid is not None and (isinstance(qid, (dict, list, bool)) or not str(qid).strip()):
                raise ConfigError(f"questions: {path} line {i}: field 'id' must be a string or number, got {qid!r}")
            out.append((str(qid), q) if qid is not None else q)
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


def _prompt_pairs(prompts: list) -> list[tuple[str, str]]:
    seen, out = {}, []
    for p in prompts:
        pid, text = p if isinstance(p, tuple) else (prompt_id_for(p), p)
        if pid in seen:  # the same question twice would give two rows with one key
            if seen[pid] != text:
                raise ConfigError(f"questions: id {pid!r} names two questions ({seen[pid]!r} and {text!r})")
            continue
        seen[pid] = text
        out.append((pid, text))
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
        for i, obj in jsonl_objects(text, f"input: manifest {cfg.input}"):
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


def canonical_uri(uri: str, manifest: str | None = None) -> str:
    """The one spelling of a video's location that rows store: a manifest entry relative to the manifest's
    folder, then `canonical_location` (no `./`, absolute local paths)."""
    if manifest is not None and "://" not in uri and not uri.startswith(("/", "~")):
        uri = resolve_relative(uri, canonical_location(manifest))
    return canonical_location(uri)


def discover_inputs(cfg: RunConfig) -> list[VideoInput]:
    """All videos the run covers, in a stable order, each with its prompts. Missing manifest entries stay in."""
    fs, path = get_fs(cfg.input, s3_endpoint=cfg.s3_endpoint, anon=cfg.anon)
    prompts = default_prompts(cfg)
    root = input_root(cfg.input)
    try:
        is_manifest = path.endswith(MANIFEST_EXTENSIONS) and fs.isfile(path)
        if is_manifest:
            inputs = []
            shared = _prompt_pairs(prompts)  # rows without prompts of their own share one list (never mutated)
            for row in _manifest_rows(cfg, fs, path):
                uri = canonical_uri(str(row["uri"]), cfg.input)
                if len(row) == 1:
                    inputs.append(VideoInput(uri, shared, video_key(uri, root)))
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
                inputs.append(VideoInput(uri, _prompt_pairs(own), video_key(uri, root),
                                         reference=None if reference is None else str(reference)))
        elif any(c in path for c in "*?["):
            shared = _prompt_pairs(prompts)
            uris = [canonical_location(_with_protocol(fs, p, cfg.input))
                    for p, info in sorted(fs.glob(path, detail=True).items()) if info.get("type") == "file"]
            inputs = [VideoInput(u, shared, video_key(u, root)) for u in uris]
        elif fs.isdir(path):
            shared = _prompt_pairs(prompts)
            uris = [canonical_location(_with_protocol(fs, p, cfg.input)) for p in sorted(fs.find(path)) if _is_video(p)]
            inputs = [VideoInput(u, shared, video_key(u, root)) for u in uris]
        elif fs.isfile(path):
            uri = canonical_location(cfg.input if "://" in cfg.input else path)
            inputs = [VideoInput(uri, _prompt_pairs(prompts), video_key(uri, root))]
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
