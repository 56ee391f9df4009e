"""The Forks page where fork value was measured (table fork_values): the measured positions marked in the token view
with their value next to entropy, the scatter of entropy against fork value per step, and the detector table against
this truth; and what it says for a run without fork values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from forkwatch.dashboard.launch import LOG_DIR_ENV
from synthetic import write_fork_values, write_run

pytest.importorskip("streamlit.testing.v1")
from streamlit.testing.v1 import AppTest  # noqa: E402

VALUES = {0: 0.3, 1: 0.0, 2: 0.02, 3: 0.2, 5: 0.01}  # position -> fork value, completion 8 of step 1


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dash_value")
    write_run(d, "valued", "healthy", n_steps=4, token_steps=2)  # 8 completions per step: step 1 holds ids 8..15
    write_fork_values(d, "valued", step=1, completion_id=8, values=VALUES)
    write_run(d, "plain", "healthy", n_steps=4, token_steps=2)
    return d


@pytest.fixture(scope="module", autouse=True)
def _close_cached_connections():
    yield
    import gc

    import streamlit as st

    st.cache_resource.clear()
    st.cache_data.clear()
    gc.collect()


def values(v) -> list:
    """A plotly array from a figure's JSON: a list, or numpy data encoded as {'dtype', 'bdata'}."""
    if isinstance(v, dict) and "bdata" in v:
        import base64

        import numpy as np

        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist()
    return list(v)


def forks_page(monkeypatch, log_dir: Path, **params: str) -> AppTest:
    monkeypatch.setenv(LOG_DIR_ENV, str(log_dir))
    at = AppTest.from_string("from forkwatch.dashboard import page_forks\npage_forks.render()\n", default_timeout=60)
    for k, v in params.items():
        at.query_params[k] = v
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_measured_positions_are_marked_with_their_value_next_to_entropy(monkeypatch, log_dir):
    at = forks_page(monkeypatch, log_dir, run="valued", step="1", completion="8")
    view = next(h.proto.body for h in at.get("html") if "fw-value-view" in h.proto.body)
    assert view.count('class="fw-value"') == len(VALUES)  # every measured position, and only those
    assert "fork value 0.300 ± 0.020" in view and "entropy " in view and "Q(sampled) 0.500" in view
    assert view.count("outline:2px") == 2  # the two consequential positions (0.3, 0.2)
    table = next(d.value for d in at.dataframe if "Q(best)" in d.value.columns)
    assert sorted(table["position"]) == sorted(VALUES) and table["entropy"].notna().all()
    assert table.set_index("position").loc[0, "Q(best)"] == pytest.approx(1.1)


def test_the_scatter_and_the_detector_table_judge_the_scores_against_fork_value(monkeypatch, log_dir):
    at = forks_page(monkeypatch, log_dir, run="valued", step="1", completion="8")
    scatter = next(json.loads(f.proto.spec) for f in at.get("plotly_chart")
                   if json.loads(f.proto.spec)["layout"].get("yaxis", {}).get("title", {}).get("text")
                   == "fork value (reward units)")
    by_name = {t["name"]: values(t["y"]) for t in scatter["data"]}
    assert sorted(by_name["consequential"]) == pytest.approx([0.2, 0.3])
    assert sorted(by_name["not"]) == pytest.approx([0.0, 0.01, 0.02])
    table = next(d.value for d in at.dataframe if "predictor" in d.value.columns)
    assert {"entropy", "renyi2", "position", "lexical"} <= set(table["predictor"])
    assert table["positions"].eq(len(VALUES)).all() and table["auroc"].between(0, 1).all()
    assert "5 positions measured" in " ".join(c.value for c in at.caption) and "2 consequential" in \
        " ".join(c.value for c in at.caption)


def test_a_run_without_fork_values_says_how_to_measure_them(monkeypatch, log_dir):
    at = forks_page(monkeypatch, log_dir, run="plain")
    info = " ".join(i.value for i in at.info)
    assert "no fork value measured" in info and "forkwatch forkvalue LOG_DIR/plain" in info
