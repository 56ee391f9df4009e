"""A part: when buffered rows become one (`PartBuffers`, the writer's flush policy), and how one part file is laid
out (row order, row groups aligned to steps, encodings, schema version).

Every table (tokens and forks included) is buffered on the writer thread and written as one part, sorted by step:
- when `part_rows` rows of that table are buffered (memory stays bounded, big runs get parts of ~part_rows rows);
- a batch of `part_rows` rows or more (a big step) goes out at once in a part of its own: what was buffered before
  it is written first, so a big step never waits and never shares its part with smaller steps;
- every `flush_interval_s` seconds, on `flush()` and on `close()` (the writer calls `take_all`).
Why group at all: one Parquet file per step costs the writer ~3 ms (schema, zstd, footer, tmp+rename) however
small the step; grouping ~100-row steps into one part makes that cost per part, not per step, and a long run of
small steps leaves a few parts, not tens of thousands.

So that reading one step stays cheap however many steps share its part, rows are sorted by step (then completion,
then position) and a row group never mixes two steps once it has reached `row_group_rows` rows: a query on
`step = s` skips, by the row-group min/max statistics, every row group that does not hold step s. Big steps get row groups of their own; small steps
share row groups of at most `row_group_rows` rows (a lookup of one small step decodes at most that many rows).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .schema import SCHEMA_VERSION, VERSION_KEY

PARQUET_OPTIONS: dict[str, Any] = dict(
    compression="zstd",
    compression_level=3,
    write_statistics=True,
    # run_id, step and the method names repeat on every row: dictionary + RLE makes them nearly free.
    use_dictionary=["run_id", "step", "select_method", "prompt", "rewards.key_value.key"],
)
# Positions count up and completion ids repeat: deltas make both almost free (0.23 -> 0.03 B/row for position).
_DELTA = {"position": "DELTA_BINARY_PACKED", "completion_id": "DELTA_BINARY_PACKED"}
# Floats (and the Zipf-distributed token ids) compress far better split into byte streams: the high bytes (sign,
# exponent) repeat, the rounded-off low mantissa bytes are zeros. Integer BYTE_STREAM_SPLIT needs pyarrow >= 17.
_BSS_INTS = ("token_id",) if int(pa.__version__.split(".")[0]) >= 17 else ()


def sort_rows(t: pa.Table) -> pa.Table:
    """`t` ordered by step, then completion_id (probe_id for probes) and position where the table has them (a no-op
    when already so)."""
    if "step" not in t.column_names or t.num_rows < 2:
        return t
    unit = next((k for k in ("completion_id", "probe_id") if k in t.column_names), None)
    keys = [k for k in ("step", unit, "position") if k is not None and k in t.column_names]
    if t["step"].null_count:  # vocab rows may carry no step: let Arrow order them (nulls last)
        return t.sort_by([(k, "ascending") for k in keys])
    step = t["step"].to_numpy()
    same_step = step[1:] == step[:-1]
    ordered = not np.any(step[1:] < step[:-1])
    if ordered and unit is not None:
        cid = t[unit].to_numpy()
        ordered = not np.any(same_step & (cid[1:] < cid[:-1]))
        if ordered and "position" in t.column_names:
            pos = t["position"].to_numpy()
            ordered = not np.any(same_step & (cid[1:] == cid[:-1]) & (pos[1:] < pos[:-1]))
    return t if ordered else t.sort_by([(k, "ascending") for k in keys])


def row_groups(step: np.ndarray, row_group_rows: int) -> list[tuple[int, int]]:
    """(start, stop) row ranges of a step-sorted part: consecutive steps share a range while it stays within
    `row_group_rows` rows; a range never cuts a step (one step larger than that is split later by pyarrow)."""
    n = len(step)
    edges = [0, *(np.flatnonzero(step[1:] != step[:-1]) + 1).tolist(), n]
    out, g0 = [], 0
    for start, stop in zip(edges[:-1], edges[1:], strict=True):  # one step occupies [start, stop)
        if stop - g0 > row_group_rows and start > g0:
            out.append((g0, start))
            g0 = start
    out.append((g0, n))
    return out


def encode_part(t: pa.Table, *, row_group_rows: int) -> pa.Buffer:
    """The (sorted) table `t` as the bytes of one Parquet file, tagged with the schema version. Encoded in memory so
    the store writes it in one go (one upload on S3) and can retry that without encoding again."""
    sink = pa.BufferOutputStream()
    write_part_file(sink, t, row_group_rows=row_group_rows)
    return sink.getvalue()


def write_part_file(path: str | pa.NativeFile, t: pa.Table, *, row_group_rows: int) -> None:
    """Write the (sorted) table `t` to `path` (a local path or an output stream) as one Parquet file tagged with the
    schema version."""
    t = t.replace_schema_metadata({**(t.schema.metadata or {}), VERSION_KEY: str(SCHEMA_VERSION).encode()})
    encodings = {
        **{f.name: "BYTE_STREAM_SPLIT" for f in t.schema if pa.types.is_floating(f.type) or f.name in _BSS_INTS},
        **{k: v for k, v in _DELTA.items() if k in t.column_names},
    }
    if "step" in t.column_names and t.num_rows and t["step"].null_count == 0:
        groups = row_groups(pc.cast(t["step"], pa.int64()).to_numpy(zero_copy_only=False), row_group_rows)
    else:
        groups = [(0, t.num_rows)]
    with pq.ParquetWriter(path, t.schema, column_encoding=encodings, **PARQUET_OPTIONS) as w:
        for start, stop in groups:
            w.write_table(t.slice(start, stop - start), row_group_size=row_group_rows)


class PartBuffers:
    """Rows of each table waiting to be written. Used by the writer thread only (not thread-safe)."""

    def __init__(self, tables: list[str], *, part_rows: int) -> None:
        if part_rows < 1:
            raise ValueError(f"part_rows={part_rows} must be >= 1")
        self.part_rows = part_rows
        self._tables: dict[str, list[pa.Table]] = {t: [] for t in tables}
        self._rows: dict[str, int] = dict.fromkeys(tables, 0)

    def add(self, table: str, t: pa.Table) -> list[pa.Table]:
        """Buffer `t`; return the parts (sorted tables) due now, in the order to write them."""
        due = []
        if t.num_rows >= self.part_rows and self._rows[table]:  # a big batch gets a part of its own
            due.append(self.take(table))
        self._tables[table].append(t)
        self._rows[table] += t.num_rows
        if self._rows[table] >= self.part_rows:
            due.append(self.take(table))
        return [d for d in due if d is not None]

    def take(self, table: str) -> pa.Table | None:
        """Everything buffered for `table` as one table sorted by step (None when nothing is buffered)."""
        parts, self._tables[table], self._rows[table] = self._tables[table], [], 0
        if not parts:
            return None
        return sort_rows(pa.concat_tables(parts))

    def take_all(self) -> dict[str, pa.Table]:
        return {table: t for table in list(self._tables) if (t := self.take(table)) is not None}
