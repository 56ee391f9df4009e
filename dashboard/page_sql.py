"""SQL: one read-only statement over the views, run through the sandboxed connection; results as a table with a
CSV download; example queries one click away; errors shown as messages."""

from __future__ import annotations

import streamlit as st
from forkwatch.dashboard import cached_queries, page_frame
from forkwatch.dashboard.sql_examples import EXAMPLES
from forkwatch.store.sandbox import DEFAULT_MAX_ROWS, DEFAULT_TIMEOUT_S
from forkwatch.store.views import VIEWS


def _use_example(sql: str) -> None:
    st.session_state["sql_text"] = sql
    st.session_state["sql_ran"] = sql


def _run_text() -> None:
    st.session_state["sql_ran"] = st.session_state.get("sql_text", "")


def render() -> None:
    st.title("SQL")
    log_dir, runs = page_frame.require_runs()
    live = runs.loc[runs["status"] == "running", "run_id"].tolist()
    if live:
        st.info(
            "Still being written: " + ", ".join(f"`{r}`" for r in live) + f". Queries see the parts on disk, "
            f"re-read every {cached_queries.TTL_S} s (or on Reload)."
        )
    st.caption(
        f"One read-only SELECT over the views {', '.join(VIEWS)}; at most {DEFAULT_MAX_ROWS:,} rows, "
        f"{DEFAULT_TIMEOUT_S:g} s."
    )
    cols = st.columns(len(EXAMPLES))
    for i, (col, (label, sql)) in enumerate(zip(cols, EXAMPLES.items(), strict=True)):
        col.button(label, key=f"sql_example_{i}", on_click=_use_example, args=(sql,), width="stretch")
    st.text_area("SQL", key="sql_text", height=150, placeholder="SELECT step, entropy_mean FROM steps")
    st.button("Run", key="sql_run", type="primary", on_click=_run_text)
    sql = st.session_state.get("sql_ran", "").strip()
    if not sql:
        st.info("Write a query or pick an example.")
        return
    result = cached_queries.run_sql(log_dir, sql)
    if result.error is not None:
        st.error(result.error)
        return
    df = result.frame
    note = f" (cut at {DEFAULT_MAX_ROWS:,})" if result.truncated else ""
    st.caption(f"{len(df):,} row(s){note}")
    st.dataframe(df, hide_index=True, width="stretch", key="sql_result")
    st.download_button(
        "Download CSV", df.to_csv(index=False).encode(), file_name="forkwatch_query.csv", mime="text/csv",
        key="sql_download",
    )  # fmt: skip
