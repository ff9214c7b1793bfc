"""Output contract: the Parquet schema, atomic per-block commits, and reading a run's rows back."""
from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from ray.data import Datasink
from ray.data.block import BlockAccessor

from pipeline.storage import get_fs, join, storage_options

OUTPUT_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("uri", pa.string()), ("prompt_id", pa.string()), ("prompt", pa.string()),
    ("text", pa.string()), ("status", pa.string()), ("error_type", pa.string()), ("error_message", pa.string()),
    ("retryable", pa.bool_()), ("run_attempt", pa.int64()),
    ("model", pa.string()), ("model_revision", pa.string()), ("pruner", pa.string()), ("retention", pa.float64()),
    ("compensation", pa.string()),
    ("retention_used", pa.float64()), ("visual_tokens_full", pa.int64()), ("visual_tokens_kept", pa.int64()),
    ("iwp_residual", pa.float64()), ("frames_sampled", pa.int64()), ("frame_timestamps", pa.list_(pa.float64())),
    ("duration_s", pa.float64()), ("fps", pa.float64()), ("width", pa.int64()), ("height", pa.int64()),
    ("decode_ms", pa.float64()), ("decoder", pa.string()), ("vision_ms", pa.float64()),
    ("vision_groups", pa.int64()), ("vision_groups_encoded", pa.int64()), ("prune_ms", pa.float64()),
    ("prefill_ms", pa.float64()), ("generate_ms", pa.float64()), ("new_tokens", pa.int64()),
    ("labeling_hash", pa.string()), ("run_id", pa.string()), ("pipeline_version", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")), ("schema_version", pa.int32()),
    # added later (outputs written before them read back as nulls): what the pruner kept, and the manifest's reference
    ("kept_token_indices", pa.list_(pa.int32())), ("token_grid", pa.list_(pa.int32())), ("reference", pa.string()),
])
STATE_DIR = "_framescribe"  # run summaries; the leading underscore keeps it out of dataset readers
# What identifies a row (video_id, labeling_hash inputs, uri form). 1 = rows written before it was
# recorded (null in the column); 2 = canonical uri, video_id from the path relative to the input root,
# labeling hash over normalised values. README "Versioning" says what an upgrade does to old rows.
SCHEMA_VERSION = 2
# The only files framescribe writes at the top of an output, besides STATE_DIR: everything else is the user's.
PART_RE = re.compile(r"part-[0-9a-f]{24}\.parquet")
TMP_RE = re.compile(r"_tmp-[0-9a-f]{32}\.inprogress")


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def own_parts(fs, root: str) -> list[str]:
    """The Parquet parts framescribe wrote under `root` (by name pattern), sorted."""
    return sorted(p for p in fs.glob(join(root, "part-*.parquet")) if PART_RE.fullmatch(basename(p)))


def own_tmp(fs, root: str) -> list[str]:
    return sorted(p for p in fs.glob(join(root, "_tmp-*.inprogress")) if TMP_RE.fullmatch(basename(p)))


def foreign_parquet(fs, root: str, limit: int = 5) -> list[str]:
    """Parquet files under `root` that framescribe did not write (they would join the dataset of a reader
    such as `read_parquet('OUT/**/*.parquet')`), at most `limit`."""
    found = []
    for p in sorted(fs.find(root)):
        rel = p[len(root.rstrip("/")) + 1:] if p.startswith(root.rstrip("/") + "/") else basename(p)
        if rel.startswith(STATE_DIR + "/") or not rel.lower().endswith(".parquet"):
            continue
        if "/" in rel or not PART_RE.fullmatch(rel):
            found.append(p)
            if len(found) >= limit:
                break
    return found


def conform(table: pa.Table) -> pa.Table:
    """Cast a block to the output schema (missing columns become nulls)."""
    cols = []
    for f in OUTPUT_SCHEMA:
        if f.name in table.column_names:
            cols.append(table.column(f.name).cast(f.type) if table.column(f.name).type != f.type
                        else table.column(f.name))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=OUTPUT_SCHEMA)


def part_name(table: pa.Table) -> str:
    """Deterministic part name from the rows' keys: rewriting the same rows replaces the same object."""
    keys = sorted(zip(table.column("video_id").to_pylist(), table.column("prompt_id").to_pylist(),
                      table.column("labeling_hash").to_pylist()))
    digest = hashlib.sha256(repr(keys).encode()).hexdigest()[:24]
    return f"part-{digest}.parquet"


def write_part(table: pa.Table, output: str, *, s3_endpoint: str | None = None, anon: bool = False) -> str:
    """Write one Parquet part atomically: a temp object first, then a rename to its final name."""
    import pyarrow.parquet as pq

    fs, root = get_fs(output, s3_endpoint=s3_endpoint, anon=anon)
    fs.makedirs(root, exist_ok=True)
    final = join(root, part_name(table))
    tmp = join(root, f"_tmp-{uuid.uuid4().hex}.inprogress")
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f, compression="zstd")
    fs.mv(tmp, final)
    return final


class AtomicParquetSink(Datasink):
    """Ray Data sink: each write task commits its rows as one part; a killed run leaves only whole parts."""

    def __init__(self, output: str, *, s3_endpoint: str | None = None, anon: bool = False):
        self.output, self.s3_endpoint, self.anon = output, s3_endpoint, anon

    def write(self, blocks: Iterable, ctx) -> list[str]:
        tables = [conform(BlockAccessor.for_block(b).to_arrow()) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        return [write_part(pa.concat_tables(tables), self.output, s3_endpoint=self.s3_endpoint, anon=self.anon)]


def read_rows(output: str, *, columns: list[str] | None = None, s3_endpoint: str | None = None,
              anon: bool = False, filter: pc.Expression | None = None) -> pa.Table:
    """Every committed row under `output` (or those matching `filter`; empty table with the schema when none).

    Parts written before a column existed read back with nulls in it (the dataset reads with OUTPUT_SCHEMA)."""
    fs, root = get_fs(output, s3_endpoint=s3_endpoint, anon=anon)
    fs.invalidate_cache(root)  # object stores: parts written by other processes since the last listing
    parts = own_parts(fs, root) if fs.exists(root) else []
    if not parts:  # only framescribe's parts: a user's files in the folder are never read
        table = OUTPUT_SCHEMA.empty_table()
        return table.select(columns) if columns else table
    ds = pads.dataset(parts, format="parquet", filesystem=_arrow_fs(fs), schema=OUTPUT_SCHEMA)
    return ds.to_table(columns=columns, filter=filter)


def _arrow_fs(fs):
    from pyarrow.fs import PyFileSystem, FSSpecHandler, LocalFileSystem

    if getattr(fs, "protocol", None) in ("file", ("file", "local")) or "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return LocalFileSystem()
    return PyFileSystem(FSSpecHandler(fs))


def done_keys(output: str, labeling_hash: str, *, include_errors: bool, s3_endpoint: str | None = None,
              anon: bool = False, max_run_attempts: int | None = None) -> set[tuple[str, str]]:
    """(video_id, prompt_id) pairs already committed for this labeling config.

    With `max_run_attempts`, a retryable error row tried by fewer runs than that is not done (see
    `retry_attempts`): the next run retries it by itself."""
    t = read_rows(output, columns=["video_id", "prompt_id", "labeling_hash", "status", "retryable", "run_attempt"],
                  s3_endpoint=s3_endpoint, anon=anon)
    t = t.filter(pc.equal(t["labeling_hash"], labeling_hash))
    if not include_errors:
        t = t.filter(pc.equal(t["status"], "ok"))
    elif max_run_attempts is not None:
        t = t.filter(pc.invert(retry_due(t, max_run_attempts)))
    return set(zip(t["video_id"].to_pylist(), t["prompt_id"].to_pylist()))


def retry_due(t: pa.Table, max_run_attempts: int):
    """Mask: retryable error rows tried by fewer than `max_run_attempts` runs (rows of old versions: 1 run)."""
    attempts = pc.fill_null(t["run_attempt"], 1)
    return pc.and_(pc.and_(pc.equal(t["status"], "error"), pc.fill_null(t["retryable"], False)),
                   pc.less(attempts, max_run_attempts))


def retry_attempts(output: str, labeling_hash: str, max_run_attempts: int, *, s3_endpoint: str | None = None,
                   anon: bool = False) -> dict[tuple[str, str], int]:
    """(video_id, prompt_id) -> runs that tried it, for the retryable error rows the next run retries."""
    t = read_rows(output, columns=["video_id", "prompt_id", "labeling_hash", "status", "retryable", "run_attempt"],
                  s3_endpoint=s3_endpoint, anon=anon)
    t = t.filter(pc.equal(t["labeling_hash"], labeling_hash))
    t = t.filter(retry_due(t, max_run_attempts))
    return {(v, p): int(a or 1) for v, p, a in zip(t["video_id"].to_pylist(), t["prompt_id"].to_pylist(),
                                                    t["run_attempt"].to_pylist())}


KEY_COLUMNS = ("video_id", "prompt_id", "labeling_hash")
TMP_STALE_S = 3600.0  # a temp object older than this belongs to a writer that died


@dataclass
class CompactionReport:
    duplicates_removed: int = 0   # rows dropped because another row had the same key
    parts_rewritten: int = 0      # parts replaced by a filtered copy (new deterministic name)
    parts_deleted: int = 0        # parts whose every row was a duplicate
    stale_tmp_removed: int = 0    # leftover `_tmp-*.inprogress` objects of killed writers


def _read_part(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def _remove_stale_tmp(fs, root: str, older_than_s: float) -> int:
    now, removed = datetime.now(timezone.utc), 0
    for p in own_tmp(fs, root):
        try:
            modified = fs.modified(p)
            if modified.tzinfo is None:
                modified = modified.astimezone(timezone.utc)
            if (now - modified).total_seconds() >= older_than_s:
                fs.rm_file(p)
                removed += 1
        except (FileNotFoundError, NotImplementedError):
            continue
    return removed


def compact_duplicates(output: str, *, s3_endpoint: str | None = None, anon: bool = False,
                       stale_tmp_s: float = TMP_STALE_S) -> CompactionReport:
    """Keep exactly one row per (video_id, prompt_id, labeling_hash) under `output`.

    Which row stays: an `ok` row over an `error` row, then the newest `created_at`, then (identical rows,
    e.g. left by a compaction that was killed halfway) the one in the part with the greatest name.
    Only parts holding a dropped row are touched: parts whose rows all go are deleted first; then each
    remaining affected part is rewritten atomically under the deterministic name of its kept rows
    (`write_part`: temp object + rename) and only after that the old part is deleted. A crash at any
    point leaves every key with at least one row, and the next call finishes the job. Temp objects of
    dead writers older than `stale_tmp_s` are removed too. Not safe while another run writes to `output`.
    """
    fs, root = get_fs(output, s3_endpoint=s3_endpoint, anon=anon)
    fs.invalidate_cache(root)  # s3fs lists from a cache: the workers' parts must be seen
    report = CompactionReport()
    if not fs.exists(root):
        return report
    report.stale_tmp_removed = _remove_stale_tmp(fs, root, stale_tmp_s)
    parts = own_parts(fs, root)  # never a user's file
    if len(parts) == 0:
        return report
    tables, allrows = _keyed_rows(fs, parts)
    drop = _rows_to_drop(allrows, parts)
    report.duplicates_removed = sum(len(v) for v in drop.values())
    _remove_rows(fs, output, parts, tables, drop, report, s3_endpoint=s3_endpoint, anon=anon)
    return report


def _keyed_rows(fs, parts: list[str]) -> tuple[list[pa.Table], pa.Table]:
    """Each part's key columns, and all of them in one table tagged with (part index, row index)."""
    from concurrent.futures import ThreadPoolExecutor

    cols = [*KEY_COLUMNS, "status", "created_at"]
    with ThreadPoolExecutor(max_workers=8) as pool:
        tables = list(pool.map(lambda p: _read_part(fs, p, cols), parts))
    keyed = []
    for i, t in enumerate(tables):
        t = conform(t).select(cols)
        keyed.append(t.append_column("_part", pa.array([i] * t.num_rows, pa.int32()))
                      .append_column("_row", pa.array(range(t.num_rows), pa.int64())))
    return tables, pa.concat_tables(keyed)


def _rows_to_drop(allrows: pa.Table, parts: list[str]) -> dict[int, set[int]]:
    """{part index: row indices} of every row but the best one of each duplicated key."""
    counts = allrows.group_by(list(KEY_COLUMNS)).aggregate([("_row", "count")])
    dup_keys = counts.filter(pc.greater(counts["_row_count"], 1)).select(list(KEY_COLUMNS))
    if dup_keys.num_rows == 0:
        return {}
    dups = allrows.join(dup_keys, keys=list(KEY_COLUMNS), join_type="inner")
    never = datetime.min.replace(tzinfo=timezone.utc)
    best: dict[tuple, tuple] = {}
    members: dict[tuple, list[tuple[int, int]]] = {}
    for r in dups.to_pylist():
        key = tuple(r[k] for k in KEY_COLUMNS)
        rank = (r["status"] == "ok", r["created_at"] or never, parts[r["_part"]], r["_row"])
        members.setdefault(key, []).append((r["_part"], r["_row"]))
        if key not in best or rank > best[key]:
            best[key] = rank
    drop: dict[int, set[int]] = {}
    for key, rows in members.items():
        keep = (parts.index(best[key][2]), best[key][3])
        for part_row in rows:
            if part_row != keep:
                drop.setdefault(part_row[0], set()).add(part_row[1])
    return drop


def _remove_rows(fs, output: str, parts: list[str], tables: list[pa.Table], drop: dict[int, set[int]],
                 report: CompactionReport, *, s3_endpoint: str | None, anon: bool) -> None:
    """Delete parts whose rows all go, then rewrite the others atomically without their dropped rows."""
    emptied = [i for i, rows in drop.items() if len(rows) == tables[i].num_rows]
    for i in emptied:  # first: a rewrite below may take the name of one of these parts
        fs.rm_file(parts[i])
        report.parts_deleted += 1
    for i, rows in sorted(drop.items()):
        if i in emptied:
            continue
        full = conform(_read_part(fs, parts[i]))
        mask = pa.array([j not in rows for j in range(full.num_rows)])
        new_path = write_part(full.filter(mask), output, s3_endpoint=s3_endpoint, anon=anon)
        if basename(new_path) != basename(parts[i]):
            fs.rm_file(parts[i])
        report.parts_rewritten += 1


def migrate_legacy_rows(output: str, *, legacy_hash: str, labeling_hash: str, key_for_uri,
                        s3_endpoint: str | None = None, anon: bool = False) -> int:
    """Bring rows of schema version 1 (no `schema_version`) written with this labeling config (its old
    `legacy_hash`) to the current identity: canonical `uri`, `video_id` from `key_for_uri(uri)` ->
    (canonical uri, key), the new `labeling_hash`. Each touched part is rewritten atomically under a new
    name, then the old one deleted; a crash in between leaves duplicates that compaction removes.
    Returns the number of rows migrated. Rows of other configs are left as they are."""
    from pipeline.discover import video_id_for

    fs, root = get_fs(output, s3_endpoint=s3_endpoint, anon=anon)
    migrated = 0
    for part in own_parts(fs, root):
        head = _read_part(fs, part, ["labeling_hash"])
        if legacy_hash not in set(head["labeling_hash"].to_pylist()):
            continue
        t = conform(_read_part(fs, part))
        rows = t.to_pylist()
        changed = 0
        for r in rows:
            if r["labeling_hash"] == legacy_hash and r["schema_version"] is None:
                uri, key = key_for_uri(r["uri"])
                r.update(uri=uri, video_id=video_id_for(key), labeling_hash=labeling_hash,
                         schema_version=SCHEMA_VERSION)
                changed += 1
        if not changed:
            continue
        new_path = write_part(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), output,
                              s3_endpoint=s3_endpoint, anon=anon)
        if basename(new_path) != basename(part):
            fs.rm_file(part)
        migrated += changed
    return migrated


__all__ = ["migrate_legacy_rows", "OUTPUT_SCHEMA", "SCHEMA_VERSION", "own_parts", "own_tmp", "foreign_parquet", "basename", "AtomicParquetSink", "read_rows", "done_keys", "retry_attempts", "write_part", "conform",
           "storage_options", "STATE_DIR", "compact_duplicates", "CompactionReport"]
