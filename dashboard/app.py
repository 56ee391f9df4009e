"""The forkwatch dashboard (what `forkwatch dashboard LOG_DIR` serves; the log directory comes in the environment
variable FORKWATCH_LOG_DIR, see launch.py).

Five pages, each a `render` function in a module of its own (page_<name>.py, with its figures) so that it can be
opened and tested alone: Runs, Entropy, Forks, Law, SQL. Importing a page draws nothing; `st.navigation` runs the
chosen one. What pages share: frame.py (the preamble, the URL's state, the flag marks), cache.py (the one cached
way to the store's named queries), token_html.py (the Forks page's token view).
"""

from __future__ import annotations

import streamlit as st
from forkwatch.dashboard import cache, page_entropy, page_forks, page_law, page_runs, page_sql

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

with st.sidebar:
    st.caption(f"log directory: `{cache.log_dir() or '(none)'}`")
    if st.button("Reload", key="app_reload", help=f"Re-read the log directory now (it is re-read every {cache.TTL_S} s)"):
        cache.reload()

page.run()
