"""Regrouping a Ray Data stream by source shard, so each output shard is committed whole and atomically.

Ray Data hands batches back in any order and any size; a stage that must keep "one output shard
per input shard" (resume per shard, same numbering) collects rows here until every row of a
source shard came back, then commits that shard through ``cm3.core.shards`` (staging, parquet,
stats file last). Rows with an ``error`` are counted by reason and left out.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cm3.core.files import write_json
from cm3.core.shards import commit_shard, new_attempt_dir, parquet_path, stats_path


class ShardAssembler:
    def __init__(self, out_dir: Path, expected: dict[int, int], schema: pa.Schema, stats_extra: dict | None = None):
        self.out_dir, self.expected, self.schema = out_dir, expected, schema
        self.stats_extra = stats_extra or {}
        self.rows: dict[int, list[pa.Table]] = defaultdict(list)
        self.seen: Counter = Counter()
        self.reasons: dict[int, Counter] = defaultdict(Counter)
        self.written: list[int] = []
        self.kept = 0

    def add(self, batch: pa.Table) -> int:
        """Take one batch (with ``source_shard`` and ``error`` columns); returns how many rows it covered."""
        for shard_id in set(batch.column("source_shard").to_pylist()):
            part = batch.filter(pc.equal(batch.column("source_shard"), shard_id))
            self.reasons[shard_id].update(e for e in part.column("error").to_pylist() if e is not None)
            ok = part.filter(pc.is_null(part.column("error")))
            if ok.num_rows:
                self.rows[shard_id].append(ok)
            self.seen[shard_id] += part.num_rows
            if self.seen[shard_id] == self.expected[shard_id]:
                self.commit(shard_id)
        return batch.num_rows

    def commit(self, shard_id: int) -> None:
        rows = self.rows.pop(shard_id, [])
        kept = sum(t.num_rows for t in rows)
        stats = {"count": self.expected[shard_id], "kept": kept, "skipped_by_reason": dict(self.reasons[shard_id]),
                 **self.stats_extra}
        attempt = new_attempt_dir(self.out_dir, shard_id)
        table = pa.concat_tables(rows).select(self.schema.names).cast(self.schema) if rows else self.schema.empty_table()
        pq.write_table(table.sort_by("key"), attempt / parquet_path(self.out_dir, shard_id).name)
        write_json(attempt / stats_path(self.out_dir, shard_id).name, stats)
        commit_shard(attempt, self.out_dir, shard_id)
        self.written.append(shard_id)
        self.kept += kept

    def missing(self) -> list[int]:
        return sorted(set(self.expected) - set(self.written))

    def skipped_by_reason(self) -> dict[str, int]:
        total: Counter = Counter()
        for reasons in self.reasons.values():
            total.update(reasons)
        return dict(total)
