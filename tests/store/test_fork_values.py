"""store/fork_values.py's tables from measured positions, on hand-made positions: each score, the position rule and the
lexical rule against fork value per step, and what a selector's kept tokens hold of the value."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from forkwatch.store.fork_values import detector_vs_value, selector_vs_value


def _scored(**columns) -> pd.DataFrame:
    n = len(columns["value"])
    base = {"step": [1] * n, "position": list(range(n)), "inclusion_prob": [1.0] * n, "stratum": ["s"] * n,
            "previous_text": ["x"] * n, "selected": [1.0] * n}
    return pd.DataFrame({**base, **columns})


def test_each_score_and_both_rules_are_judged_against_consequential_and_the_value():
    scored = _scored(value=[0.4, 0.0, 0.3, 0.01], consequential=[True, False, True, False],
                     entropy=[1.0, 0.9, 0.8, 0.1], renyi2=[np.nan] * 4, previous_text=[None, "a", ",", "b"])
    table = detector_vs_value(scored, scores=("entropy", "renyi2", "missing_score"))
    got = table.set_index("predictor")
    assert set(got.index) == {"entropy", "position", "lexical"}  # renyi2 never finite, missing_score absent
    # entropy: positives 1.0 and 0.8 against negatives 0.9 and 0.1 -> 3 of 4 pairs won
    assert got.loc["entropy", "auroc"] == pytest.approx(0.75)
    # the lexical rule flags position 0 and the token after "," -> both positives, no negative
    assert got.loc["lexical", "auroc"] == pytest.approx(1.0)
    # one position per position: the fitted position rule is the target itself
    assert got.loc["position", "auroc"] == pytest.approx(1.0)
    assert got.loc["position", "spearman"] == pytest.approx(1.0)
    assert (got["consequential_share"] == 0.5).all() and (got["positions"] == 4).all()


def test_a_selectors_kept_tokens_are_weighted_by_what_each_sampled_token_stands_for():
    # two strata: the kept tokens measured whole (p = 1), the dropped ones a 1-in-4 sample (p = 0.25)
    scored = _scored(value=[0.5, 0.0, 0.1, 0.0], consequential=[True, False, True, False],
                     selected=[2.0, 2.0, 0.0, 0.0], inclusion_prob=[1.0, 1.0, 0.25, 0.25],
                     stratum=["kept", "kept", "dropped", "dropped"])
    got = selector_vs_value(scored)
    assert got["kept_share"] == pytest.approx(2 / 10)  # 2 kept of 2 + 8 tokens
    assert got["kept_consequential"] == pytest.approx(0.5)
    assert got["consequential_share"] == pytest.approx((1 + 4) / 10)
    assert got["value_kept"] == pytest.approx(0.5 / (0.5 + 4 * 0.1))
    assert got["kept_measured"] == 2


def test_a_selector_that_keeps_everything_keeps_the_whole_value_and_no_value_is_nan():
    scored = _scored(value=[0.2, 0.1], consequential=[True, False])
    assert selector_vs_value(scored)["value_kept"] == pytest.approx(1.0)
    assert math.isnan(selector_vs_value(_scored(value=[0.0, 0.0], consequential=[False, False]))["value_kept"])
