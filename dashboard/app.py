"""The forkwatch dashboard: `streamlit run app.py -- LOG_DIR` (what `forkwatch dashboard LOG_DIR` runs).

Five pages, each a file next to this one so that they can be opened and tested on their own: Runs, Entropy,
Forks, Law, SQL. The log directory comes from the command line or from FORKWATCH_LOG_DIR.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import streamlit as st
from forkwatch.dashboard import data

HERE = Path(__file__).parent

# `streamlit run app.py -- LOG_DIR` puts LOG_DIR in sys.argv[1]; under a test runner argv is someone else's.
if len(sys.argv) > 1 and Path(sys.argv[0]).resolve() == Path(__file__).resolve():
    os.environ[data.LOG_DIR_ENV] = str(Path(sys.argv[1]).resolve())

st.set_page_config(page_title="forkwatch", page_icon="🍴", layout="wide")

RUNS = st.Page(HERE / "page_runs.py", title="Runs", icon="🏁", url_path="runs")


def _root() -> None:
    """The root URL: Streamlit serves its default page there and nowhere else (so `/runs` would be "Page not
    found"); instead the root forwards to the Runs page at its own address, keeping the query (`?run=...`)."""
    st.switch_page(RUNS, query_params={k: st.query_params.get_all(k) for k in st.query_params})


PAGES = [
    st.Page(_root, title="forkwatch", url_path="home", default=True, visibility="hidden"),
    RUNS,
    st.Page(HERE / "page_entropy.py", title="Entropy", icon="📉", url_path="entropy"),
    st.Page(HERE / "page_forks.py", title="Forks", icon="🍴", url_path="forks"),
    st.Page(HERE / "page_law.py", title="Law", icon="📐", url_path="law"),
    st.Page(HERE / "page_sql.py", title="SQL", icon="🔎", url_path="sql"),
]
page = st.navigation(PAGES)

with st.sidebar:
    st.caption(f"log directory: `{data.log_dir() or '(none)'}`")
    if st.button("Reload", key="app_reload", help=f"Re-read the log directory now (it is re-read every {data.TTL_S} s)"):
        data.reload()

page.run()
