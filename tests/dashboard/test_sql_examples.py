"""Every SQL page example runs in the sandbox on synthetic runs and returns rows."""

from __future__ import annotations

import pytest
from forkwatch.dashboard.page_sql import EXAMPLES
from forkwatch.store import open_sandboxed
from synthetic import write_sample_runs


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    d = tmp_path_factory.mktemp("sql_examples")
    write_sample_runs(d, n_steps=20, token_steps=3)
    sb = open_sandboxed(d)
    yield sb
    sb.close()


@pytest.mark.parametrize("label", list(EXAMPLES))
def test_example_runs_and_returns_rows(sandbox, label):
    df = sandbox.query(EXAMPLES[label])
    assert len(df) > 0, label


def test_fork_roles_example_shares_sum_to_one_per_step(sandbox):
    df = sandbox.query(EXAMPLES["Fork roles per step, first 50 steps"])
    assert df.groupby(["run_id", "step"])["share"].sum().round(9).eq(1.0).all()
    assert set(df["role"]) <= {"number", "operator", "connective", "grammar", "formatting", "other"}
