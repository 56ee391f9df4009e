"""The pages' one way to the store (dashboard/cache.py): every `cached(...)` call names a named query of the store with
a literal, nothing in the dashboard runs SQL itself, and a name that is no named query is refused with the list."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from forkwatch.dashboard import cache  # noqa: E402

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboard"


def _calls(name: str) -> list[tuple[str, ast.Call]]:
    out = []
    for f in sorted(DASHBOARD.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call):
                fn = node.func
                if (fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)) == name:
                    out.append((f.name, node))
    return out


def test_every_cached_call_names_a_store_query_with_a_literal():
    calls = _calls("cached")
    assert len(calls) >= 15  # the pages reach the store through it
    for where, call in calls:
        first = call.args[0]
        assert isinstance(first, ast.Constant) and isinstance(first.value, str), f"{where}: a query name from a value"
        assert callable(cache._named(first.value)), where


@pytest.mark.parametrize("method", ["execute", "sql", "query"])
def test_the_dashboard_runs_no_sql_of_its_own(method):
    # the SQL page's text goes through the sandbox's own guard (cache.run_sql -> SandboxedConnection.query)
    allowed = {("cache.py", "query")}
    found = {(where, method) for where, _ in _calls(method)} - allowed
    assert not found, found


def test_an_unknown_query_name_is_refused_with_the_list_of_names():
    with pytest.raises(KeyError, match=r"no named query 'drop_everything'.*step_series"):
        cache._named("drop_everything")
    with pytest.raises(KeyError):
        cache._named("LAST_ROW_PER_STEP")  # public in store/queries.py, but not a named query
