"""A real HTTP server on 127.0.0.1 (a free port) that plays a webhook for the alert tests: it records every body it
receives, and answers as told — 200, a status code (500: a failing endpoint), or only after a delay (a slow one).

    with WebhookServer() as hook:          # started on enter, stopped (and its thread joined) on exit
        hook.url                           # http://127.0.0.1:<port>/hook
        hook.status, hook.delay_s = 500, 0 # how the next requests are answered
        hook.bodies                        # the JSON bodies received, in order
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WebhookServer:
    def __init__(self, *, status: int = 200, delay_s: float = 0.0) -> None:
        self.status, self.delay_s = status, delay_s
        self.bodies: list[dict] = []
        self.requests = 0  # every POST, answered or not
        self._lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                with hook._lock:
                    hook.requests += 1
                if hook.delay_s:
                    time.sleep(hook.delay_s)
                if hook.status == 200:
                    with hook._lock:
                        hook.bodies.append(json.loads(raw))
                self.send_response(hook.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def __enter__(self) -> WebhookServer:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)


def dead_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (a port taken and released: a refused connection)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"
