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

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dash")
    write_sample_runs(d, n_steps=40, token_steps=4)
    write_run(d, "fresh", "healthy", n_steps=0, status=None)  # no steps yet, still being written
    write_run(d, "live", "healthy", n_steps=12, token_steps=1, status=None)
    write_run(d, "without_lenses", "healthy", n_steps=10, token_steps=1, lenses=False, group_js=False)  # nothing optional
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


def values(v) -> list:
    """A plotly array from a figure's JSON: a list, or numpy data encoded as {'dtype', 'bdata'[, 'shape']}."""
    if isinstance(v, dict) and "bdata" in v:
        import base64

        import numpy as np

        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
        return a.reshape([int(n) for n in str(v["shape"]).split(",")]).tolist() if "shape" in v else a.tolist()
    return list(v)


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def test_runs_page_lists_every_run_with_a_health_badge(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir)
    assert at.title[0].value == "Runs"
    table = at.dataframe[0].value
    assert set(table["run"]) == {"collapse", "healthy", "explosion", "fresh", "live", "without_lenses"}
    health = dict(zip(table["run"], table["health"], strict=True))
    assert "collapse" in health["collapse"] and "explosion" in health["explosion"]
    assert "healthy" in health["healthy"] and "too few steps" in health["fresh"]
    assert {"steps", "trained tokens", "selection", "status"} <= set(table.columns)
    assert at.multiselect(key="runs_pick").value == ["collapse"]
    # the badge is `forkwatch check`'s verdict, word for word: same kind, rule and step
    from forkwatch.store.check import check_runs, verdict_label

    for r in check_runs(log_dir):
        if r["report"].verdict != "insufficient_data":
            assert health[r["run_id"]].endswith(verdict_label(r["report"]).lower()), r["run_id"]


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
    fig = figures(at)[0]  # the step-series chart; the collapse lenses follow
    names = {t.get("name") for t in fig["data"]}
    assert {"collapse entropy", "healthy entropy", "collapse health flags"} <= names
    flags = next(t for t in fig["data"] if t.get("name") == "collapse health flags")
    assert "collapse.mean (alarm)" in flags["text"] and "signal: steps" in flags["hovertext"][0]
    # the hover is the flag's one wording (Flag.describe_lines): rule, step, kind and severity, then the evidence
    assert any("collapse.mean at step" in h and "COLLAPSE ALARM" in h and "evidence: " in h for h in flags["hovertext"])
    assert any(s.get("type") == "line" for s in fig["layout"]["shapes"])  # the vertical markers
    assert "collapse.mean" in set(at.dataframe[0].value["rule"])


def test_entropy_page_says_when_a_run_has_no_steps_or_is_live(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir, "page_entropy.py", run=["fresh", "live"])
    assert "`fresh` has no steps yet" in texts(at.warning)
    assert "`live` is still being written" in texts(at.info)
    names = {t.get("name") for fig in figures(at) for t in fig["data"]}
    assert "live entropy" in names and not any(str(n).startswith("fresh") for n in names)


def test_entropy_page_draws_the_spectrum_and_the_effective_rank(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir, "page_entropy.py", run="collapse")
    figs = figures(at)
    heat = [f for f in figs if f["data"][0]["type"] == "heatmap"]
    assert len(heat) == 1 and len(values(heat[0]["data"][0]["x"])) == 40  # step x bin
    rank = next(f for f in figs if any(t.get("name") == "collapse effective rank" for t in f["data"]))
    measured = [y for t in rank["data"] if t.get("name") == "collapse effective rank" for y in values(t["y"])
                if y is not None and y == y]
    assert len(measured) == 8  # every 5 of 40 steps


def test_entropy_page_says_why_a_view_has_nothing_to_draw(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir, "page_entropy.py", run="without_lenses")
    info = texts(at.info)
    assert "`without_lenses`: no entropy spectrum recorded" in info and "`without_lenses`: no effective rank to draw" in info
    assert "group JS not recorded for `without_lenses`" in texts(at.caption)
    [fig] = figures(at)  # only the step series, and without an empty group-JS panel
    assert not any("group JS" in a["text"] for a in fig["layout"]["annotations"])


def test_forks_page_draws_fork_roles_and_a_probe_across_steps(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir, "page_forks.py", run="collapse", step="2")
    figs = figures(at)
    roles = next(f for f in figs if any(t.get("stackgroup") == "roles" for t in f["data"]))
    assert {t["name"] for t in roles["data"]} <= {"number", "operator", "connective", "grammar", "formatting", "other"}
    heat = next(f for f in figs if f["data"][0]["type"] == "heatmap")
    assert len(values(heat["data"][0]["y"])) == 8 and len(values(heat["data"][0]["x"])) == 7  # 8 scorings x 7 tokens
    assert "shared with their first scoring" in texts(at.caption)
    at.selectbox(key="forks_probe_collapse").set_value(1).run()
    heat = next(f for f in figures(at) if f["data"][0]["type"] == "heatmap")
    assert len(values(heat["data"][0]["x"])) == 6


def test_forks_page_says_why_without_probes(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir, "page_forks.py", run="without_lenses")
    assert "`without_lenses` has no probe scores" in texts(at.info)


def test_entropy_and_forks_pages_say_which_steps_the_lens_budget_skipped(monkeypatch, tmp_path):
    from forkwatch.plugin.lens_budget import LensClock

    # run.json's `lenses` as the plugin writes it: a lens budget that held the probes back at most steps
    clock = LensClock(budget=0.005, max_every=None, every={"probes": 5, "effective_rank": 5})
    clock.ran_first("probes", 0, "forward")
    for step in range(1, 41):
        spent = {n: cost for n, cost in (("effective_rank", 0.001), ("probes", 0.5)) if clock.due(n, step)}
        clock.agree([{"step_s": 2.0, "lenses": spent}])
    lenses = clock.meta()
    assert lenses["probes"]["skipped"] and not lenses["effective_rank"]["skipped"]
    write_run(tmp_path, "budgeted", "collapse", n_steps=40, token_steps=2, extra_meta={"lenses": lenses})
    entropy = texts(app(monkeypatch, tmp_path, "page_entropy.py", run="budgeted").caption)
    assert "`budgeted`: Effective rank measured at 5–40; due every 5 steps within its share (0.25 %) of a lens " \
           "budget of 0.5 % of training time; none skipped" in entropy
    forks = texts(app(monkeypatch, tmp_path, "page_forks.py", run="budgeted", step="2").caption)
    assert lenses["probes"]["ran"] == [0, 5] and lenses["probes"]["skipped"] == list(range(10, 41, 5))
    assert "Probes scored at 0, 5; due every 5 steps within its share (0.25 %) of a lens budget of 0.5 % of " \
           "training time; skipped at 10–40 (7 of 9); a scoring took 500.0 ms" in forks


def test_pages_draw_no_lens_caption_for_a_run_written_without_it(monkeypatch, log_dir):
    captions = texts(app(monkeypatch, log_dir, "page_entropy.py", run="collapse").caption)
    captions += texts(app(monkeypatch, log_dir, "page_forks.py", run="collapse", step="2").caption)
    assert "lens budget" not in captions and "skipped at" not in captions


def test_runs_page_draws_curves_and_a_picture_per_run(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir)
    table = at.dataframe[0].value
    curves = dict(zip(table["run"], table["entropy"], strict=True))
    assert len(curves["collapse"]) == 40 and len(curves["fresh"]) == 0
    [fig] = figures(at)
    assert sum(t.get("name") == "entropy" for t in fig["data"]) == 5  # the runs with steps
    assert any(t.get("name") == "flags" for t in fig["data"])


def test_forks_page_shows_the_token_view_with_values_and_alternatives(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir, "page_forks.py", run="collapse", step="2")
    assert at.query_params["step"] == "2"
    assert at.radio(key="forks_stat").options == ["entropy", "renyi2", "group_js", "logprob"]
    view = next(h.proto.body for h in at.get("html") if "fw-tokens" in h.proto.body)
    assert 'class="fw-token' in view and "fw-grad" in view and "fw-fork" in view
    assert "entropy " in view and "logprob " in view and "alternatives (top-k):" in view
    assert len(figures(at)) == 6  # prompt across steps, top fork texts, their trend; fork roles, probe, overlap


def test_forks_page_colours_by_the_chosen_stat(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir, "page_forks.py", run="collapse")
    at.radio(key="forks_stat").set_value("logprob").run()
    assert any('data-stat="logprob"' in h.proto.body for h in at.get("html"))


def test_forks_page_finds_a_prompt_and_follows_it(monkeypatch, log_dir):
    at = app(monkeypatch, log_dir, "page_forks.py", run="healthy")
    at.radio(key="forks_mode").set_value("prompt").run()
    at.text_input(key="forks_prompt_query").input("1 + 2").run()
    assert at.selectbox(key="forks_prompt").value == "What is 1 + 2?"
    completion = next(s for s in at.selectbox if s.key.startswith("forks_completion_"))
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
