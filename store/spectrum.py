"""The entropy spectrum: a histogram of a step's token entropies over fixed, log-spaced bins.

A mean and a p10-p90 band hide the shape of the high-entropy tail, and collapse at token level is that tail
draining (on Qwen3-8B math rollouts over half the tokens have H < 0.01 nats and the top 20 % sit above 0.67,
arXiv:2506.01939). Counts per bin, per step, show it.

The edges are defined once, here, and are the same for every run and every vocabulary, so that two runs' spectra
can be compared bin by bin: four bins per decade from 1e-4 nats up to 10^1.25 ≈ 17.8 nats, which is above
log V for any vocabulary under 50 million tokens. Bin 0 holds everything below 1e-4 (confident tokens, and the
tiny negative values float rounding gives an entropy of 0), the last bin everything at or above the top edge.
A reader crops the bins above log V of its run (`bins_below`): they are empty by construction.
"""

from __future__ import annotations

import math

import numpy as np

BINS_PER_DECADE = 4
LOW_EDGE = 1e-4  # nats
# Inner edges (nats): LOW_EDGE · 10^(i / BINS_PER_DECADE), i = 0 … 21; bin j covers [EDGES[j-1], EDGES[j]).
EDGES: tuple[float, ...] = tuple(float(LOW_EDGE * 10 ** (i / BINS_PER_DECADE)) for i in range(22))
N_BINS = len(EDGES) + 1  # below the first edge, between consecutive edges, at or above the last
_EDGES = np.asarray(EDGES)  # searchsorted would convert the tuple on every call (once per training step)


def spectrum_counts(entropy: np.ndarray) -> list[int]:
    """Counts of `entropy` (nats, any shape) per spectrum bin -> N_BINS ints. Non-finite values are not counted."""
    values = np.asarray(entropy, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    # side="right": a value equal to an edge belongs to the bin that edge opens
    return np.bincount(np.searchsorted(_EDGES, values, side="right"), minlength=N_BINS).tolist()


def bin_bounds(j: int) -> tuple[float, float]:
    """(low, high) nats of bin j; low is 0 for bin 0 and high is inf for the last."""
    low = 0.0 if j == 0 else EDGES[j - 1]
    high = math.inf if j == N_BINS - 1 else EDGES[j]
    return low, high


def bin_label(j: int) -> str:
    """A short label of bin j for axes: '<1e-04', '[0.1, 0.18)', '≥17.8'."""
    low, high = bin_bounds(j)
    if j == 0:
        return f"<{high:.0e}"
    if j == N_BINS - 1:
        return f"≥{low:.3g}"
    return f"[{low:.2g}, {high:.2g})"


def bins_below(vocab_size: int | None) -> int:
    """How many bins a run with this vocabulary can fill: the bins whose low bound is below log V (all bins when V
    is unknown)."""
    if not vocab_size or vocab_size < 2:
        return N_BINS
    log_v = math.log(vocab_size)
    return sum(1 for j in range(N_BINS) if bin_bounds(j)[0] < log_v)
