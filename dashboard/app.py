"""The forkwatch dashboard (what `forkwatch dashboard LOG_DIR` serves; the log directory comes in the environment
variable FORKWATCH_LOG_DIR, see launch.py).

Five pages, each a `render` function in a module of its own (page_<name>.py, with its figures) so that it can be
opened and tested alone: Runs, Entropy, Forks, Law, SQL. Importing a page draws nothing; `st.navigation` runs the
chosen one. What pages share: frame.py (the preamble, the URL's state, the flag marks), cache.py (the one cached
way to the store's named queries), token_html.py (the Forks page's token view). Above every page, the launcher's
status when it gave one (launch.py, `STATUS_ENV`: the demo's warm-up and training progress).
"""

from __future__ import annotations

import json
import os

import streamlit as st
from forkwatch.dashboard import cache, launch, page_entropy, page_forks, page_law, page_runs, page_sql

st.set_page_config(page_title="forkwatch", page_icon="🍴", layout="wide")

RUNS = st.Page(page_runs.render, title="Runs", icon="🏁", url_path="runs")


def _root() -> None:
    """The root URL: Streamlit serves its default page there and nowhere else (so `/runs` would be "Page not
    found"); instead the root forwards to the Runs page at its own address, keeping the query (`?run=...`)."""
    st.switch_page(RUNS, query_params={k: st.query_params.get_all(k) for k in st.query_params})


PAGES = [
    st.Page(_root, title="forkwatch", url_path="home", default=True, visibility="hidden"),
    RUNS,
    st.Page(page_entropy.render, title="Entropy", icon="📉", url_path="entropy"),
    st.Page(page_forks.render, title="Forks", icon="🍴", url_path="forks"),
    st.Page(page_law.render, title="Law", icon="📐", url_path="law"),
    st.Page(page_sql.render, title="SQL", icon="🔎", url_path="sql"),
]
page = st.navigation(PAGES)
LIVE_EVERY_S = 3  # while the launcher is at work: how often its status is read and, when it changed, the page redrawn


@st.fragment(run_every=LIVE_EVERY_S if os.environ.get(launch.STATUS_ENV) else None)
def _launcher_status() -> None:
    """The launcher's status line; when it changed since this session last drew it, re-read the log directory and
    redraw the whole page, so that a run being written grows on screen without a click."""
    status = launch.read_status(os.environ.get(launch.STATUS_ENV))
    now = json.dumps(status, sort_keys=True)
    changed = st.session_state.get("app_status_seen", now) != now
    st.session_state["app_status_seen"] = now
    if status is not None and status.get("active"):
        progress = status.get("progress")
        if isinstance(progress, int | float):
            st.progress(min(1.0, max(0.0, float(progress))), text=status["text"])
        else:
            st.info(status["text"])
    if changed:
        cache.reload()
        st.rerun()


_launcher_status()

with st.sidebar:
    st.caption(f"log directory: `{cache.log_dir() or '(none)'}`")
    if st.button("Reload", key="app_reload", help=f"Re-read the log directory now (it is re-read every {cache.TTL_S} s)"):
        cache.reload()

page.run()
