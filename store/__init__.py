"""forkwatch's storage: Parquet parts per run (written by `RunWriter`), DuckDB views over them (`connect`), a
sandboxed connection for untrusted SQL (`open_sandboxed`), and the named queries (`forkwatch.store.queries`).

Never imports torch, transformers or trl: the CLI's `sql`/`runs` and the dashboard load only this.
"""

from __future__ import annotations

from .sandbox import SandboxedConnection, SandboxError, open_sandboxed
from .schema import READABLE_VERSIONS, SCHEMA_VERSION, TABLES, SchemaVersionError
from .views import VIEWS, connect, read_part, refresh_views
from .writer import DEFAULT_STAT_MANTISSA_BITS, RunWriter, stat_relative_tolerance

__all__ = [
    "DEFAULT_STAT_MANTISSA_BITS",
    "READABLE_VERSIONS",
    "SCHEMA_VERSION",
    "TABLES",
    "VIEWS",
    "RunWriter",
    "SandboxError",
    "SandboxedConnection",
    "SchemaVersionError",
    "connect",
    "open_sandboxed",
    "read_part",
    "refresh_views",
    "stat_relative_tolerance",
]
