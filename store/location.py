"""Where a log directory lives: a local folder or `s3://bucket/prefix`, resolved once to a pyarrow filesystem.

The writer, resume, run.json and every reader go through a `Location`, never through `pathlib` or `open`, so the
same code serves a disk and S3-compatible object storage. Paths inside a Location are plain strings on its
filesystem ("/abs/runs/r1/steps/part-...parquet" locally, "bucket/prefix/r1/steps/part-..." on S3).

Whole-or-absent writes (`put_whole`): a local file is written under a hidden temp name and renamed; an S3 object is
written by one upload, which S3 makes visible only once complete (a single PUT, or a multipart upload that becomes
visible at its completion), so no rename is needed. run.json is overwritten whole the same way.

S3 settings come from the standard AWS environment (so a training job configured for S3 needs nothing else):
credentials through the AWS SDK's default chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN,
AWS_PROFILE and ~/.aws files, instance roles); region from AWS_REGION or AWS_DEFAULT_REGION; the endpoint of an
S3-compatible server (MinIO, SeaweedFS, R2 ...) from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL. pyarrow does not read
the endpoint variables itself in every version, so they are passed explicitly (`endpoint_override`, `scheme`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

S3_PREFIX = "s3://"
# The log directory when none is given: `attach`'s default (plugin/config.py) and what the dashboard app reads
LOG_DIR_ENV = "FORKWATCH_LOG_DIR"
DEFAULT_LOG_DIR = "runs"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
# Uploads that fail are retried this many times in all, waiting 0.5 s, 1 s, 2 s ... between tries: a store that
# stays down costs the writer thread a few seconds per part, then the part is counted as dropped.
UPLOAD_TRIES = 3
UPLOAD_BACKOFF_S = 0.5
T = TypeVar("T")


class LogDirError(ValueError):
    """A log directory forkwatch cannot use (unknown scheme, malformed URL, unreachable bucket, bad credentials)."""


def check_log_dir(log_dir: object, option: str = "log_dir") -> str:
    """`log_dir` as a string when it names a local folder or `s3://bucket[/prefix]`; LogDirError otherwise.

    Any other scheme (gs://, http://, file://) and malformed s3 URLs (`s3:/b`, `s3://`) are refused: without this a
    string such as "gs://b/p" would silently become a local folder named "gs:"."""
    if isinstance(log_dir, os.PathLike):
        log_dir = os.fspath(log_dir)
    if not isinstance(log_dir, str) or not log_dir:
        raise LogDirError(f"{option}={log_dir!r}: pass a folder path (log_dir='runs') or an S3 URL "
                          "(log_dir='s3://bucket/prefix')")
    if log_dir.startswith(S3_PREFIX):
        bucket = log_dir[len(S3_PREFIX):].split("/", 1)[0]
        if not bucket or not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise LogDirError(f"{option}={log_dir!r}: not a valid S3 URL; write s3://bucket/prefix (bucket names are "
                              "3-63 lowercase letters, digits, '.' or '-')")
        if "//" in log_dir[len(S3_PREFIX):].rstrip("/"):
            raise LogDirError(f"{option}={log_dir!r}: empty path segment ('//') in the S3 prefix; write "
                              "s3://bucket/prefix")
        return log_dir
    m = _SCHEME.match(log_dir)
    if m is not None and not _WINDOWS_DRIVE.match(log_dir):
        scheme = m[1].lower()
        fix = ("write s3://bucket/prefix (two slashes)" if scheme == "s3" else
               "forkwatch writes to local folders and to S3 (s3://bucket/prefix, any S3-compatible server via "
               "AWS_ENDPOINT_URL); use a local folder or an S3 URL")
        raise LogDirError(f"{option}={log_dir!r}: unsupported scheme {scheme + ':'!r}; {fix}")
    return log_dir


def default_log_dir() -> str:
    """`FORKWATCH_LOG_DIR` when set (checked like a log_dir, the error naming the variable), else "runs"."""
    value = os.environ.get(LOG_DIR_ENV)
    return check_log_dir(value, LOG_DIR_ENV) if value else DEFAULT_LOG_DIR


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3FileSystem configured from the standard AWS environment (see the module docstring)."""
    kwargs: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        kwargs["endpoint_override"] = host.rstrip("/") if scheme else endpoint.rstrip("/")
        kwargs["scheme"] = scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs["region"] = region or "us-east-1"
    return pafs.S3FileSystem(
        **kwargs,
        # fail fast on an unreachable server: the writer retries on its own, with a bound (UPLOAD_TRIES)
        connect_timeout=5, request_timeout=30,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
        allow_bucket_creation=False, allow_bucket_deletion=False,
    )


@dataclass(frozen=True)
class Location:
    """A log directory resolved to a filesystem and the root path of the log directory on it."""

    fs: pafs.FileSystem
    root: str
    url: str  # as the user wrote it, canonical: an absolute local path or s3://bucket/prefix

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts]) if parts else self.root

    def display(self, path: str) -> str:
        """A path of this location as a user would write it (s3://... on S3)."""
        return path if self.is_local else S3_PREFIX + path

    def exists(self) -> bool:
        """True when the log directory is there (a local folder; on S3 any prefix of a reachable bucket)."""
        if self.is_local:
            return Path(self.root).is_dir()
        return self.fs.get_file_info(self.root.split("/", 1)[0]).type == pafs.FileType.Directory

    # ------------------------------------------------------------ reading

    def entries(self, path: str) -> list[pafs.FileInfo]:
        """What is directly under `path`, sorted by name ([] when it does not exist)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(infos, key=lambda i: i.base_name)

    def is_file(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def read_json(self, path: str) -> Any:
        """The parsed JSON file at `path`, or None when there is none. Raises OSError/ValueError when unreadable."""
        try:
            return json.loads(self.read_bytes(path))
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------ writing

    def put_whole(self, path: str, data: bytes | pa.Buffer) -> None:
        """Write `data` at `path` so that readers see the old content, or all of the new one, never a part."""
        if self.is_local:
            tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp"
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                with open(tmp, "wb") as f:
                    f.write(memoryview(data))
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            return
        with self.fs.open_output_stream(path) as f:  # one upload: visible whole at its completion, or not at all
            f.write(data)

    def move(self, src: str, dst: str) -> None:
        """Move one file (a rename on disk; copy then delete on S3, which has no rename)."""
        if self.is_local:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
        else:
            self.fs.copy_file(src, dst)
            self.fs.delete_file(src)

    def probe(self) -> None:
        """Check that the log directory can be written: write and delete a small object. LogDirError when not."""
        if self.is_local:
            return  # a local folder is created by the writer; its errors are counted there
        probe = self.path(f".forkwatch-probe-{uuid.uuid4().hex[:12]}")
        try:
            self.put_whole(probe, b"forkwatch write check")
            self.fs.delete_file(probe)
        except Exception as e:
            raise LogDirError(
                f"log_dir={self.url!r}: cannot write there ({_one_line(e)}). Check the bucket exists, the "
                "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and, for an S3-compatible "
                "server, AWS_ENDPOINT_URL"
            ) from None


def resolve(log_dir: str | os.PathLike[str] | Location) -> Location:
    """The Location of a log directory given as a local path or s3://bucket/prefix (see `check_log_dir`)."""
    if isinstance(log_dir, Location):
        return log_dir
    text = check_log_dir(log_dir)
    if text.startswith(S3_PREFIX):
        root = text[len(S3_PREFIX):].rstrip("/")
        return Location(s3_filesystem(), root, S3_PREFIX + root)
    root = os.path.realpath(text)
    return Location(pafs.LocalFileSystem(), root, root)


def with_retries(action: Callable[[], T], *, tries: int = UPLOAD_TRIES, backoff_s: float = UPLOAD_BACKOFF_S) -> T:
    """`action()`, tried up to `tries` times with doubling waits between tries; the last error is raised."""
    for attempt in range(tries):
        try:
            return action()
        except Exception:
            if attempt == tries - 1:
                raise
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def fsspec_filesystem(loc: Location):
    """The Location's filesystem as an fsspec filesystem (protocol "s3"), for DuckDB's `register_filesystem`.

    Through fsspec's own wrapper, DuckDB read garbled bytes from parts with several row groups once their footers
    were cached ("TProtocolException: Invalid data" / "Exceeded size limit"; tests/store/test_store_s3.py reproduces it):
    DuckDB positions a handle with seek() and may read one handle from several threads, and the wrapper keeps one
    position per handle. Here the position is per thread and every read is positional (`read_at`), so no read
    depends on what another did to the handle."""
    import threading

    from fsspec.implementations.arrow import ArrowFile, ArrowFSWrapper

    class PositionalFile(ArrowFile):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._local = threading.local()
            self._size = self.stream.size()

        def tell(self) -> int:
            return getattr(self._local, "pos", 0)

        def seek(self, offset: int, whence: int = 0) -> int:
            base = {0: 0, 1: self.tell(), 2: self._size}[whence]
            self._local.pos = base + offset
            return self._local.pos

        def read(self, length: int = -1) -> bytes:
            pos = self.tell()
            n = self._size - pos if length is None or length < 0 else min(length, self._size - pos)
            data = self.stream.read_at(max(n, 0), pos) if n > 0 else b""
            self._local.pos = pos + len(data)
            return data

    class PositionalArrowFS(ArrowFSWrapper):
        def _open(self, path, mode="rb", block_size=None, seekable=True, **kwargs):
            if mode != "rb":
                return super()._open(path, mode, block_size=block_size, seekable=seekable, **kwargs)
            stream = self.fs.open_input_file(self._strip_protocol(path))
            return PositionalFile(self, stream, path, mode, block_size, **kwargs)

    return PositionalArrowFS(loc.fs)
