"""The `steps` row from every rank's step summary: selector metrics land in their schema columns, as means over
micro-batches and ranks; a metric without a column stays out of the row (it is still logged by the callback); a
statistic undefined for the step is None (NULL), never NaN; the percentiles are numpy's."""

from __future__ import annotations

import numpy as np
import pytest
from forkwatch.plugin.handoff import select_means, steps_row, summarize_many
from forkwatch.store.schema import STEPS


def _part(select_metrics: dict[str, list[float]], n: int = 4) -> dict:
    rng = np.random.default_rng(n)
    return {
        "entropy": rng.random(n), "renyi2": rng.random(n), "group_js": np.zeros(0), "rewards": rng.random(2),
        "lengths": np.array([3.0, 4.0]), "truncated": np.array([0.0, 1.0]), "n_forks": 1.0, "n_selected": float(n),
        "select_metrics": select_metrics, "seconds": 0.01,
    }


def test_select_metrics_fill_their_columns_as_means_over_micro_batches_and_ranks():
    parts = [_part({"grad_share": [0.2, 0.4], "warmup": [1.0, 1.0], "threshold": [0.5]}),
             _part({"grad_share": [0.6], "warmup": [0.0], "threshold": [1.5], "my_metric": [7.0]})]
    selected = select_means(parts)
    assert selected == pytest.approx({"grad_share": 0.4, "warmup": 2 / 3, "threshold": 1.0, "my_metric": 7.0})
    row = steps_row(3, parts, select_method="ict", dropped=0, selected=selected)
    assert row["select_grad_share"] == pytest.approx(0.4) and row["select_threshold"] == pytest.approx(1.0)
    assert row["select_warmup"] is True  # a boolean column: true in most micro-batches
    assert "select_my_metric" not in row  # no such column: logged as forkwatch/select/my_metric only
    assert set(row) <= set(STEPS.names)


def test_without_a_selector_the_select_columns_are_absent_and_group_js_is_null():
    row = steps_row(1, [_part({})], select_method=None, dropped=2, selected={})
    assert not [k for k in row if k.startswith("select_") and k != "select_method"]
    assert row["group_js_mean"] is None and row["dropped_records"] == 2 and row["n_tokens"] == 4


def test_spectrum_counts_every_rank_and_effective_rank_is_their_mean_or_null():
    from forkwatch.store.spectrum import spectrum_counts

    a, b = _part({}), _part({}, n=6)
    a["effective_rank"], b["effective_rank"] = np.array([3.0, 5.0]), np.array([np.nan, 10.0])
    row = steps_row(2, [a, b], select_method=None, dropped=0, selected={})
    assert row["entropy_spectrum"] == spectrum_counts(np.concatenate([a["entropy"], b["entropy"]]))
    assert sum(row["entropy_spectrum"]) == row["n_tokens"] == 10
    assert row["effective_rank_mean"] == pytest.approx(6.0)  # NaN (a row without two states) left out
    assert steps_row(3, [_part({})], select_method=None, dropped=0, selected={})["effective_rank_mean"] is None


def test_summarize_is_token_weighted_with_linear_percentiles():
    values = np.arange(101, dtype=np.float32)
    s = summarize_many({"entropy": values})
    assert s["entropy_mean"] == 50.0 and s["entropy_p10"] == 10.0 and s["entropy_p99"] == 99.0
    rng = np.random.default_rng(0)
    x = rng.random(37)
    got = summarize_many({"entropy": x})
    assert [got[f"entropy_p{p}"] for p in (10, 50, 90, 99)] == pytest.approx(np.quantile(x, [0.1, 0.5, 0.9, 0.99]))


def test_undefined_statistics_are_none_not_nan():
    empty = _part({"grad_share": [float("nan"), float("nan")], "threshold": [0.5]}, n=0)
    empty["rewards"], empty["lengths"], empty["truncated"] = np.array([0.5]), np.array([0.0]), np.array([1.0])
    row = steps_row(4, [empty], select_method="high_entropy", dropped=0, selected=select_means([empty]))
    for key in ("fork_fraction", "selected_fraction", "reward_std", "entropy_mean", "entropy_p90", "renyi2_p10",
                "select_grad_share"):  # no tokens; one reward (no deviation); every advantage 0 in every micro-batch
        assert row[key] is None, key
    assert row["select_threshold"] == pytest.approx(0.5) and row["reward_mean"] == pytest.approx(0.5)
    nan_rewards = _part({})
    nan_rewards["rewards"] = np.array([np.nan, np.nan])  # rewards unknown: no mean either
    assert steps_row(5, [nan_rewards], select_method=None, dropped=0, selected={})["reward_mean"] is None


def test_a_selector_metric_is_averaged_over_the_micro_batches_where_it_is_defined():
    parts = [_part({"grad_share": [float("nan"), 0.3]}), _part({"grad_share": [0.5]})]
    assert select_means(parts)["grad_share"] == pytest.approx(0.4)
