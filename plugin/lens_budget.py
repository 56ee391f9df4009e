"""When the periodic collapse lenses run: a budget of training time (`lens_budget`), spent by measured costs.

The probes (a teacher-forced forward of a few sequences) and the effective rank (a Gram matrix per completion) cost
what they cost on a model, and a step lasts what it lasts: on SmolLM2-135M on a CPU one scoring of four probes is a
fifth of a step, on a tiny model a fiftieth, on a 7B model on a GPU far less. So no fixed cadence keeps their share of
training time small everywhere. Here each lens runs only on its own grid (the steps that are multiples of its
`*_every`: the user's cadence is the most often it runs) and, at such a step, only when

    time this lens took so far + its last measured cost  <=  its share of lens_budget x training time so far

(`lens_due`); otherwise the step is skipped, and said to be. The budget is split equally between the lenses that are
on (`LensClock.share`): each decides from its own time alone, so a cheap lens (the effective rank, a few Gram
matrices) keeps its cadence however much a dear one (the probes' forwards) costs, neither can starve the other, and
the order in which they are asked within a step (the effective rank in the loss pass, the probes at the step end)
changes nothing. A lens's first run on its grid, its cost not yet measured, counts as free: that one run, and a
forced one, can take the lenses above the budget for a while (run.json says their share). A lens the budget holds
back for `lens_max_every` steps runs anyway (forced; said too). Costs and step times are measured on this run, wall
time around each lens's own work (each synchronises with the device before it returns: it copies its results to the
host). Under several ranks every
rank decides from the same numbers: each rank's measurements of a step travel in the step-end gather the callback
makes anyway, and the slowest rank's count (`LensClock.agree`), so the probes' forwards (collectives under ZeRO-3 and
FSDP2) run on every rank at the same steps.

The probes' first scoring is the reference later ones are compared with: it always runs (`LensClock.ran_first`), and
is counted like any other when it is a forward (the default probes' one, from the first step's loss pass, costs
none). run.json's `lenses` (`LensClock.meta`) lists for each lens the steps it ran, was skipped
and was forced at, its cost, and the time all of them took against the training time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

LENSES = ("probes", "effective_rank")  # the periodic lenses (docs/collapse-lenses.md), each with its `*_every` option
Decision = Literal["run", "forced", "skipped"]


def lens_due(step: int, *, every: int, last: int | None, budget: float | None, max_every: int | None,
             spent_s: float, cost_s: float | None, train_s: float) -> Decision | None:
    """Whether a periodic lens runs at `step`. None: not a step of its grid (`every` 0: the lens is off). "run": the
    budget allows it (or there is none: `budget` None); "skipped": it does not; "forced": it does not, but the lens
    last ran `max_every` or more steps ago (`last` None: it never ran, held back since step 0; `max_every` None:
    never forced; a `max_every` below `every` counts as `every`).

    `spent_s`: seconds every lens took so far; `cost_s`: this lens's last measured cost (None: never measured, taken
    as 0, so a lens is measured before the budget can hold it back); `train_s`: training time so far, seconds."""
    if every <= 0 or step % every:
        return None
    if budget is None:
        return "run"
    if spent_s + (cost_s or 0.0) <= budget * train_s:
        return "run"
    if max_every is not None and step - (last or 0) >= max(max_every, every):
        return "forced"
    return "skipped"


class LensClock:
    """The lenses' schedule for one run: `due` decides (once per lens and step, from what every rank agreed up to the
    previous step), `spend` counts this rank's seconds, `local` / `agree` share them at the step end, `meta` says
    what happened (run.json's `lenses`)."""

    def __init__(self, *, budget: float | None, max_every: int | None, every: Mapping[str, int]) -> None:
        self.budget, self.max_every = budget, max_every
        self.every = {name: int(every.get(name, 0)) for name in LENSES}
        on = sum(e > 0 for e in self.every.values())
        # each lens's share of the budget: split equally between the lenses that are on
        self.share = None if budget is None else budget / max(on, 1)
        self.start()

    @classmethod
    def from_config(cls, config: Any) -> LensClock:
        return cls(budget=config.lens_budget, max_every=config.lens_max_every,
                   every={"probes": config.probe_every, "effective_rank": config.effective_rank_every})

    def start(self) -> None:
        """A new `train()`: nothing spent, nothing decided; training time counts from now."""
        self.train_s = 0.0  # training wall time so far (the slowest rank's, step by step)
        self.spent = dict.fromkeys(LENSES, 0.0)  # seconds each lens took so far (the slowest rank's, step by step)
        self.cost: dict[str, float | None] = dict.fromkeys(LENSES)  # each lens's cost at its last run
        self.last: dict[str, int | None] = dict.fromkeys(LENSES)  # the step each lens last ran at
        self.steps: dict[str, dict[str, list[int]]] = {n: {"ran": [], "skipped": [], "forced": []} for n in LENSES}
        self.first: dict[str, dict[str, Any]] = {}  # the probes' first scoring: its step and where it came from
        self.changed = False  # something for run.json since `meta` was last taken
        self._decided: dict[str, tuple[int, bool]] = {}  # lens -> (step, whether it runs): one decision per step
        self._ran_now = dict.fromkeys(LENSES, False)  # this rank ran the lens during the current step
        self._local = dict.fromkeys(LENSES, 0.0)  # this rank's seconds in the current step, not yet agreed
        self._mark = time.perf_counter()

    # ------------------------------------------------------------------ during a step
    def due(self, name: str, step: int) -> bool:
        """Whether lens `name` runs at `step` (the same answer however often it is asked within the step)."""
        decided = self._decided.get(name)
        if decided is not None and decided[0] == step:
            return decided[1]
        decision = lens_due(step, every=self.every[name], last=self.last[name], budget=self.share,
                            max_every=self.max_every, spent_s=self.spent[name], cost_s=self.cost[name],
                            train_s=self.train_s)
        runs = decision in ("run", "forced")
        self._decided[name] = (step, runs)
        if decision is not None:
            self.steps[name]["ran" if decision == "run" else decision].append(step)
            if decision == "forced":
                self.steps[name]["ran"].append(step)
            self.changed = True
        if runs:
            self.last[name] = step
        return runs

    def ran_first(self, name: str, step: int, source: str) -> None:
        """A run outside the grid that always happens (the probes' first scoring, the reference of later ones)."""
        self.first[name] = {"step": step, "source": source}
        self.last[name] = step
        self.steps[name]["ran"].append(step)
        self.changed = True

    def spend(self, name: str, seconds: float) -> None:
        """This rank spent `seconds` on lens `name` in the current step."""
        self._local[name] += seconds
        self._ran_now[name] = True

    # ------------------------------------------------------------------ at the step end
    def local(self) -> dict[str, Any]:
        """This rank's measurements of the step now ending (for the gather): the step's wall time since the last
        step end, and the seconds each lens that ran took. Resets them."""
        now = time.perf_counter()
        out: dict[str, Any] = {"step_s": now - self._mark,
                               "lenses": {n: self._local[n] for n in LENSES if self._ran_now[n]}}
        self._mark = now
        self._local = dict.fromkeys(LENSES, 0.0)
        self._ran_now = dict.fromkeys(LENSES, False)
        return out

    def agree(self, measured: Iterable[Mapping[str, Any] | None]) -> None:
        """Every rank's `local()` of the step (the gathered list; a rank whose summary failed gives None): the
        slowest rank's step time and lens seconds are counted, so every rank holds the same numbers."""
        parts = [m for m in measured if m]
        if not parts:
            return
        self.train_s += max(float(m.get("step_s", 0.0)) for m in parts)
        for name in LENSES:
            seconds = [float(m["lenses"][name]) for m in parts if name in m.get("lenses", {})]
            if seconds:
                self.spent[name] += max(seconds)
                self.cost[name] = max(seconds)

    # ------------------------------------------------------------------ what run.json says
    def meta(self) -> dict[str, Any]:
        """run.json's `lenses`: the budget, the time the lenses took against the training time, and per lens its
        cadence, the steps it ran / was skipped / was forced at, its seconds and last cost. Clears `changed`."""
        self.changed = False
        spent = sum(self.spent.values())
        out: dict[str, Any] = {"budget": self.budget, "share_each": self.share, "max_every": self.max_every,
                               "train_seconds": round(self.train_s, 3), "seconds": round(spent, 4),
                               "share": round(spent / self.train_s, 6) if self.train_s > 0 else None}
        for name in LENSES:
            if self.every[name] <= 0:
                continue
            cost = self.cost[name]
            out[name] = {"every": self.every[name], **{k: list(v) for k, v in self.steps[name].items()},
                         "seconds": round(self.spent[name], 4), "cost_s": None if cost is None else round(cost, 4),
                         **({"first": dict(self.first[name])} if name in self.first else {})}
        return out
