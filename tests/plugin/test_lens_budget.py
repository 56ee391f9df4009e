"""The lens budget's decisions (plugin/lens_budget.py) from pure inputs: measured costs and step times in, the steps
each lens runs, is skipped and is forced at out; and run.json's account of them in words (store/run_meta.py)."""

from __future__ import annotations

import pytest
from forkwatch.plugin.lens_budget import LensClock, lens_due
from forkwatch.store.run_meta import lens_notes

BUDGET = dict(every=10, budget=0.005, max_every=100)


def test_a_lens_runs_only_on_its_own_grid():
    due = [s for s in range(1, 41) if lens_due(s, last=None, spent_s=0.0, cost_s=0.0, train_s=1e9, **BUDGET)]
    assert due == [10, 20, 30, 40]


def test_an_off_lens_never_runs():
    assert lens_due(10, every=0, last=None, budget=0.005, max_every=100, spent_s=0, cost_s=0, train_s=1e9) is None


def test_without_a_budget_every_grid_step_runs_whatever_it_costs():
    assert lens_due(10, every=10, last=0, budget=None, max_every=100, spent_s=50.0, cost_s=9.0, train_s=1.0) == "run"


def test_the_budget_holds_spent_plus_the_next_cost_within_its_share_of_training_time():
    # 0.5 % of 100 s is 0.5 s: 0.3 s spent + a 0.2 s lens fits exactly, a 0.21 s one does not
    assert lens_due(20, last=10, spent_s=0.3, cost_s=0.2, train_s=100.0, **BUDGET) == "run"
    assert lens_due(20, last=10, spent_s=0.3, cost_s=0.21, train_s=100.0, **BUDGET) == "skipped"


def test_a_lens_never_measured_counts_as_free_until_it_has_run_once():
    assert lens_due(10, last=None, spent_s=0.0, cost_s=None, train_s=1.0, **BUDGET) == "run"
    assert lens_due(10, last=None, spent_s=0.01, cost_s=None, train_s=1.0, **BUDGET) == "skipped"


def test_a_lens_held_back_max_every_steps_is_forced():
    kw = dict(every=10, budget=0.005, max_every=30, spent_s=1.0, cost_s=1.0, train_s=1.0)
    assert [lens_due(s, last=10, **kw) for s in (20, 30, 40)] == ["skipped", "skipped", "forced"]
    assert lens_due(30, last=None, **kw) == "forced"  # never ran: held back since step 0
    assert lens_due(40, last=10, **{**kw, "max_every": None}) == "skipped"  # None: the budget always wins
    # a cadence as sparse as the longest gap allowed is kept whatever it costs (max_every below every counts as every)
    assert lens_due(20, last=10, **{**kw, "max_every": 1}) == "forced"


def _run(clock: LensClock, steps: int, step_s: float, cost_s: dict[str, float]) -> None:
    """Drive the clock as the callback does: each step, ask each lens, spend its cost when it runs, agree."""
    for step in range(1, steps + 1):
        lenses = {}
        for name, cost in cost_s.items():
            if clock.due(name, step):
                lenses[name] = cost
        clock.agree([{"step_s": step_s, "lenses": lenses}])


def test_a_lens_costing_a_fifth_of_a_step_runs_once_per_forty_steps_at_half_a_percent():
    # SmolLM2-135M on a CPU, measured: a probe scoring ~0.6 s, a step ~3.2 s. 0.5 % of a 3.2 s step is 16 ms, so a
    # 0.6 s scoring fits once per 37.5 steps: on the grid of 10, at 40 and then every 40
    # (by hand: after n scorings of 0.6 s the next fits once 0.005 x 3.2 x (s - 1) >= 0.6 (n + 1): s >= 76, 113.5,
    # 151, 188.5, on the grid of 10; the scoring at 10 is the first measurement of its cost)
    clock = LensClock(budget=0.005, max_every=100, every={"probes": 10, "effective_rank": 0})
    clock.ran_first("probes", 0, "loss pass")
    _run(clock, 200, 3.2, {"probes": 0.6})
    meta = clock.meta()
    assert meta["probes"]["ran"] == [0, 10, 80, 120, 160, 190] and meta["probes"]["forced"] == []
    assert set(meta["probes"]["skipped"]) | set(meta["probes"]["ran"]) == {0, *range(10, 201, 10)}
    assert meta["seconds"] == pytest.approx(3.0) and meta["share"] == pytest.approx(3.0 / 640, abs=1e-6)
    assert meta["share"] <= 0.005
    assert "effective_rank" not in meta  # off


def test_a_cheap_lens_keeps_the_users_cadence():
    # the tiny demo: an effective rank of ~2 ms against a ~1 s step is far inside 0.5 %
    clock = LensClock(budget=0.005, max_every=100, every={"probes": 0, "effective_rank": 10})
    _run(clock, 50, 1.0, {"effective_rank": 0.002})
    assert clock.meta()["effective_rank"]["ran"] == [10, 20, 30, 40, 50]
    assert clock.meta()["effective_rank"]["skipped"] == []


def test_a_cheap_lens_keeps_its_cadence_beside_a_dear_one():
    # the budget is split between the lenses that are on (0.5 % each here): the effective rank at 2 ms runs at every
    # grid step; the probes at 0.2 s run at 5 (unmeasured), then once 0.4 s fits in 0.5 % of the training time (80 s),
    # on the grid at 85
    clock = LensClock(budget=0.01, max_every=None, every={"probes": 5, "effective_rank": 5})
    assert clock.share == 0.005
    _run(clock, 100, 1.0, {"probes": 0.2, "effective_rank": 0.002})
    meta = clock.meta()
    assert meta["probes"]["ran"] == [5, 85] and meta["effective_rank"]["ran"] == list(range(5, 101, 5))
    assert meta["share_each"] == 0.005 and meta["seconds"] == pytest.approx(0.44)


def test_a_lens_alone_has_the_whole_budget():
    assert LensClock(budget=0.01, max_every=None, every={"probes": 0, "effective_rank": 5}).share == 0.01
    assert LensClock(budget=None, max_every=None, every={"probes": 5, "effective_rank": 5}).share is None


def test_every_rank_counts_the_slowest_ranks_times_and_decides_alike():
    a = LensClock(budget=0.005, max_every=None, every={"probes": 1, "effective_rank": 1})
    b = LensClock(budget=0.005, max_every=None, every={"probes": 1, "effective_rank": 1})
    gathered = [{"step_s": 2.0, "lenses": {"probes": 0.004}}, {"step_s": 3.0, "lenses": {"probes": 0.009}}, None]
    for clock in (a, b):
        clock.agree(gathered)
    assert a.train_s == b.train_s == 3.0 and a.spent["probes"] == b.spent["probes"] == 0.009
    assert a.cost == b.cost == {"probes": 0.009, "effective_rank": None}
    assert [a.due("probes", s) for s in (2, 3)] == [b.due("probes", s) for s in (2, 3)]


def test_a_decision_is_made_once_per_lens_and_step():
    clock = LensClock(budget=0.005, max_every=None, every={"probes": 0, "effective_rank": 2})
    assert clock.due("effective_rank", 2) and clock.due("effective_rank", 2)  # asked by every micro-batch
    assert clock.meta()["effective_rank"]["ran"] == [2]
    clock.agree([{"step_s": 1.0, "lenses": {"effective_rank": 1.0}}])
    assert not clock.due("effective_rank", 4) and not clock.due("effective_rank", 4)
    assert clock.meta()["effective_rank"]["skipped"] == [4]


def test_local_measures_the_step_and_the_lenses_that_ran_then_resets():
    clock = LensClock(budget=0.005, max_every=None, every={"probes": 1, "effective_rank": 1})
    clock.spend("probes", 0.25)
    clock.spend("probes", 0.25)
    first = clock.local()
    assert first["lenses"] == {"probes": 0.5} and first["step_s"] >= 0
    assert clock.local()["lenses"] == {}


def test_meta_says_what_ran_was_skipped_and_forced_and_lens_notes_says_it_in_words():
    clock = LensClock(budget=0.005, max_every=30, every={"probes": 10, "effective_rank": 10})
    clock.ran_first("probes", 0, "loss pass")
    _run(clock, 60, 1.0, {"probes": 2.0, "effective_rank": 0.001})
    meta = clock.meta()
    assert meta["probes"]["ran"] == [0, 10, 40] and meta["probes"]["forced"] == [40]
    assert meta["probes"]["skipped"] == [20, 30, 50, 60]
    assert meta["probes"]["first"] == {"step": 0, "source": "loss pass"}
    notes = lens_notes({"lenses": meta})
    assert notes["probes"].startswith("Probes scored at 0, 10, 40 (step 0: the initial policy's, from the first "
                                      "step's own loss pass); due every 10 steps within its share (0.25 %) of a lens "
                                      "budget of 0.5 % of training time; skipped at 20, 30, 50, 60 (4 of 7); forced at 40 (held back 30 steps")
    assert "a scoring took 2.00 s" in notes["probes"]
    assert notes["effective_rank"].startswith("Effective rank measured at 10–60; ")  # its own share: every time
    assert f"all lenses took {100 * meta['share']:.1f} % of 60.00 s of training so far" in notes["effective_rank"]


def test_lens_notes_abbreviate_long_runs_of_steps_and_say_when_there_is_no_budget():
    lenses = {"budget": None, "max_every": 100, "train_seconds": 10.0, "share": 0.001,
              "effective_rank": {"every": 5, "ran": list(range(5, 101, 5)), "skipped": [], "forced": [],
                                 "seconds": 0.01, "cost_s": 0.0005}}
    note = lens_notes({"lenses": lenses})["effective_rank"]
    assert note.startswith("Effective rank measured at 5–100; every 5 steps, with no lens budget (lens_budget=None)")
    assert "a measurement took 0.5 ms" in note


@pytest.mark.parametrize("meta", [None, "", "{}", {"lenses": "?"}, {"lenses": {"budget": 0.005}}])
def test_lens_notes_are_empty_for_a_run_without_them(meta):
    assert lens_notes(meta) == {}


def test_the_lens_asked_first_does_not_starve_the_other():
    # in training the effective rank is asked in the loss pass, before the probes at the step end: with one pool for
    # both it would take every opening; with a share each, both run equally often, and neither is forced
    clock = LensClock(budget=0.01, max_every=100, every={"probes": 5, "effective_rank": 5})
    for step in range(1, 401):
        lenses = {}
        for name in ("effective_rank", "probes"):
            if clock.due(name, step):
                lenses[name] = 0.2
        clock.agree([{"step_s": 1.0, "lenses": lenses}])
    meta = clock.meta()
    runs = {name: len(meta[name]["ran"]) for name in ("probes", "effective_rank")}
    assert abs(runs["probes"] - runs["effective_rank"]) <= 1 and min(runs.values()) >= 8
    assert meta["probes"]["forced"] == meta["effective_rank"]["forced"] == []
    assert meta["seconds"] <= 0.01 * meta["train_seconds"] + 0.2
