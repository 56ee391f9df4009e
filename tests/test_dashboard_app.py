"""Every dashboard page under Streamlit's AppTest: widgets and charts present, the URL keeps the selection, and
the error paths (no log dir, empty dir, run without steps, run still being written, bad SQL) say so plainly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from forkwatch.dashboard.launch import LOG_DIR_ENV
from synthetic import write_run, write_sample_runs

pytest.importorskip("streamlit.testing.v1")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dash")
    write_sample_runs(d, n_steps=40, token_steps=4)
    write_run(d, "fresh", "healthy", n_steps=0, status=None)  # no steps yet, still being written
    write_run(d, "live", "healthy", n_steps=12, token_steps=1, status=None)
    return d


@pytest.fixture(scope="module", autouse=True)
def _close_cached_connections():
    yield
    # The cached DuckDB connections would otherwise live until interpreter exit (and DuckDB complains there).
    import gc

    import streamlit as st

    st.cache_resource.clear()
    st.cache_data.clear()
    gc.collect()


def app(monkeypatch, log_dir: Path | str, page: str | None = None, **params: str | list[str]) -> AppTest:
    """The whole app (its default page, Runs), or one page's `render` run alone, as st.navigation runs it."""
    monkeypatch.setenv(LOG_DIR_ENV, str(log_dir))
    if page is None:
        at = AppTest.from_file(str(APP), default_timeout=60)
    else:
        module = page.removesuffix(".py")
        at = AppTest.from_string(f"from forkwatch.dashboard import {module}\n{module}.render()\n", default_timeout=60)
    for k, v in params.items():
        at.query_params[k] = v
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.mark.parametrize("page", ["page_runs", "page_entropy", "page_forks", "page_law", "page_sql"])
def test_importing_a_page_draws_nothing(monkeypatch, log_dir, page):
    monkeypatch.setenv(LOG_DIR_ENV, str(log_dir))
    name = f"forkwatch.dashboard.{page}"
    # executed afresh (not a module cached by an earlier test), inside a Streamlit script run
    script = f"import importlib, sys\nsys.modules.pop({name!r}, None)\nimportlib.import_module({name!r})\n"
    at = AppTest.from_string(script, default_timeout=60).run()
    assert not at.exception and not at.main.children and not at.sidebar.children


def figures(at: AppTest) -> list[dict]:
    return [json.loads(e.proto.spec) for e in at.get("plotly_chart")]


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def test_runs_page_lists_every_run_with_a_health_badge(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir)
    assert at.title[0].value == "Runs"
    table = at.dataframe[0].value
    assert set(table["run"]) == {"collapse", "healthy", "explosion", "fresh", "live"}
    health = dict(zip(table["run"], table["health"], strict=True))
    assert "collapse" in health["collapse"] and "explosion" in health["explosion"]
    assert "healthy" in health["healthy"] and "too few steps" in health["fresh"]
    assert {"steps", "tokens", "selection", "status"} <= set(table.columns)
    assert at.multiselect(key="runs_pick").value == ["collapse"]


def test_runs_page_warns_about_a_run_with_faults_naming_rank_and_place(monkeypatch, tmp_path):
    from forkwatch.store import RunWriter
    from forkwatch.store.ledger import Ledger

    write_run(tmp_path, "faulty", "healthy", n_steps=12, token_steps=1)
    ledger = Ledger()
    with ledger.guard("records"):
        raise RuntimeError("injected")
    RunWriter(tmp_path, "faulty", rank=1, world_size=2, ledger=ledger).close()
    at = app(monkeypatch, tmp_path)
    assert dict(zip(at.dataframe[0].value["run"], at.dataframe[0].value["faults"], strict=True)) == {"faulty": 1}
    assert "Run `faulty`: 1 recording fault(s) — rank 1: records 1" in texts(at.warning)


def test_choosing_runs_puts_them_in_the_url(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir)
    at.multiselect(key="runs_pick").set_value(["healthy", "explosion"]).run()
    assert at.query_params["run"] == ["healthy", "explosion"]
    assert "explosion.mean" in texts(at.markdown)  # the flag's evidence is drawn under the chosen run


def test_entropy_page_overlays_runs_and_marks_flags(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir, "page_entropy.py", run=["collapse", "healthy"])
    assert at.multiselect(key="entropy_runs").value == ["collapse", "healthy"]
    [fig] = figures(at)
    names = {t.get("name") for t in fig["data"]}
    assert {"collapse entropy", "healthy entropy", "collapse health flags"} <= names
    flags = next(t for t in fig["data"] if t.get("name") == "collapse health flags")
    assert "collapse.mean" in flags["text"] and "evidence: steps" in flags["hovertext"][0]
    assert any(s.get("type") == "line" for s in fig["layout"]["shapes"])  # the vertical markers
    assert "collapse.mean" in set(at.dataframe[0].value["rule"])


def test_entropy_page_says_when_a_run_has_no_steps_or_is_live(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir, "page_entropy.py", run=["fresh", "live"])
    assert "`fresh` has no steps yet" in texts(at.warning)
    assert "`live` is still being written" in texts(at.info)
    assert len(figures(at)) == 1


def test_forks_page_shows_the_token_view_with_values_and_alternatives(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir, "page_forks.py", run="collapse", step="2")
    assert at.query_params["step"] == "2"
    assert at.radio(key="forks_stat").options == ["entropy", "renyi2", "group_js", "logprob"]
    view = next(h.proto.body for h in at.get("html") if "fw-tokens" in h.proto.body)
    assert 'class="fw-token' in view and "fw-grad" in view and "fw-fork" in view
    assert "entropy " in view and "logprob " in view and "alternatives (top-k):" in view
    assert len(figures(at)) == 3  # prompt across steps, top fork texts, their trend


def test_forks_page_colours_by_the_chosen_stat(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir, "page_forks.py", run="collapse")
    at.radio(key="forks_stat").set_value("logprob").run()
    assert any('data-stat="logprob"' in h.proto.body for h in at.get("html"))


def test_forks_page_finds_a_prompt_and_follows_it(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir, "page_forks.py", run="healthy")
    at.radio(key="forks_mode").set_value("prompt").run()
    at.text_input(key="forks_prompt_query").input("1 + 2").run()
    assert at.selectbox(key="forks_prompt").value == "What is 1 + 2?"
    completion = at.selectbox[-1]
    assert completion.key.startswith("forks_completion_")
    assert "What is 1 + 2?" in completion.format_func(completion.value)
    at.text_input(key="forks_prompt_query").input("no such prompt").run()
    assert "No prompt of run `healthy` contains" in texts(at.warning)


def test_forks_page_says_when_a_run_has_no_token_records(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir, "page_forks.py", run="fresh")
    assert "no completion or token records yet" in texts(at.info)
    assert "`fresh` has no steps yet" in texts(at.warning)


def test_forks_and_sql_pages_say_when_a_run_is_still_being_written(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir, "page_forks.py", run="live")
    assert "`live` is still being written" in texts(at.info)
    assert any("fw-tokens" in h.proto.body for h in at.get("html"))  # what is on disk is shown
    at = app(monkeypatch, log_dir, "page_sql.py")
    assert "Still being written: `fresh`, `live`" in texts(at.info)


def test_law_page_shows_the_fit_or_the_reason(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir, "page_law.py", run=["collapse", "healthy"])
    assert at.metric[0].label == "ceiling b − a"
    assert "No fit shown:" in texts(at.warning)  # the noisy run
    [fig] = figures(at)
    assert any(str(t.get("name", "")).startswith("collapse fit: R =") for t in fig["data"])
    assert at.slider(key="law_fraction").value == 1.0


def test_sql_page_runs_an_example_and_offers_csv(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir, "page_sql.py")
    at.button(key="sql_example_0").click().run()
    assert "FROM runs" in at.text_area(key="sql_text").value
    assert set(at.dataframe[0].value["run_id"]) >= {"collapse", "healthy"}
    assert at.get("download_button")


@pytest.mark.parametrize(
    ("sql", "message"),
    [("SELECT nope FROM steps", "nope"), ("COPY steps TO 'x.csv'", "refused"), ("SELECT 1; SELECT 2", "refused")],
)
def test_sql_page_shows_errors_as_messages(monkeypatch, log_dir, sql, message):
    at = app(monkeypatch, log_dir, "page_sql.py")
    at.text_area(key="sql_text").input(sql)
    at.button(key="sql_run").click().run()
    assert not at.exception and message in texts(at.error)


@pytest.mark.parametrize("page", [None, "page_entropy.py", "page_forks.py", "page_law.py", "page_sql.py"])
def test_every_page_says_when_the_log_dir_is_empty(monkeypatch, tmp_path, page):
    at = app(monkeypatch, tmp_path, page)
    assert "No forkwatch run in" in texts(at.info)


def test_a_missing_log_dir_is_an_error_message(monkeypatch, tmp_path):
    at = app(monkeypatch, tmp_path / "nope")
    assert "does not exist" in texts(at.error)
