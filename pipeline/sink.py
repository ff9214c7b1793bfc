"""The Ray Data sink of a labeling run (kept apart from pipeline.output so planning never imports Ray)."""
from __future__ import annotations

from typing import Iterable

import pyarrow as pa
from ray.data import Datasink
from ray.data.block import BlockAccessor

from pipeline.output import CHECKPOINT_ROWS, conform, write_part


class AtomicParquetSink(Datasink):
    """Ray Data sink: each write task commits its rows as one part; a killed run leaves only whole parts.

    Ray gathers at least `checkpoint_rows` rows per write task (`min_rows_per_write`), so a run makes few
    parts; the end-of-run compaction merges them into parts of `PART_ROWS` rows.
    """

    def __init__(self, output: str, *, s3_endpoint: str | None = None, anon: bool = False,
                 checkpoint_rows: int = CHECKPOINT_ROWS):
        self.output, self.s3_endpoint, self.anon = output, s3_endpoint, anon
        self.checkpoint_rows = checkpoint_rows

    @property
    def min_rows_per_write(self) -> int:
        return self.checkpoint_rows

    def write(self, blocks: Iterable, ctx) -> list[str]:
        tables = [conform(BlockAccessor.for_block(b).to_arrow()) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        return [write_part(pa.concat_tables(tables), self.output, s3_endpoint=self.s3_endpoint, anon=self.anon)]
