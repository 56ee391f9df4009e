"""The pages' figures (the `*_figure` functions of dashboard/page_*.py): each draws what its query returned (and only that), flags by severity,
and a gap with its reason where a diagnostic is undefined."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from forkwatch.dashboard import page_entropy, page_forks, page_runs
from forkwatch.store.health import Flag
from forkwatch.store.spectrum import N_BINS, bins_below


def _spectrum(steps: int) -> pd.DataFrame:
    rows = []
    for s in range(1, steps + 1):
        counts = np.zeros(N_BINS)
        counts[0], counts[12] = 90 + s, 10 - s  # the tail drains
        for b, c in enumerate(counts):
            rows.append({"step": s, "bin": b, "count": c, "share": c / counts.sum()})
    return pd.DataFrame(rows)


def test_spectrum_heatmap_is_steps_by_bins_cropped_to_log_vocab():
    fig = page_entropy.spectrum_figure(_spectrum(5), vocab_size=40)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (bins_below(40), 5)
    assert np.isnan(z[1]).all()  # empty bins are blank, not log(0)
    assert z[12, 0] > z[12, -1]  # the drained tail is darker at the end
    assert math.isclose(float(np.asarray(fig.data[0].customdata)[0, 0]), 91 / 100)


def test_effective_rank_figure_puts_rank_on_a_second_axis():
    df = pd.DataFrame({"step": [1, 2, 3], "entropy_mean": [1.0, 0.8, 0.5], "effective_rank_mean": [9.0, None, 7.0]})
    fig = page_entropy.effective_rank_figure({"r": df})
    assert [t.name for t in fig.data] == ["r entropy", "r effective rank"]
    assert fig.data[1].yaxis == "y2"


def test_fork_roles_figure_stacks_only_present_roles():
    roles = pd.DataFrame({"step": [1, 1, 2], "role": ["number", "connective", "number"], "n_forks": [3, 1, 2],
                          "share": [0.75, 0.25, 1.0]})
    fig = page_forks.fork_roles_figure(roles)
    assert {t.name for t in fig.data} == {"number", "connective"}
    connective = next(t for t in fig.data if t.name == "connective")
    assert list(connective.y) == [0.25, 0.0]


def test_probe_heatmap_rows_are_steps_and_columns_tokens():
    tokens = pd.DataFrame({"step": [1, 1, 1, 4, 4, 4], "position": [0, 1, 2] * 2, "text": ["4", "2", "."] * 2,
                           "entropy": [0.1, 0.2, 0.3, 0.01, 0.02, 0.03]})
    fig = page_forks.probe_heatmap_figure(tokens)
    assert list(fig.data[0].x) == ["0:'4'", "1:'2'", "2:'.'"]
    assert np.asarray(fig.data[0].z).shape == (2, 3)


def test_run_pictures_mark_flags_on_the_entropy_curve():
    curves = pd.DataFrame({"run_id": ["a"] * 4 + ["b"] * 4, "step": [1, 2, 3, 4] * 2,
                           "entropy_mean": [1, 0.5, 0.1, 0.05, 1, 1, 1, 1], "reward_mean": [0.0] * 8})
    flag = Flag(rule="collapse.mean", severity="alarm", fired_at=3, until=4, steps=[3, 4], values=[0.1, 0.05],
                threshold=0.2, message="m")
    fig = page_runs.run_pictures_figure(curves, {"a": [flag]}, ["a", "b"])
    marks = [t for t in fig.data if t.name == "flags"]
    assert len(marks) == 1 and list(marks[0].x) == [3] and list(marks[0].y) == [0.1]
    assert len([t for t in fig.data if t.name == "entropy"]) == 2


def test_entropy_figure_leaves_out_the_group_js_panel_when_no_run_has_it():
    from forkwatch.dashboard.page_entropy import entropy_figure

    df = pd.DataFrame({"step": [1, 2], "entropy_mean": [1.0, 0.9], "entropy_p10": [0.1, 0.1],
                       "entropy_p90": [2.0, 1.8], "renyi2_mean": [0.8, 0.7], "group_js_mean": [None, None],
                       "reward_mean": [0.1, 0.2], "completion_length_mean": [10.0, 11.0]})
    titles = [a.text for a in entropy_figure({"r": df}, {}).layout.annotations]
    assert not any("group JS" in t for t in titles) and len(titles) == 3
    with_gjs = df.assign(group_js_mean=[0.1, 0.05])
    titles = [a.text for a in entropy_figure({"r": with_gjs}, {}).layout.annotations]
    assert any("group JS" in t for t in titles) and len(titles) == 4


def test_run_pictures_mark_an_alarm_with_a_cross_and_a_warning_with_a_circle():
    curves = pd.DataFrame({"run_id": ["a"] * 4, "step": [1, 2, 3, 4], "entropy_mean": [1, 0.5, 0.1, 0.05],
                           "reward_mean": [0.0] * 4})
    flags = [Flag(rule="collapse.mean", severity=sev, fired_at=s, until=4, steps=[s], values=[0.1], threshold=0.2,
                  message="m") for sev, s in (("warning", 2), ("alarm", 3))]
    marks = next(t for t in page_runs.run_pictures_figure(curves, {"a": flags}, ["a"]).data if t.name == "flags")
    assert list(marks.marker.symbol) == ["circle-open", "x"]
    assert [t.split(" at")[0] for t in marks.text] == ["collapse.mean (warning)", "collapse.mean (alarm)"]


def test_an_undefined_diagnostic_is_a_gap_with_its_reason():
    from forkwatch.dashboard.page_entropy import entropy_figure, undefined_note

    df = pd.DataFrame({"step": [1, 2, 3, 4], "entropy_mean": [1.0, 0.9, 0.9, 0.8], "entropy_p10": [0.1] * 4,
                       "entropy_p90": [2.0] * 4, "renyi2_mean": [0.8] * 4, "reward_mean": [0.1, 0.2, 0.2, 0.3],
                       "completion_length_mean": [10.0] * 4, "select_grad_share": [0.4, None, 0.5, 0.6]})
    fig = entropy_figure({"r": df}, {})
    line = next(t for t in fig.data if t.name == "r" and "grad share" in t.hovertemplate)
    assert math.isnan(line.y[1]), "the undefined step stays a gap in the line"
    gap = next(t for t in fig.data if t.name.endswith("grad share: undefined"))
    assert list(gap.x) == [2] and "every advantage is 0" in gap.hovertext[0]
    assert "every advantage is 0" in undefined_note({"r": df}, ["select_grad_share"])
    assert undefined_note({"r": df.assign(select_grad_share=[None] * 4)}, ["select_grad_share"]) is None
