"""The selected runs and step, kept in the URL so a view can be shared (and in the session, since a page switch
drops the URL's query)."""

from __future__ import annotations

import streamlit as st


def selected_runs(available: list[str]) -> list[str]:
    """The runs chosen in the URL (`?run=a&run=b`), else the last choice of this browser tab, else the first run."""
    chosen = [r for r in st.query_params.get_all("run") if r in available]
    if not chosen:
        chosen = [r for r in st.session_state.get("fw_runs", []) if r in available]
    if not chosen and available:
        chosen = available[:1]
    return chosen


def set_runs(run_ids: list[str]) -> None:
    st.session_state["fw_runs"] = list(run_ids)
    st.query_params["run"] = list(run_ids)


def selected_step(available: list[int]) -> int | None:
    """The step in the URL (`?step=12`) when the run has it, else the last one chosen, else the run's last step."""
    for raw in (st.query_params.get("step"), st.session_state.get("fw_step")):
        try:
            if raw is not None and int(raw) in available:
                return int(raw)
        except ValueError:
            pass
    return available[-1] if available else None


def set_step(step: int | None) -> None:
    st.session_state["fw_step"] = step
    if step is None:
        st.query_params.pop("step", None)
    else:
        st.query_params["step"] = str(step)
