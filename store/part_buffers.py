"""When buffered rows become a part: the writer's flush policy, kept apart from the thread and the file writing.

Every table (tokens and forks included) is buffered on the writer thread and written as one part, sorted by step:
- when `part_rows` rows of that table are buffered (memory stays bounded, big runs get parts of ~part_rows rows);
- a batch of `part_rows` rows or more (a big step) goes out at once in a part of its own: what was buffered before
  it is written first, so a big step never waits and never shares its part with smaller steps;
- every `flush_interval_s` seconds, on `flush()` and on `close()` (the writer calls `take_all`).
Why group at all: one Parquet file per step costs the writer ~3 ms (schema, zstd, footer, tmp+rename) however
small the step; grouping ~100-row steps into one part makes that cost per part, not per step, and a long run of
small steps leaves a few parts, not tens of thousands.
"""

from __future__ import annotations

import pyarrow as pa

from .part_file import sort_rows


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
