"""SQL: one read-only statement over the views, run through the sandboxed connection; results as a table with a
CSV download; example queries one click away; errors shown as messages."""

from __future__ import annotations

import streamlit as st
from forkwatch.dashboard import cache, frame
from forkwatch.store.sandbox import DEFAULT_MAX_ROWS, DEFAULT_TIMEOUT_S
from forkwatch.store.views import VIEWS

# The example queries (label -> SQL), one click away. Each stays cheap on a 20M-token run: the token examples name
# their steps, so the row groups of other steps are skipped by their statistics (benchmarks/dashboard_bench.py times
# the heaviest).
EXAMPLES = {
    "Runs": "SELECT run_id, name, status, last_step, dropped, faults, faults_detail FROM runs",
    "Entropy per step": "SELECT run_id, step, entropy_mean, entropy_p90, renyi2_mean, group_js_mean, reward_mean\n"
    "FROM steps ORDER BY run_id, step",
    "Fork tokens, first 50 steps": "SELECT run_id, text, count(*) AS forks\nFROM token_text WHERE is_fork AND step < 50\n"
    "GROUP BY ALL ORDER BY forks DESC LIMIT 20",
    "Highest-entropy tokens of a step": "SELECT run_id, step, completion_id, position, text, entropy\n"
    "FROM token_text WHERE step = 0 ORDER BY entropy DESC LIMIT 20",
    "Reward by prompt": "SELECT run_id, prompt, count(*) AS n, avg(reward) AS reward\nFROM completions "
    "GROUP BY ALL ORDER BY n DESC LIMIT 20",
    "Entropy spectrum per step": "SELECT run_id, step, generate_subscripts(entropy_spectrum, 1) - 1 AS bin,\n"
    "       unnest(entropy_spectrum) AS tokens\nFROM steps ORDER BY run_id, step, bin",
    "Effective rank beside entropy": "SELECT run_id, step, entropy_mean, effective_rank_mean\nFROM steps WHERE "
    "effective_rank_mean IS NOT NULL ORDER BY run_id, step",
    "Fork roles per step, first 50 steps": "SELECT run_id, step, role, count(*) AS forks,\n"
    "       count(*) / sum(count(*)) OVER (PARTITION BY run_id, step) AS share\n"
    "FROM token_text WHERE is_fork AND step < 50 GROUP BY run_id, step, role ORDER BY run_id, step, forks DESC",
    "Probe tokens across steps": "SELECT p.run_id, p.probe_id, p.step, p.position, v.text, p.entropy\n"
    "FROM probes p LEFT JOIN vocab v USING (run_id, token_id)\nWHERE p.probe_id = 0 ORDER BY p.run_id, p.step, "
    "p.position",
}


def _use_example(sql: str) -> None:
    st.session_state["sql_text"] = sql
    st.session_state["sql_ran"] = sql


def _run_text() -> None:
    st.session_state["sql_ran"] = st.session_state.get("sql_text", "")


def render() -> None:
    st.title("SQL")
    log_dir, runs = frame.require_runs()
    live = runs.loc[runs["status"] == "running", "run_id"].tolist()
    if live:
        st.info(
            "Still being written: " + ", ".join(f"`{r}`" for r in live) + f". Queries see the parts on disk, "
            f"re-read every {cache.TTL_S} s (or on Reload)."
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
    result = cache.run_sql(log_dir, sql)
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
