"""The entropy–performance law R = −a·exp(H) + b (Cui et al., arXiv:2505.22617).

Fitted by least squares to (mean entropy, mean reward) pairs along a run; its predicted ceiling at H → 0 is b − a.
The health rules (saturation), `forkwatch check` and the dashboard's Law page all use this one fit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LawFit:
    """R = −a·exp(H) + b fitted to (mean entropy, mean reward); `ceiling` = b − a, None when the fit is refused."""

    a: float | None
    b: float | None
    r2: float | None
    n_points: int
    ceiling: float | None
    reason: str | None = None  # why no ceiling is reported

    @property
    def ok(self) -> bool:
        return self.reason is None

    def predict(self, entropy: np.ndarray | float) -> np.ndarray:
        if self.a is None or self.b is None:
            raise ValueError(f"no law to predict with: {self.reason}")
        return -self.a * np.exp(np.asarray(entropy, dtype=np.float64)) + self.b

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """The fit in one line, the same in the terminal and on the dashboard (the one place it is worded)."""
        if not self.ok:
            return f"no ceiling ({self.reason})"
        return (f"R = -a·exp(H) + b with a = {self.a:.4g}, b = {self.b:.4g}: ceiling {self.ceiling:.4g}, "
                f"R² {self.r2:.3f}, {self.n_points} points")


MIN_POINTS = 8  # fewer (entropy, reward) pairs than this give no ceiling: two parameters need some spread to pin
MIN_R2 = 0.6  # below this the exponential does not describe the run well enough to quote its ceiling


def fit_entropy_law(
    entropy: Any, reward: Any, *, min_points: int = MIN_POINTS, min_r2: float = MIN_R2, fraction: float = 1.0
) -> LawFit:
    """Least-squares fit of R = −a·exp(H) + b (arXiv:2505.22617), linear in x = exp(H).

    Pairs with a non-finite value are dropped. `fraction` < 1 fits only the first part of the run (the paper found
    the first ~15 % of steps enough to extrapolate). The ceiling is refused (None, with a `reason`) from fewer than
    `min_points` pairs, when entropy or reward does not vary, when a ≤ 0 (reward does not rise as entropy falls, so
    the law does not describe the run) or when R² < `min_r2`.
    """
    h = np.asarray(entropy, dtype=np.float64)
    r = np.asarray(reward, dtype=np.float64)
    if h.shape != r.shape:
        raise ValueError(f"entropy and reward differ in length: {h.shape} vs {r.shape}")
    with np.errstate(over="ignore"):
        x = np.exp(h)
    ok = np.isfinite(x) & np.isfinite(r)
    x, r = x[ok], r[ok]
    if fraction < 1:
        k = max(1, math.ceil(fraction * x.size))
        x, r = x[:k], r[:k]
    n = int(x.size)
    if n < min_points:
        return LawFit(None, None, None, n, None, f"{n} finite (entropy, reward) point(s), fewer than {min_points}")
    if np.ptp(x) == 0 or np.ptp(r) == 0:
        return LawFit(None, None, None, n, None, "entropy or reward does not vary: nothing to fit")
    slope, b = np.polyfit(x, r, 1)
    a = -float(slope)
    residual = r - (b + slope * x)
    r2 = float(1 - residual @ residual / ((r - r.mean()) @ (r - r.mean())))
    a, b, r2 = round(a, 8), round(float(b), 8), round(r2, 6)
    if a <= 0:
        return LawFit(a, b, r2, n, None, f"a = {a:.4g} ≤ 0: reward does not rise as entropy falls")
    if r2 < min_r2:
        return LawFit(a, b, r2, n, None, f"poor fit: R² = {r2:.3f} < {min_r2}")
    return LawFit(a, b, r2, n, round(b - a, 8))
