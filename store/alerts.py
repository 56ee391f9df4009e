"""Alerts where the user looks: one JSON POST per new warning or alarm to a webhook, with what fired, its evidence,
the recommended action with its source and a link to the run's dashboard page when a dashboard URL is configured.

The body is Slack-compatible (`text`: the flag as `Flag.describe_lines()` words it) and generic (every field
apart: run, step, kind, rule, severity, evidence, action, link). During training it is sent from the writer's
thread (store/writer.py, `RunWriter.alert`), never from the training thread, with the standard library's HTTP
client, a short timeout and a bounded number of tries; a send that fails is counted in the run's `Ledger`, logged
once, and shown in run.json (`alerts`), `forkwatch runs` and `forkwatch check`. It is never raised into training.
Once a send has used up its tries, the next ones get one try each until one gets through, so that an endpoint
that is down costs the writer seconds, not minutes. `forkwatch check --alert URL` sends the same bodies for a run
that is finished or imported.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, urlsplit

logger = logging.getLogger(__name__)

WEBHOOK_ENV = "FORKWATCH_ALERT_WEBHOOK"
DASHBOARD_ENV = "FORKWATCH_DASHBOARD_URL"
TIMEOUT_S = 3.0  # per try: an endpoint slower than this is treated as down
TRIES = 3
BACKOFF_S = 0.5  # before the second try; doubled before each later one


def check_url(url: Any, option: str) -> None:
    """Raise ValueError unless `url` is an http(s) URL with a host (what a webhook or a dashboard address is)."""
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise ValueError(f"{option}={url!r}: pass an http(s) URL with a host, e.g. "
                         "'https://hooks.slack.com/services/...' or 'http://127.0.0.1:8501', or None")
    try:
        parts.port  # noqa: B018 (a malformed port raises here)
    except ValueError:
        raise ValueError(f"{option}={url!r}: the port is not a number") from None


def redact(url: str | None) -> str | None:
    """A webhook URL as run.json keeps it: its scheme and host only (the path of a chat webhook is its secret)."""
    if not url:
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{'' if parts.port is None else f':{parts.port}'}/…"


def run_link(dashboard_url: str, run_id: str, step: int) -> str:
    """The run's Entropy page at the flag's step (the dashboard reads `run` and `step` from the URL)."""
    return f"{dashboard_url.rstrip('/')}/entropy?run={quote(run_id, safe='')}&step={int(step)}"


def _plain(value: Any) -> Any:
    """JSON without NaN or ±inf (they are not JSON): a non-finite number becomes its text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def payload(flag: Any, *, run_id: str, run_name: str | None = None, dashboard_url: str | None = None) -> dict[str, Any]:
    """The body of one alert: `text` for chat webhooks (Slack, Mattermost, ...), and the same facts as fields."""
    link = run_link(dashboard_url, run_id, flag.fired_at) if dashboard_url else None
    name = run_name or run_id
    lines = flag.describe_lines()
    text = f"forkwatch {flag.severity} on run {name}: {lines[0]}\n" + "\n".join(lines[1:])
    if link:
        text += f"\n{link}"
    return _plain({
        "text": text,
        "source": "forkwatch",
        "run_id": run_id,
        "run_name": name,
        "step": flag.fired_at,
        "kind": flag.kind,
        "rule": flag.rule,
        "severity": flag.severity,
        "message": flag.message,
        "evidence": list(flag.evidence),
        "at_flag": dict(flag.supporting),
        "action": {"text": flag.action, "source": flag.action_source},
        "link": link,
    })


def post(url: str, body: dict[str, Any], *, timeout: float = TIMEOUT_S, tries: int = TRIES,
         backoff: float = BACKOFF_S) -> str | None:
    """POST `body` as JSON; retry a refused connection, a timeout, a 429 or a 5xx answer up to `tries` times in all.
    -> None when the endpoint answered 2xx, else what went wrong (the last try's error)."""
    from forkwatch import __version__

    data = json.dumps(body, allow_nan=False).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": f"forkwatch/{__version__}"})
    error = "not tried"
    for attempt in range(max(1, tries)):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read()
                return None
        except urllib.error.HTTPError as e:
            error = f"HTTP {e.code} {e.reason}"
            if e.code != 429 and e.code < 500:
                return error  # the endpoint refuses this body: trying again changes nothing
        except (urllib.error.URLError, OSError) as e:  # refused, unreachable, timed out (TimeoutError is an OSError)
            error = str(getattr(e, "reason", e)) or type(e).__name__
    return error


class AlertSink:
    """One run's sender, used on the writer's thread: `send(flag)` posts one alert and counts it in `ledger`
    (`alert_sent` / `alert_failed`), never raises."""

    def __init__(self, url: str, *, run_id: str, ledger: Any, dashboard_url: str | None = None,
                 timeout: float | None = None, tries: int | None = None, backoff: float | None = None) -> None:
        check_url(url, "alert_webhook")
        if dashboard_url is not None:
            check_url(dashboard_url, "dashboard_url")
        self.url, self.run_id, self.ledger, self.dashboard_url = url, run_id, ledger, dashboard_url
        # the module's bounds unless given (read here, so that a test can shorten them for a whole run)
        self.timeout = TIMEOUT_S if timeout is None else timeout
        self.tries = TRIES if tries is None else tries
        self.backoff = BACKOFF_S if backoff is None else backoff
        self._down = False  # the last send used up its tries: the next ones get one each until one gets through

    def send(self, flag: Any, run_name: str | None = None) -> bool:
        try:
            body = payload(flag, run_id=self.run_id, run_name=run_name, dashboard_url=self.dashboard_url)
            error = post(self.url, body, timeout=self.timeout, tries=1 if self._down else self.tries,
                         backoff=self.backoff)
        except Exception as e:  # (the boundary of an alert) a bug in building the body: counted like a failed send
            error = repr(e)
        self._down = error is not None
        if error is None:
            self.ledger.alert_sent()
            return True
        self.ledger.alert_failed(f"forkwatch: alert for {flag.rule} at step {flag.fired_at} not sent to "
                                 f"{redact(self.url)}: {error}")
        return False


def from_environment() -> str | None:
    """The webhook of `$FORKWATCH_ALERT_WEBHOOK`, when set (the default of `alert_webhook`)."""
    return os.environ.get(WEBHOOK_ENV) or None


def dashboard_from_environment() -> str | None:
    """The dashboard address of `$FORKWATCH_DASHBOARD_URL`, when set (the default of `dashboard_url`)."""
    return os.environ.get(DASHBOARD_ENV) or None
