"""Fork value's statistics, numpy only: from the rewards of m rollouts per branch at one position to Q, V, the fork
value, their standard errors and tests; and the stratified sample of positions with each one's inclusion
probability. docs/methods.md ("Fork value") gives the formulas and why each estimator was chosen; in brief:

- Q(s, a): the mean of the branch's m rewards. Its standard error and 95 % interval are Agresti–Coull's on the
  rewards rescaled to the measurement's reward range [lo, hi] (the variance of a mean of values in [0, 1] is at most
  that of a Bernoulli mean): with a few rollouts the plain s/√m is 0 whenever every rollout scored alike, and
  its interval would then miss any Q short of 0 or 1.
- V(s) = Σ w Q with w = π / Σ π over the branches measured; its SE from the branches' (independent) SEs, and its
  interval centred, like Q's, on the Agresti–Coull centres Σ w p̃ (centred on V̂ itself it under-covers with 4 rollouts,
  where a branch's 4 rewards are often all alike).
- The fork value Σ w |Q − V| is estimated by **cross-fitting**: the rollouts of each branch are split in two halves
  A, B; the signs of Q − V come from one half and the magnitudes from the other, both ways, averaged over several
  random splits. The plug-in Σ w |Q̂ − V̂| would be inflated by noise alone (by about Σ w·SE where no branch matters);
  the cross-fitted estimate is 0 in expectation there, and elsewhere biased only toward 0, by less than its SE.
- Its SE is the larger of a bootstrap over the rollouts and the delta method's at the estimated signs (a tied sign
  taken at its worst): the bootstrap alone is 0 wherever the rollouts of each branch agree.
- `p_value`: a permutation test of "no branch changes the reward" (rollouts exchangeable across branches), exact
  whatever m; the statistic is the plug-in value.
- `consequential`: the value is above `min_value` at one-sided 95 % confidence, value − 1.645·SE > min_value (the
  form arXiv:2606.25524 uses for cliff tokens). A floor above 0 is needed: a token whose every alternative fails (a
  comma the format requires) has a fork value that is tiny yet significantly above 0.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # two-sided 95 %
Z95_ONE_SIDED = 1.6448536269514722
_TIE = 1e-9  # |Q − V| below this (relative to the reward range) is a tie: its sign is unknown
_MAX_TIED_ENUMERATION = 10  # tied branches whose worst-case signs are enumerated (2**10 cases); beyond, bounded


@dataclass(frozen=True)
class BranchEstimates:
    """Per branch, shape (K,): Q, its standard error and 95 % interval (Agresti–Coull on the reward range)."""

    q: np.ndarray
    se: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    centre: np.ndarray  # the interval's centre, lo + (hi − lo)·p̃


def branch_estimates(rewards: np.ndarray, reward_range: tuple[float, float]) -> BranchEstimates:
    """`rewards` (K, m) -> Q = the branch means, with Agresti–Coull's SE and interval on rewards rescaled to
    `reward_range` (lo, hi): p̃ = (x + z²/2)/(m + z²), x the sum of rescaled rewards,
    SE = (hi − lo)·√(p̃(1 − p̃)/(m + z²))."""
    r = np.asarray(rewards, dtype=np.float64)
    lo, hi = reward_range
    width = hi - lo
    m = r.shape[-1]
    q = r.mean(-1)
    if width <= 0:  # every reward of the measurement is the same: nothing varies
        zero = np.zeros_like(q)
        return BranchEstimates(q, zero, q.copy(), q.copy(), q.copy())
    x = np.clip((r - lo) / width, 0.0, 1.0).sum(-1)
    z2 = Z95**2
    p = (x + z2 / 2) / (m + z2)
    half = np.sqrt(p * (1 - p) / (m + z2))
    return BranchEstimates(q, width * half, lo + width * np.clip(p - Z95 * half, 0, 1),
                           lo + width * np.clip(p + Z95 * half, 0, 1), lo + width * p)


def weights(pi: np.ndarray) -> np.ndarray:
    """π over the measured branches, normalised to sum to 1 (V and the value are normalised the same way)."""
    pi = np.asarray(pi, dtype=np.float64)
    total = pi.sum()
    if not total > 0:
        raise ValueError("the measured branches have no probability mass")
    return pi / total


def fork_value(w: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Σ_a w_a |q_a − Σ_b w_b q_b| over the last axis: the fork value of exact Q's, or the plug-in of estimated ones."""
    v = (w * q).sum(-1, keepdims=True)
    return (w * np.abs(q - v)).sum(-1)


def cross_fit_value(w: np.ndarray, rewards: np.ndarray, rng: np.random.Generator, splits: int) -> np.ndarray:
    """The cross-fitted fork value of `rewards` (..., K, m), m ≥ 2: for each of `splits` random halvings of every
    branch's rollouts, ½[Σ w·sign(Q_A − V_A)·(Q_B − V_B) + Σ w·sign(Q_B − V_B)·(Q_A − V_A)], averaged. -> (...)."""
    r = np.asarray(rewards, dtype=np.float64)
    m = r.shape[-1]
    if m < 2:
        raise ValueError(f"cross-fitting needs >= 2 rollouts per branch, got {m}")
    h = m // 2
    total = np.zeros(r.shape[:-2])
    for _ in range(splits):
        order = np.argsort(rng.random(r.shape), axis=-1)
        shuffled = np.take_along_axis(r, order, axis=-1)
        qa, qb = shuffled[..., :h].mean(-1), shuffled[..., h:].mean(-1)
        da = qa - (w * qa).sum(-1, keepdims=True)
        db = qb - (w * qb).sum(-1, keepdims=True)
        total += 0.5 * ((w * np.sign(da) * db).sum(-1) + (w * np.sign(db) * da).sum(-1))
    return total / splits


def delta_se(w: np.ndarray, q: np.ndarray, se: np.ndarray, scale: float) -> float:
    """The delta method's SE of Σ w |Q − V| at the estimated signs s = sign(Q̂ − V̂): √Σ (w_a (s_a − Σ w s))² se_a².
    A branch tied with V (|Q̂ − V̂| below 1e-9·scale) has an unknown sign: the largest SE over its signs is taken."""
    d = q - (w * q).sum()
    s = np.sign(d)
    tied = np.abs(d) <= _TIE * max(scale, 1e-12)
    s[tied] = 0.0
    n_tied = int(tied.sum())

    def at(signs: np.ndarray) -> float:
        c = w * (signs - (w * signs).sum())
        return float(np.sqrt(((c * se) ** 2).sum()))

    if n_tied == 0:
        return at(s)
    if n_tied > _MAX_TIED_ENUMERATION:  # |s_a − Σ w s| ≤ 2: a bound, not the maximum
        return float(np.sqrt(((2 * w * se) ** 2).sum()))
    best = 0.0
    for combo in itertools.product((-1.0, 1.0), repeat=n_tied):
        signs = s.copy()
        signs[tied] = combo
        best = max(best, at(signs))
    return best


def permutation_p(w: np.ndarray, rewards: np.ndarray, rng: np.random.Generator, permutations: int) -> float:
    """P-value of "no branch changes the reward": the plug-in value of `rewards` (K, m) against its values with the
    K·m rewards dealt to the branches at random, (1 + #{permuted ≥ observed}) / (1 + permutations)."""
    r = np.asarray(rewards, dtype=np.float64)
    k, m = r.shape
    observed = fork_value(w, r.mean(-1))
    flat = r.reshape(-1)
    if np.ptp(flat) == 0:
        return 1.0  # every rollout scored alike
    dealt = flat[np.argsort(rng.random((permutations, k * m)), axis=-1)].reshape(permutations, k, m)
    null = fork_value(w, dealt.mean(-1))
    return float((1 + np.count_nonzero(null >= observed - 1e-12)) / (1 + permutations))


@dataclass(frozen=True)
class PositionEstimate:
    """One measured position: the branches' estimates and the position's own."""

    branches: BranchEstimates
    mass: float  # Σ π over the measured branches (the rest is treated as in docs/methods.md)
    v: float
    v_se: float
    v_lo: float  # V's 95 % interval: Σ w·centre ± 1.96·v_se
    v_hi: float
    value: float  # cross-fitted
    value_se: float
    p_value: float
    spread: float  # max Q − min Q
    sampled_advantage: float  # Q(sampled) − V
    consequential: bool


def estimate_position(pi: np.ndarray, rewards: np.ndarray, *, sampled: int, reward_range: tuple[float, float],
                      rng: np.random.Generator, min_value: float = 0.05, splits: int = 8, bootstrap: int = 100,
                      permutations: int = 200) -> PositionEstimate:
    """Every estimate of one position from π (K,) of its branches and their `rewards` (K, m); `sampled` is the index
    of the sampled token's branch."""
    pi = np.asarray(pi, dtype=np.float64)
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != pi.shape[0]:
        raise ValueError(f"rewards {r.shape} must be (branches, rollouts) for {pi.shape[0]} branches")
    w = weights(pi)
    b = branch_estimates(r, reward_range)
    v = float((w * b.q).sum())
    v_se = float(np.sqrt(((w * b.se) ** 2).sum()))
    value = float(cross_fit_value(w, r, rng, splits))
    m = r.shape[1]
    resampled = np.take_along_axis(np.broadcast_to(r, (bootstrap, *r.shape)),
                                   rng.integers(0, m, size=(bootstrap, *r.shape)), axis=-1)
    boot_se = float(cross_fit_value(w, resampled, rng, 2).std()) if bootstrap > 1 else 0.0
    scale = reward_range[1] - reward_range[0]
    value_se = max(boot_se, delta_se(w, b.q, b.se, scale))
    centre = float((w * b.centre).sum())
    return PositionEstimate(
        branches=b, mass=float(pi.sum()), v=v, v_se=v_se, v_lo=centre - Z95 * v_se, v_hi=centre + Z95 * v_se,
        value=value, value_se=value_se,
        p_value=permutation_p(w, r, rng, permutations) if len(pi) > 1 else 1.0,
        spread=float(b.q.max() - b.q.min()), sampled_advantage=float(b.q[sampled] - v),
        consequential=bool(value - Z95_ONE_SIDED * value_se > min_value),
    )


def strata_of(is_fork: np.ndarray, selected: np.ndarray | None = None, role: np.ndarray | None = None) -> np.ndarray:
    """The stratum of each recorded position of one step (N,): "fork" / "other", preceded by its ground-truth role
    where there is one ("decision/fork"), and followed by "kept" / "dropped" when the step's selector dropped tokens
    (`selected` = 0 somewhere), so that a sparse selector's kept tokens are measured in proportion to the question
    asked of them."""
    out = np.where(np.asarray(is_fork, dtype=bool), "fork", "other").astype(object)
    if role is not None:
        out = np.asarray(role, dtype=object) + "/" + out
    if selected is not None:
        sel = np.nan_to_num(np.asarray(selected, dtype=np.float64), nan=1.0)
        if (sel == 0).any():
            out = out + np.where(sel > 0, "/kept", "/dropped")
    return out.astype(str)


def stratified_sample(strata: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A stratified sample of `n` of the units labelled `strata` (N,): an equal share per stratum (a stratum smaller
    than its share is taken whole and the rest shared among the others), drawn uniformly without replacement within
    each. -> (indices of the sampled units, ascending; their inclusion probabilities n_h / N_h)."""
    strata = np.asarray(strata)
    if n < 0:
        raise ValueError(f"n={n}: pass a number of positions >= 0")
    labels, inverse, sizes = np.unique(strata, return_inverse=True, return_counts=True)
    take = np.zeros(len(labels), dtype=np.int64)
    left = min(n, int(sizes.sum()))
    open_ = np.ones(len(labels), dtype=bool)
    while left > 0 and open_.any():  # water-filling: equal shares, capped at each stratum's size
        share = max(1, left // int(open_.sum()))
        for h in np.flatnonzero(open_):
            add = min(share, int(sizes[h] - take[h]), left)
            take[h] += add
            left -= add
            if take[h] == sizes[h]:
                open_[h] = False
            if left == 0:
                break
    chosen, prob = [], []
    for h in range(len(labels)):
        if take[h] == 0:
            continue
        members = np.flatnonzero(inverse == h)
        chosen.append(rng.choice(members, size=int(take[h]), replace=False))
        prob.append(np.full(int(take[h]), take[h] / sizes[h]))
    if not chosen:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    idx, p = np.concatenate(chosen), np.concatenate(prob)
    order = np.argsort(idx)
    return idx[order], p[order]
