"""Which steps the Forks page reads for its fork-text figures on a long run (no Streamlit here: the dashboard
benchmark times the same rule)."""

from __future__ import annotations

FORK_SAMPLE_STEPS = 40  # steps read at most: bounds the figures' cost however long the run


def sample_steps(steps: list[int], k: int = FORK_SAMPLE_STEPS) -> tuple[int, ...]:
    """At most k of the given steps, evenly spaced, always the first and the last."""
    if len(steps) <= k:
        return tuple(steps)
    return tuple(steps[i] for i in sorted({round(i * (len(steps) - 1) / (k - 1)) for i in range(k)}))
