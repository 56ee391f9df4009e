"""A task's ground truth next to a run's records, apart from the core store: the `truth` table, its view, its named
queries, and fork detection judged per step against it.

A task that knows the role of every token (the demo's does, demo/task.py) writes, per recorded token, that role and
whether it was a decision point: `LOG_DIR/<run>/truth/*.parquet` with the columns of `TRUTH` (demo/truth.py writes
them). forkwatch never writes these itself; the view is empty when no run has them, so pages and queries may always
read it. A part that cannot be read is skipped with a warning, as the record tables' parts are.

The core store knows this module at one place: store/views.py creates the `truth` view with `create_view`. The
metrics themselves (AUROC, average precision, precision against its ceiling, the baselines) are
store/detector_metrics.py's, for any target.
"""

from __future__ import annotations

import logging
import os

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .detector_metrics import FLAG_RATE, step_metrics
from .run_folder import RunListing
from .run_meta import fork_fraction_of
from .schema import duckdb_type

logger = logging.getLogger(__name__)

# the named queries (the dashboard reaches them by name, dashboard/cache.py)
__all__ = ["detector_by_step", "detector_tokens", "truth_marks"]

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

# Two targets a detector is judged against: the task's consequential decisions, and every token where the outcome is
# decided (decisions, confident-consequential tokens and mistakes). Every recorded token of a step counts, tokens
# after a mistake as negatives.
TARGETS = {
    "decision": ("decision",),
    "consequential_or_mistake": ("decision", "confident_consequential", "mistake"),
}


# ---------------------------------------------------------------------------------------------------- the view


def truth_parts(folders: list[RunListing]) -> list[str]:
    """The readable truth parts of the listed run folders, with the columns of TRUTH (as DuckDB opens them)."""
    out = []
    for run in folders:
        loc = run.location
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


def create_view(con: duckdb.DuckDBPyConnection, folders: list[RunListing]) -> list[str]:
    """(Re)create the `truth` view over the truth parts of `folders` (empty, with TRUTH's columns, when there are
    none); returns the parts it reads."""
    parts = truth_parts(folders)
    if parts:
        files = ", ".join("'" + str(p).replace("'", "''") + "'" for p in parts)
        body = f"SELECT {', '.join(TRUTH.names)} FROM read_parquet([{files}], hive_partitioning=false)"
    else:
        body = "SELECT " + ", ".join(f"CAST(NULL AS {duckdb_type(f.type)}) AS {f.name}" for f in TRUTH) + " WHERE false"
    con.execute(f"CREATE OR REPLACE VIEW {TRUTH_VIEW} AS {body}")
    return parts


# ---------------------------------------------------------------------------------------------------- named queries


def truth_marks(con: duckdb.DuckDBPyConnection, run_id: str, step: int, completion_id: int) -> pd.DataFrame:
    """The ground-truth annotation of one completion, in position order; no rows when the run has none."""
    return con.execute(
        "SELECT position, is_decision, on_path FROM truth WHERE run_id = ? AND step = ? AND completion_id = ? "
        "ORDER BY position",
        [run_id, step, completion_id],
    ).df()


def detector_tokens(con: duckdb.DuckDBPyConnection, run_id: str) -> pd.DataFrame:
    """Every recorded token of `run_id` with its scores and its ground-truth role, in step order (no rows without a
    truth)."""
    return con.execute(
        """
        SELECT t.step, t.position, t.entropy, t.renyi2, t.group_js, x.role
        FROM tokens t JOIN truth x USING (run_id, step, completion_id, position)
        WHERE t.run_id = ? AND x.role IS NOT NULL
        ORDER BY t.step, t.completion_id, t.position
        """,
        [run_id],
    ).df()


def role_metrics(tokens: pd.DataFrame, *, rate: float = FLAG_RATE, seed: int = 0) -> pd.DataFrame:
    """`detector_metrics.step_metrics` of tokens carrying a ground-truth `role`, against each of TARGETS."""
    targets = tokens.assign(**{target: tokens["role"].isin(roles) for target, roles in TARGETS.items()})
    return step_metrics(targets, {t: t for t in TARGETS}, rate=rate, seed=seed)


def detector_by_step(con: duckdb.DuckDBPyConnection, run_id: str, *, rate: float | None = None) -> pd.DataFrame:
    """Per step, how well entropy, Rényi-2 and group-JS rank the run's TARGETS beside the baselines
    (`detector_metrics.step_metrics`; empty when the run has no ground truth). Precision is measured among the top
    `rate` of tokens: by default the run's own `fork_fraction` (run.json), the share forkwatch flagged as forks."""
    if rate is None:
        meta = con.execute("SELECT meta FROM runs WHERE run_id = ?", [run_id]).fetchone()
        rate = (fork_fraction_of(meta[0]) if meta else None) or FLAG_RATE
    return role_metrics(detector_tokens(con, run_id), rate=rate)
