"""Adding a per-token statistic touches three files (docs/architecture.md, "Adding a per-token statistic"): its
formula in plugin/token_math.py, one `TokenStat` in plugin/step_data.py's `TOKEN_STATS`, its column in
store/schema.py's TOKENS. This test adds one exactly that way — the three edits made at run time instead of in the
files — and finds it in the stored `tokens` table of a real tiny training run."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from forkwatch.plugin.step_data import TOKEN_STATS, TokenStat
from forkwatch.store import connect, schema

import forkwatch


def surprise(logprob: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """1. the formula (plugin/token_math.py): the sampled token's surprisal minus the distribution's expected
    surprisal, -log p(y_t) - H_t, nats; > 0 where the sampled token was less likely than typical.  (..., B, T)"""
    return -logprob - entropy


@pytest.fixture
def surprise_column(monkeypatch):
    stat = TokenStat("surprise", lambda b: surprise(b.logprob, b.entropy))
    TOKEN_STATS.append(stat)  # 2. one entry in TOKEN_STATS (plugin/step_data.py)
    # 3. the column (store/schema.py's TOKENS)
    monkeypatch.setitem(schema.TABLES, "tokens", schema.TOKENS.append(pa.field("surprise", pa.float32())))
    yield
    TOKEN_STATS.remove(stat)


def test_a_statistic_added_through_the_documented_path_reaches_the_tokens_table(make_trainer, tmp_path,
                                                                                surprise_column):
    trainer = make_trainer(max_steps=2)
    cb = forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", stat_mantissa_bits=None)
    trainer.train()
    assert not cb.capture.faults.faults
    got = connect(str(tmp_path / "runs")).sql("SELECT step, surprise, logprob, entropy FROM tokens").df()
    assert len(got) > 0 and set(got["step"]) == {1, 2} and got["surprise"].notna().all()
    np.testing.assert_allclose(got["surprise"], -got["logprob"] - got["entropy"], rtol=1e-6, atol=1e-6)
