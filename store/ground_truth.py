"""Optional ground-truth annotations next to a run's records, and the `truth` view over them.

A task that knows the role of every token (the demo's does, demo/task.py) writes, per recorded token, that role and
whether it was a decision point: `LOG_DIR/<run>/truth/*.parquet` with the columns of `TRUTH`. forkwatch never writes these
itself; the view is empty when no run has them, so pages and queries may always read it. A part that cannot be read
is skipped with a warning, as the record tables' parts are.
"""

from __future__ import annotations

import logging
import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import run_folder
from .location import Location, resolve

logger = logging.getLogger(__name__)

TRUTH_VIEW = "truth"
TRUTH_DIR = "truth"  # folder inside a run's folder
TRUTH = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("step", pa.int32()),
        pa.field("completion_id", pa.int64()),
        pa.field("position", pa.int32()),
        pa.field("is_decision", pa.bool_()),  # more than one token was correct at this position
        pa.field("on_path", pa.bool_()),  # the completion was still correct up to this position
        # the task's role of the token: decision, cosmetic, confident_consequential, forced, mistake, off_path
        pa.field("role", pa.string()),
    ]
)
_SQL_TYPES = {"run_id": "VARCHAR", "step": "INTEGER", "completion_id": "BIGINT", "position": "INTEGER",
              "is_decision": "BOOLEAN", "on_path": "BOOLEAN", "role": "VARCHAR"}


def truth_parts(log_dir: str | os.PathLike[str] | Location) -> list[str]:
    """The readable truth parts of every run under log_dir, with the columns of TRUTH (as DuckDB opens them)."""
    loc = resolve(log_dir)
    out = []
    for run in run_folder.list_runs(loc):
        for rel, info in sorted(run.files.items()):
            folder, _, name = rel.rpartition("/")
            if folder != TRUTH_DIR or not name.endswith(".parquet") or info.type != pafs.FileType.File:
                continue
            shown = loc.display(info.path)
            try:
                names = set(pq.read_schema(info.path, filesystem=loc.fs).names)
            except (OSError, ValueError) as e:
                logger.warning("forkwatch: skipping annotation part %s: %s", shown, e)
                continue
            if not set(TRUTH.names) <= names:
                logger.warning("forkwatch: skipping annotation part %s: it lacks %s", shown,
                               sorted(set(TRUTH.names) - names))
                continue
            out.append(os.path.realpath(info.path) if loc.is_local else shown)
    return out


def truth_view_sql(parts: list[str]) -> str:
    """The body of the `truth` view over `parts` (empty, with TRUTH's columns, when there are none)."""
    if not parts:
        cols = ", ".join(f"CAST(NULL AS {_SQL_TYPES[n]}) AS {n}" for n in TRUTH.names)
        return f"SELECT {cols} WHERE false"
    files = ", ".join("'" + str(p).replace("'", "''") + "'" for p in parts)
    return f"SELECT {', '.join(TRUTH.names)} FROM read_parquet([{files}], hive_partitioning=false)"
