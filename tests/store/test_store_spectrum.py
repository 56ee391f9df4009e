"""store/spectrum.py: fixed log-spaced bins and per-step counts."""

from __future__ import annotations

import math

import numpy as np
from forkwatch.store.spectrum import EDGES, LOW_EDGE, N_BINS, bin_bounds, bin_label, bins_below, spectrum_counts


def test_edges_are_log_spaced_from_1e4_past_log_of_a_large_vocabulary():
    assert EDGES[0] == LOW_EDGE == 1e-4
    ratios = np.diff(np.log10(EDGES))
    np.testing.assert_allclose(ratios, 0.25, rtol=1e-12)
    assert EDGES[-1] > math.log(152_064) and EDGES[-1] > math.log(262_144)


def test_counts_place_each_value_in_its_bin():
    values = np.array([0.0, -1e-7, 5e-5, 1e-4, 0.5, 3.0, 1e3])
    counts = spectrum_counts(values)
    assert len(counts) == N_BINS and sum(counts) == len(values)
    assert counts[0] == 3  # 0, the rounding negative, 5e-5
    assert counts[1] == 1  # 1e-4 opens bin 1
    assert counts[-1] == 1  # above the top edge
    for v in (0.5, 3.0):
        j = next(j for j in range(N_BINS) if bin_bounds(j)[0] <= v < bin_bounds(j)[1])
        assert counts[j] >= 1


def test_counts_match_a_direct_loop_on_random_entropies():
    rng = np.random.default_rng(0)
    values = np.exp(rng.uniform(math.log(1e-6), math.log(12.0), size=5000)).astype(np.float32)
    counts = spectrum_counts(values)
    direct = [0] * N_BINS
    for v in values.astype(np.float64):
        direct[next(j for j in range(N_BINS) if bin_bounds(j)[0] <= v < bin_bounds(j)[1])] += 1
    assert counts == direct


def test_non_finite_values_are_not_counted_and_empty_input_gives_zeros():
    assert sum(spectrum_counts(np.array([np.nan, np.inf, 1.0]))) == 1
    assert spectrum_counts(np.array([])) == [0] * N_BINS


def test_bins_below_crops_to_log_vocab():
    v = 40  # a char-level vocabulary: log V = 3.69 nats
    n = bins_below(v)
    assert bin_bounds(n - 1)[0] < math.log(v) <= bin_bounds(n)[0]
    assert bins_below(None) == N_BINS


def test_labels_name_the_open_ends():
    assert bin_label(0).startswith("<") and bin_label(N_BINS - 1).startswith("≥")
    assert len({bin_label(j) for j in range(N_BINS)}) == N_BINS
