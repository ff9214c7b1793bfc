"""Output contract: the Parquet schema, atomic per-block commits, and reading a run's rows back."""
from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.storage import Location, join, storage_options

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


def write_part(table: pa.Table, output: str, *, s3_endpoint: str | None = None, anon: bool = False,
               location: Location | None = None) -> str:
    """Write one Parquet part atomically: a temp object first, then a rename to its final name."""
    import pyarrow.parquet as pq

    loc = location or Location.resolve(output, s3_endpoint=s3_endpoint, anon=anon)
    loc.fs.makedirs(loc.root, exist_ok=True)
    final = loc.path(part_name(table))
    tmp = loc.path(f"_tmp-{uuid.uuid4().hex}.inprogress")
    with loc.fs.open(tmp, "wb") as f:
        # row groups of ~64k rows: readers of the key columns skip the rest (column projection)
        pq.write_table(table, f, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    loc.fs.mv(tmp, final)
    return final


ROW_GROUP_ROWS = 65_536
PART_ROWS = 50_000        # target rows of a part after merging (see docs/benchmarks.md, "bench scale")
CHECKPOINT_ROWS = 1_000   # rows a write task gathers before it commits a part: the most work a kill loses


def read_rows(output: str, *, columns: list[str] | None = None, s3_endpoint: str | None = None,
              anon: bool = False, filter: pc.Expression | None = None) -> pa.Table:
    """Every committed row under `output` (or those matching `filter`; empty table with the schema when none).

    Parts written before a column existed read back with nulls in it (the dataset reads with OUTPUT_SCHEMA)."""
    loc = Location.resolve(output, s3_endpoint=s3_endpoint, anon=anon)
    loc.fs.invalidate_cache(loc.root)  # object stores: parts written by other processes since the last listing
    parts = own_parts(loc.fs, loc.root) if loc.fs.exists(loc.root) else []
    if not parts:  # only framescribe's parts: a user's files in the folder are never read
        table = OUTPUT_SCHEMA.empty_table()
        return table.select(columns) if columns else table
    import pyarrow.dataset as pads

    ds = pads.dataset(parts, format="parquet", filesystem=arrow_fs(loc.fs), schema=OUTPUT_SCHEMA)
    return ds.to_table(columns=columns, filter=filter)


def arrow_fs(fs):
    """A pyarrow filesystem for an fsspec one (the native one for local disk)."""
    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return LocalFileSystem()
    return PyFileSystem(FSSpecHandler(fs))


KEY_COLUMNS = ("video_id", "prompt_id", "labeling_hash")
# what resume, compaction and the summary need of every row; the rest of a row is never read for them
INDEX_COLUMNS = [*KEY_COLUMNS, "status", "retryable", "run_attempt", "created_at", "run_id"]
_FEW_VALUES = ["labeling_hash", "status", "run_id"]  # dictionary-encoded in memory: a few distinct values
TMP_STALE_S = 3600.0  # a temp object older than this belongs to a writer that died
_READERS = 16         # parts read in parallel (object stores: latency-bound)


def _part_keys(fs, path: str) -> pa.Table:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f, read_dictionary=[c for c in _FEW_VALUES])
        present = set(pf.schema_arrow.names)
        t = pf.read(columns=[c for c in INDEX_COLUMNS if c in present])
    cols = []
    for name in INDEX_COLUMNS:  # parts of older versions may lack a column: nulls of the right type
        if name in t.column_names:
            cols.append(t.column(name).combine_chunks())
        else:
            cols.append(pa.nulls(t.num_rows, OUTPUT_SCHEMA.field(name).type))
    out = pa.Table.from_arrays(cols, names=INDEX_COLUMNS)
    return out.cast(pa.schema([_index_field(n) for n in INDEX_COLUMNS]))


def _index_field(name: str) -> pa.Field:
    f = OUTPUT_SCHEMA.field(name)
    return pa.field(name, pa.dictionary(pa.int32(), pa.string())) if name in _FEW_VALUES else f


class OutputIndex:
    """One listing and one read of the key columns of every part under the output, shared by resume
    (`done_keys`), compaction (`compact`) and the run summary (`rows_of_run`).

    `refresh()` lists again and reads only parts that are new; parts that vanished are dropped.
    `keys` holds INDEX_COLUMNS plus `_part` (position in `paths`) and `_row` (row number in that part).
    """

    def __init__(self, location: Location):
        self.loc = location
        self.paths: list[str] = []          # every part ever indexed (positions stay stable)
        self.live: dict[str, int] = {}      # part path -> position, for parts that exist now
        self.rows: dict[int, int] = {}      # position -> row count
        self.tmp: dict[str, datetime | None] = {}  # temp objects of writers (path -> modified)
        self.keys = self._empty()

    @classmethod
    def load(cls, location: Location) -> "OutputIndex":
        idx = cls(location)
        idx.refresh()
        return idx

    @staticmethod
    def _empty() -> pa.Table:
        return pa.schema([*(_index_field(n) for n in INDEX_COLUMNS), pa.field("_part", pa.int32()),
                          pa.field("_row", pa.int64())]).empty_table()

    def list_parts(self) -> list[str]:
        """One listing of the output folder: framescribe's own parts (`PART_RE`, sorted), and in `self.tmp`
        its temp objects (`TMP_RE`) with their modification times (for `compact`'s stale-temp cleanup).
        Other files in the folder (a user's) are never read, rewritten or deleted."""
        fs, root = self.loc.fs, self.loc.root
        fs.invalidate_cache(root)  # object stores: parts the workers wrote since the last listing
        try:
            entries = fs.ls(root, detail=True)
        except FileNotFoundError:
            entries = []
        parts, self.tmp = [], {}
        for e in entries:
            path = e["name"].rstrip("/")
            name = path.rsplit("/", 1)[-1]
            if TMP_RE.fullmatch(name):
                self.tmp[path] = _modified(e)
            elif PART_RE.fullmatch(name) and e.get("type") != "directory":  # never a user's file
                parts.append(path)
        return sorted(parts)

    def refresh(self) -> list[str]:
        """List the output once; read the key columns of parts not indexed yet. Returns the new parts."""
        from concurrent.futures import ThreadPoolExecutor

        now = self.list_parts()
        gone = [p for p in self.live if p not in set(now)]
        if gone:
            self.forget(gone)
        new = [p for p in now if p not in self.live]
        if new:
            with ThreadPoolExecutor(max_workers=_READERS) as pool:
                tables = list(pool.map(lambda p: _part_keys(self.loc.fs, p), new))
            self._add(new, tables)
        return new

    def _add(self, paths: list[str], tables: list[pa.Table]) -> None:
        parts = [self.keys]
        for path, t in zip(paths, tables):
            i = len(self.paths)
            self.paths.append(path)
            self.live[path] = i
            self.rows[i] = t.num_rows
            parts.append(t.append_column("_part", pa.array(np.full(t.num_rows, i, dtype=np.int32)))
                         .append_column("_row", pa.array(np.arange(t.num_rows, dtype=np.int64))))
        self.keys = pa.concat_tables(parts, promote_options="permissive").unify_dictionaries()

    def forget(self, paths: list[str]) -> None:
        """Drop parts from the index (deleted by the caller)."""
        drop = [self.live.pop(p) for p in paths if p in self.live]
        if drop:
            self.keys = self.keys.filter(pc.invert(pc.is_in(self.keys["_part"], pa.array(drop, pa.int32()))))

    def add_part(self, path: str) -> None:
        """Index a part this process just wrote (replacing an older entry of the same name)."""
        self.forget([path])
        self._add([path], [_part_keys(self.loc.fs, path)])

    def delete_part(self, path: str) -> None:
        self.loc.fs.rm_file(path)
        self.forget([path])

    def _done(self, labeling_hash: str, include_errors: bool, max_run_attempts: int | None) -> pa.Table:
        t = self.keys.filter(pc.equal(self.keys["labeling_hash"].cast(pa.string()), labeling_hash))
        if not include_errors:
            t = t.filter(pc.equal(t["status"].cast(pa.string()), "ok"))
        elif max_run_attempts is not None:  # retryable errors not tried often enough are not done
            t = t.filter(pc.invert(retry_due(t, max_run_attempts)))
        return t

    def done_keys(self, labeling_hash: str, *, include_errors: bool,
                  max_run_attempts: int | None = None) -> set[tuple[str, str]]:
        """(video_id, prompt_id) pairs already committed for this labeling config (see `done_keys`)."""
        t = self._done(labeling_hash, include_errors, max_run_attempts)
        return set(zip(t["video_id"].to_pylist(), t["prompt_id"].to_pylist()))

    def retry_attempts(self, labeling_hash: str, max_run_attempts: int) -> dict[tuple[str, str], int]:
        """(video_id, prompt_id) -> runs that tried it, for the retryable error rows the next run retries."""
        t = self.keys.filter(pc.equal(self.keys["labeling_hash"].cast(pa.string()), labeling_hash))
        t = t.filter(retry_due(t, max_run_attempts))
        return {(v, p): int(a or 1) for v, p, a in zip(t["video_id"].to_pylist(), t["prompt_id"].to_pylist(),
                                                        t["run_attempt"].to_pylist())}

    def missing(self, inputs, labeling_hash: str, *, include_errors: bool,
                max_run_attempts: int | None = None) -> np.ndarray:
        """For each (video, prompt) of `inputs` in order (VideoInput.video_id, .prompts), True when no row
        for this labeling config is committed yet (or it is a retryable error due for a retry, with
        `max_run_attempts`). Membership is tested in Arrow, not in a Python set."""
        t = self._done(labeling_hash, include_errors, max_run_attempts)
        wanted = pa.array([v.video_id + pid for v in inputs for pid, _ in v.prompts], pa.string())
        if t.num_rows == 0:
            return np.ones(len(wanted), dtype=bool)
        done = pc.binary_join_element_wise(t["video_id"], t["prompt_id"], "")
        return np.logical_not(pc.is_in(wanted, value_set=done).to_numpy(zero_copy_only=False))

    def rows_of_run(self, run_id: str, columns: list[str]) -> pa.Table:
        """`columns` of the rows written by `run_id`: only the parts that hold such rows are read, with
        the filter pushed down to the Parquet reader."""
        import pyarrow.parquet as pq

        mask = pc.equal(self.keys["run_id"].cast(pa.string()), run_id)
        parts = sorted(set(self.keys.filter(mask)["_part"].to_pylist()))
        tables = []
        for i in parts:
            with self.loc.fs.open(self.paths[i], "rb") as f:
                tables.append(pq.read_table(f, columns=columns, filters=pc.field("run_id") == run_id))
        schema = pa.schema([OUTPUT_SCHEMA.field(c) for c in columns])
        return pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()


def done_keys(output: str, labeling_hash: str, *, include_errors: bool, s3_endpoint: str | None = None,
              anon: bool = False, max_run_attempts: int | None = None) -> set[tuple[str, str]]:
    """(video_id, prompt_id) pairs already committed for this labeling config.

    With `max_run_attempts`, a retryable error row tried by fewer runs than that is not done (see
    `retry_attempts`): the next run retries it by itself."""
    idx = OutputIndex.load(Location.resolve(output, s3_endpoint=s3_endpoint, anon=anon))
    return idx.done_keys(labeling_hash, include_errors=include_errors, max_run_attempts=max_run_attempts)


def retry_due(t: pa.Table, max_run_attempts: int):
    """Mask: retryable error rows tried by fewer than `max_run_attempts` runs (rows of old versions: 1 run)."""
    attempts = pc.fill_null(t["run_attempt"], 1)
    return pc.and_(pc.and_(pc.equal(t["status"].cast(pa.string()), "error"), pc.fill_null(t["retryable"], False)),
                   pc.less(attempts, max_run_attempts))


def retry_attempts(output: str, labeling_hash: str, max_run_attempts: int, *, s3_endpoint: str | None = None,
                   anon: bool = False) -> dict[tuple[str, str], int]:
    """(video_id, prompt_id) -> runs that tried it, for the retryable error rows the next run retries."""
    idx = OutputIndex.load(Location.resolve(output, s3_endpoint=s3_endpoint, anon=anon))
    return idx.retry_attempts(labeling_hash, max_run_attempts)


@dataclass
class CompactionReport:
    duplicates_removed: int = 0   # rows dropped because another row had the same key
    parts_rewritten: int = 0      # parts replaced by a filtered copy (new deterministic name)
    parts_deleted: int = 0        # parts whose every row was a duplicate
    stale_tmp_removed: int = 0    # leftover `_tmp-*.inprogress` objects of killed writers
    parts_merged: int = 0         # small parts merged into bigger ones
    parts_written_by_merge: int = 0


def _read_part(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def _modified(entry: dict) -> datetime | None:
    """Modification time of a listing entry (local: mtime; s3fs: LastModified), UTC."""
    value = entry.get("mtime", entry.get("LastModified", entry.get("last_modified")))
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, timezone.utc)
    return value if value.tzinfo else value.astimezone(timezone.utc)


def _remove_stale_tmp(index: "OutputIndex", older_than_s: float) -> int:
    now, removed = datetime.now(timezone.utc), 0
    for path, modified in list(index.tmp.items()):
        if modified is not None and (now - modified).total_seconds() >= older_than_s:
            try:
                index.loc.fs.rm_file(path)
                removed += 1
            except FileNotFoundError:
                pass
            index.tmp.pop(path, None)
    return removed


def compact_duplicates(output: str, *, s3_endpoint: str | None = None, anon: bool = False,
                       stale_tmp_s: float = TMP_STALE_S, part_rows: int | None = None) -> CompactionReport:
    """`compact` on a fresh index of `output` (one listing, one key-column read)."""
    loc = Location.resolve(output, s3_endpoint=s3_endpoint, anon=anon)
    if not loc.fs.exists(loc.root):
        return CompactionReport()
    return compact(OutputIndex.load(loc), stale_tmp_s=stale_tmp_s, part_rows=part_rows)


def compact(index: OutputIndex, *, stale_tmp_s: float = TMP_STALE_S, part_rows: int | None = None
            ) -> CompactionReport:
    """Keep exactly one row per (video_id, prompt_id, labeling_hash); then, with `part_rows`, merge parts
    smaller than half of it into parts of up to `part_rows` rows. `index` is kept up to date.

    Which row stays: an `ok` row over an `error` row, then the newest `created_at`, then (identical rows,
    e.g. left by a compaction or merge that was killed halfway) the one in the bigger part, then the part
    with the greatest name. Only parts holding a dropped row are touched: parts whose rows all go are
    deleted first; then each remaining affected part is rewritten atomically under the deterministic name
    of its kept rows (`write_part`: temp object + rename) and only after that the old part is deleted.
    A merge writes the merged part first and deletes its sources after. A crash at any point leaves every
    key with at least one row, and the next call finishes the job. Temp objects of dead writers older
    than `stale_tmp_s` are removed too. Not safe while another run writes to the output.
    """
    report = CompactionReport()
    report.stale_tmp_removed = _remove_stale_tmp(index, stale_tmp_s)
    _drop_duplicates(index, report)
    if part_rows:
        _merge_small_parts(index, part_rows, report)
    return report


def _drop_duplicates(index: OutputIndex, report: CompactionReport) -> None:
    keys = index.keys
    if keys.num_rows == 0:
        return
    plain = pa.table({"video_id": keys["video_id"], "prompt_id": keys["prompt_id"],
                      "labeling_hash": keys["labeling_hash"].cast(pa.string())})
    counts = plain.group_by(list(KEY_COLUMNS)).aggregate([([], "count_all")])
    dup_keys = counts.filter(pc.greater(counts["count_all"], 1)).select(list(KEY_COLUMNS))
    if dup_keys.num_rows == 0:
        return
    allrows = plain.append_column("status", keys["status"].cast(pa.string())) \
        .append_column("created_at", keys["created_at"]).append_column("_part", keys["_part"]) \
        .append_column("_row", keys["_row"])
    dups = allrows.join(dup_keys, keys=list(KEY_COLUMNS), join_type="inner")

    never = datetime.min.replace(tzinfo=timezone.utc)
    best: dict[tuple, tuple] = {}
    members: dict[tuple, list[tuple[int, int]]] = {}
    for r in dups.to_pylist():
        key = tuple(r[k] for k in KEY_COLUMNS)
        i = r["_part"]
        rank = (r["status"] == "ok", r["created_at"] or never, index.rows[i], index.paths[i], r["_row"])
        members.setdefault(key, []).append((i, r["_row"]))
        if key not in best or rank > best[key]:
            best[key] = (*rank, i)
    drop: dict[int, set[int]] = {}
    for key, rows in members.items():
        keep = (best[key][-1], best[key][-2])
        for part_row in rows:
            if part_row != keep:
                drop.setdefault(part_row[0], set()).add(part_row[1])
    report.duplicates_removed = sum(len(v) for v in drop.values())

    emptied = [i for i, rows in drop.items() if len(rows) == index.rows[i]]
    for i in emptied:  # first: a rewrite below may take the name of one of these parts
        index.delete_part(index.paths[i])
        report.parts_deleted += 1
    for i, rows in sorted(drop.items()):
        if i in emptied:
            continue
        old = index.paths[i]
        full = conform(_read_part(index.loc.fs, old))
        mask = pa.array([j not in rows for j in range(full.num_rows)])
        new_path = write_part(full.filter(mask), index.loc.uri, location=index.loc)
        if _name(new_path) != _name(old):
            index.delete_part(old)
        index.add_part(new_path)
        report.parts_rewritten += 1


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _merge_small_parts(index: OutputIndex, part_rows: int, report: CompactionReport) -> None:
    """Merge parts under half of `part_rows` rows into parts of up to `part_rows` rows (in name order)."""
    small = sorted((p for p, i in index.live.items() if index.rows[i] < part_rows // 2))
    groups, group, n = [], [], 0
    for p in small:
        rows = index.rows[index.live[p]]
        if group and n + rows > part_rows:
            groups.append(group)
            group, n = [], 0
        group.append(p)
        n += rows
    groups.append(group)
    from concurrent.futures import ThreadPoolExecutor

    for group in groups:
        if len(group) < 2:
            continue
        with ThreadPoolExecutor(max_workers=_READERS) as pool:
            tables = list(pool.map(lambda p: conform(_read_part(index.loc.fs, p)), group))
        new_path = write_part(pa.concat_tables(tables), index.loc.uri, location=index.loc)
        sources = [p for p in group if _name(p) != _name(new_path)]
        index.loc.fs.rm(sources)  # only after the merged part is committed; one bulk delete on S3
        index.forget(sources)
        index.add_part(new_path)
        report.parts_merged += len(group)
        report.parts_written_by_merge += 1


def migrate_legacy_rows(output: str, *, legacy_hash: str, labeling_hash: str, key_for_uri,
                        s3_endpoint: str | None = None, anon: bool = False) -> int:
    """Bring rows of schema version 1 (no `schema_version`) written with this labeling config (its old
    `legacy_hash`) to the current identity: canonical `uri`, `video_id` from `key_for_uri(uri)` ->
    (canonical uri, key), the new `labeling_hash`. Each touched part is rewritten atomically under a new
    name, then the old one deleted; a crash in between leaves duplicates that compaction removes.
    Returns the number of rows migrated. Rows of other configs are left as they are."""
    from pipeline.discover import video_id_for

    loc = Location.resolve(output, s3_endpoint=s3_endpoint, anon=anon)
    fs, root = loc.fs, loc.root
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
        new_path = write_part(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), output, location=loc)
        if basename(new_path) != basename(part):
            fs.rm_file(part)
        migrated += changed
    return migrated


__all__ = ["migrate_legacy_rows", "OUTPUT_SCHEMA", "SCHEMA_VERSION", "own_parts", "own_tmp", "foreign_parquet",
           "basename", "read_rows", "done_keys", "retry_due", "retry_attempts", "write_part", "conform",
           "storage_options", "STATE_DIR", "compact_duplicates", "compact", "CompactionReport", "OutputIndex",
           "PART_ROWS", "CHECKPOINT_ROWS", "arrow_fs"]
