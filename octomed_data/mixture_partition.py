"""The mixture's spills: rows into hash (or key-range) buckets with a bounded fan-out, so the number of
work files grows linearly with the data.

One streaming pass that partitions data of size D into B buckets through a buffer of size M writes
one chunk per bucket each time the buffer fills: (D / M) x B chunks, and with B in proportion to
D / M (a bucket must fit in memory later) the chunks grow with the square of the data. Here a pass
partitions into at most ``fan`` buckets, ``fan`` chosen so each flushed chunk is at least
:data:`MIN_CHUNK_BYTES`; with more buckets than ``fan``, the first pass partitions into ``fan`` groups
of consecutive buckets, and each further level re-partitions each group into ``fan`` sub-groups until
every group is one bucket (levels = ceil(log_fan(buckets)), one for small data: then the chunks are
named and cut exactly as a single pass cuts them). Every level reads and writes the data once, in
order, so each bucket ends with exactly the rows, in the same order, that a single pass gives it.

The mixture hands whole Arrow tables to :meth:`Partition.add_table` (the buffer counts their Arrow
bytes: ``fan`` = 64 at the default 256 MB, chunks of 1 MiB and more), and ``bucket_of`` must be
vectorised (a bucket per distinct question, numpy on shuffle keys): a further level then costs one
Parquet read and write of the data, never per-row Python work, so levels keep the step linear.
Rows (:meth:`Partition.add`) are counted by their Python size and written as one table per chunk.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from octomed_data import storage

MIN_CHUNK_BYTES = 2**20  # the smallest chunk a pass aims to write (Arrow bytes; rows: measured Python size)
_FLAT = frozenset({str, int, float, bool, bytes, type(None)})  # getsizeof is their whole size


def row_bytes(value: Any) -> int:
    """The memory a row (or any value of one) takes as Python objects, measured with ``getsizeof``."""
    if isinstance(value, dict):
        values = value.values()
        if _FLAT.issuperset(map(type, values)):  # a flat row: no Python loop (the same sum)
            return sys.getsizeof(value) + sum(map(sys.getsizeof, values))
        return sys.getsizeof(value) + sum(row_bytes(v) for v in values)
    if isinstance(value, list | tuple):
        return sys.getsizeof(value) + sum(row_bytes(v) for v in value)
    return sys.getsizeof(value)


def remove_tree(uri: str) -> None:
    fs, path = storage.filesystem(uri)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def fan_out(limit_bytes: int) -> int:
    """Buckets one pass fills through a buffer of ``limit_bytes``: chunks of ``MIN_CHUNK_BYTES`` or more."""
    return max(2, limit_bytes // MIN_CHUNK_BYTES)


def levels_for(n_buckets: int, fan: int) -> int:
    levels = 1
    while fan**levels < n_buckets:
        levels += 1
    return levels


class Spill:
    """Buffers rows per bucket and commits them as work shards ``b<bucket>-<n>`` of
    ``dataset_of(bucket)`` when the buffered rows reach ``limit_bytes`` (their measured Python size,
    or Arrow size for tables; a buffer holds one or the other)."""

    def __init__(self, dataset_of: Callable[[int], storage.Dataset], limit_bytes: int) -> None:
        self.dataset_of = dataset_of
        self.limit = limit_bytes
        self.buffers: dict[int, list[Any]] = defaultdict(list)
        self.buffered = 0
        self.chunks: Counter[int] = Counter()
        self.shards: dict[int, list[str]] = defaultdict(list)

    def add(self, bucket: int, row: dict[str, Any]) -> None:
        self.buffers[bucket].append(row)
        self.buffered += row_bytes(row)
        if self.buffered >= self.limit:
            self.flush()

    def add_tables(self, pieces: Iterable[tuple[int, pa.Table]], nbytes: int) -> None:
        """Tables into their buckets, ``nbytes`` in all (slices of one table: counted once)."""
        for bucket, table in pieces:
            self.buffers[bucket].append(table)
        self.buffered += nbytes
        if self.buffered >= self.limit:
            self.flush()

    def flush(self) -> None:
        for bucket, rows in self.buffers.items():
            if rows:
                name = f"b{bucket:05d}-{self.chunks[bucket]:05d}"
                self.chunks[bucket] += 1
                dataset = self.dataset_of(bucket)
                if isinstance(rows[0], pa.Table):
                    data = pa.concat_tables(rows)
                else:  # one Arrow table, not a row at a time
                    data = pa.Table.from_pylist(rows, schema=dataset.schema)
                dataset.write_shard(name, data)
                self.shards[bucket].append(name)
        self.buffers = defaultdict(list)
        self.buffered = 0

    @property
    def written(self) -> int:
        return sum(self.chunks.values())


def sub_range(lo: Any, hi: Any, fan: int, bucket: Any) -> Any:
    """The first bucket of the sub-range ``bucket`` falls in when ``[lo, hi)`` is cut into
    ``min(fan, hi - lo)`` near-equal ranges of consecutive buckets (ints or numpy arrays)."""
    size = hi - lo
    parts = min(fan, size)
    index = (bucket - lo) * parts // size
    return lo + -(-index * size // parts)


def scatter(spill: Spill, table: pa.Table, sub: np.ndarray) -> None:
    """``table``'s rows into ``spill`` by ``sub`` (each row's range), in their order within each range."""
    if not table.num_rows:
        return
    order = np.argsort(sub, kind="stable")
    ids, starts = np.unique(sub[order], return_index=True)
    ends = [*starts[1:].tolist(), len(order)]
    ordered = table.take(order) if len(ids) > 1 else table
    pieces = [
        (b, ordered.slice(a, e - a)) for b, a, e in zip(ids.tolist(), starts.tolist(), ends, strict=True)
    ]
    spill.add_tables(pieces, ordered.nbytes)


def spill_ranges(keys: np.ndarray, n_out: int, n_spill: int) -> np.ndarray:
    """Each shuffle key's spill range, ``(k * n_out // 2**64) * n_spill // n_out``, exact in uint64:
    k * n_out = hi * n_out * 2**32 + lo * n_out with hi, lo the key's 32-bit halves (n_out < 2**31)."""
    keys = np.asarray(keys, dtype=np.uint64)
    n, half = np.uint64(n_out), np.uint64(32)
    high = (keys >> half) * n + (((keys & np.uint64(0xFFFFFFFF)) * n) >> half)
    return (high >> half).astype(np.int64) * n_spill // n_out


def cut(ranges: dict[int, int], fan: int) -> dict[int, int]:
    """Every range ``{lo: hi}`` cut into ``min(fan, hi - lo)`` sub-ranges: ``{lo: hi}`` of those."""
    out: dict[int, int] = {}
    for lo, hi in ranges.items():
        parts = min(fan, hi - lo)
        bounds = [lo + -(-i * (hi - lo) // parts) for i in range(parts + 1)]
        out.update(zip(bounds[:-1], bounds[1:], strict=True))
    return out


class Partition:
    """Rows into ``n_buckets`` buckets of the dataset at ``uri``, at most ``fan_out(limit_bytes)`` a pass.

    Each level cuts every range of consecutive buckets into at most ``fan`` near-equal ranges (a
    range is named by its first bucket) until every range is one bucket. ``add(bucket, row)`` streams
    the rows into the first level; ``finish()`` runs the further levels (each reads a range's chunks
    back as Arrow tables and asks ``bucket_of`` for each row's bucket, the one ``add`` was given) and
    returns bucket -> its shard names at ``uri``, the rows in the order they were added. A range
    that is one bucket goes to ``uri`` at once; the others wait at ``uri.level<n>``, removed once
    the next level has read them.
    """

    def __init__(
        self,
        uri: str,
        schema: pa.Schema,
        n_buckets: int,
        limit_bytes: int,
        bucket_of: Callable[[pa.Table], np.ndarray],
    ) -> None:
        self.uri, self.schema, self.limit, self.bucket_of = uri, schema, limit_bytes, bucket_of
        self.n_buckets = n_buckets
        self.fan = fan_out(limit_bytes)
        self.levels = levels_for(n_buckets, self.fan)
        self.final = storage.Dataset(uri, schema)
        self.ranges = cut({0: n_buckets}, self.fan)
        self.spill = Spill(self._place(1, self.ranges), limit_bytes)
        self.chunks_written = 0
        self.shards: dict[int, list[str]] = {}

    def _place(self, level: int, ranges: dict[int, int]) -> Callable[[int], storage.Dataset]:
        waiting = storage.Dataset(f"{self.uri}.level{level}", self.schema)
        return lambda lo: self.final if ranges[lo] - lo == 1 else waiting

    def add(self, bucket: int, row: dict[str, Any]) -> None:
        self.spill.add(sub_range(0, self.n_buckets, self.fan, bucket), row)

    def add_table(self, buckets: np.ndarray, table: pa.Table) -> None:
        """``table``'s rows, row i into bucket ``buckets[i]`` (cast to the schema; Arrow-sized)."""
        table = table.select(self.schema.names).cast(self.schema)
        scatter(
            self.spill, table, sub_range(0, self.n_buckets, self.fan, np.asarray(buckets, dtype=np.int64))
        )

    def finish(self) -> dict[int, list[str]]:
        self.spill.flush()
        self.chunks_written = self.spill.written
        done: dict[int, list[str]] = {}
        ranges, groups, level = self.ranges, dict(self.spill.shards), 1
        while True:
            done.update({lo: groups.pop(lo) for lo in list(groups) if ranges[lo] - lo == 1})
            if not groups:
                break
            level += 1
            source = storage.Dataset(f"{self.uri}.level{level - 1}")
            parents = {lo: ranges[lo] for lo in groups}
            ranges = cut(parents, self.fan)
            spill = Spill(self._place(level, ranges), self.limit)
            for lo in sorted(groups):
                for name in groups[lo]:
                    table = source.read_shard(name)
                    scatter(spill, table, sub_range(lo, parents[lo], self.fan, self.bucket_of(table)))
            spill.flush()
            self.chunks_written += spill.written
            remove_tree(source.uri)
            groups = dict(spill.shards)
        self.shards = {b: done[b] for b in sorted(done)}
        return self.shards
