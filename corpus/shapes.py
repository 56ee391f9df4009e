"""The labelled corpus of step series that judges forkwatch's health rules (tests/store/test_health_corpus.py).

Each synthetic series is defined here in code: noiseless curves for mean entropy, the entropy p90 tail, mean
reward, mean completion length and truncated fraction, plus seeded noise. They are code, not data files, because
the test re-draws the noise with several seeds (a verdict must not hold for one noise draw only); `series(name,
seed)` is deterministic. The demo's runs, which cannot be redrawn, are stored as CSV files in `corpus/demo/`
(written once by `scripts/health_corpus.py --demo`) and loaded by `load_demo()`.

Each series names the source whose curves it imitates: a figure of a paper (its shape, not its numbers), or a run
of ours; some are scenarios with no figure behind them, and say so. Labels are what a person reading those curves
would call the run: "healthy", "collapse" or "explosion".

The second group (`OVERLAP`) was added so that the thresholds are tested where they matter: its healthy and
failing series overlap in their entropy ratios (a slow drain to a tenth of the early entropy with reward still
rising, which its authors would call healthy; a collapse that stops at a quarter of the early level; an explosion
that stays below twice the early level; a healthy rise of 3.5×), and two runs sit near the reward's ceiling, one
healthy and one plateaued far below it (`reward_range` declares what the reward functions can give).

Onset labels (`onset_step`): the first step at which the noiseless mean entropy is below half (collapse) or above
1.5× (explosion) its value at step 1 — a labelling convention fixed before the rules were run on these series,
independent of the rules' thresholds (0.2 and 2). Detection latency is measured from it (scripts/health_corpus.py).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLUMNS = ("step", "entropy_mean", "entropy_p90", "reward_mean", "completion_length_mean", "truncated_fraction")
LABELS = ("healthy", "collapse", "explosion")
DEMO_DIR = Path(__file__).with_name("demo")

MECHANISM = "arXiv:2505.22617 (entropy mechanism: entropy drains to ~0 as reward plateaus, R = -a·exp(H) + b)"
DAPO = "arXiv:2503.14476 (DAPO clip-higher: entropy kept up or rising from a low start, length growing)"
FORKING = "arXiv:2506.01939 (training on the top-20 % high-entropy tokens: entropy held, reward rising)"
SKYWORK = "arXiv:2505.22312 (Skywork-OR1: premature collapse; entropy-loss coefficient too large explodes)"
ADAPTIVE = "arXiv:2505.22312 (Skywork-OR1 adaptive entropy control: entropy held at a target)"


@dataclass(frozen=True)
class Curves:
    """Noiseless curves as functions of u = step / (n − 1) in [0, 1], and the noise added to each."""

    entropy: Callable[[np.ndarray], np.ndarray]
    reward: Callable[[np.ndarray], np.ndarray]
    length: Callable[[np.ndarray], np.ndarray] = lambda u: 400 + 0 * u
    truncated: Callable[[np.ndarray], np.ndarray] = lambda u: 0.02 + 0 * u
    tail_ratio: Callable[[np.ndarray], np.ndarray] = lambda u: 2.4 + 0 * u  # p90 / mean
    entropy_noise: float = 0.06  # relative
    reward_noise: float = 0.04  # absolute (a step's mean over a batch of groups)
    spikes: tuple[tuple[float, int, float, float], ...] = ()  # (u, steps, entropy ×, reward +): a bad batch


@dataclass(frozen=True)
class Spec:
    name: str
    label: str
    n_steps: int
    source: str
    what: str
    curves: Curves
    reward_range: tuple[float, float] | None = None  # what the reward functions can give, when the source says

    @property
    def onset_step(self) -> int | None:
        """Where a failing series' failure begins (the module docstring's convention); None for a healthy one."""
        if self.label == "healthy":
            return None
        u = np.linspace(0, 1, self.n_steps)
        ratio = self.curves.entropy(u) / self.curves.entropy(u[:1])[0]
        crossed = np.flatnonzero(ratio < 0.5 if self.label == "collapse" else ratio > 1.5)
        return int(crossed[0]) + 1 if crossed.size else None  # steps are 1-based


def _sig(u: np.ndarray, at: float, width: float) -> np.ndarray:
    """A smooth 0 → 1 step centred at `at`."""
    return 1 / (1 + np.exp(-(u - at) / width))


def _drain(u: np.ndarray) -> np.ndarray:
    """The entropy-mechanism collapse: an exponential drain from 1.1 nats to 0.01."""
    return 0.01 + 1.1 * np.exp(-15 * u)


def _sat(u: np.ndarray, rate: float) -> np.ndarray:
    """A saturating rise 0 → 1."""
    return 1 - np.exp(-rate * u)


SPECS = [
    # ---------------------------------------------------------------- healthy
    Spec("healthy_slow_fall", "healthy", 600, MECHANISM,
         "entropy falls slowly 1.2 → 0.5 while reward rises and saturates (the early, useful part of the trade)",
         Curves(lambda u: 0.5 + 0.7 * np.exp(-2.5 * u), lambda u: 0.25 + 0.4 * _sat(u, 4),
                length=lambda u: 600 + 100 * u)),
    Spec("healthy_slow_fall_noisy", "healthy", 400, MECHANISM,
         "the same slow fall with twice the noise of a small batch",
         Curves(lambda u: 0.45 + 0.55 * np.exp(-2 * u), lambda u: 0.3 + 0.3 * _sat(u, 3), entropy_noise=0.12,
                reward_noise=0.08)),
    Spec("healthy_long_decline", "healthy", 1000, MECHANISM,
         "1000 steps, entropy 1.0 → 0.3 (never below 0.2 × its start) as reward climbs slowly",
         Curves(lambda u: 0.3 + 0.7 * (1 - u) ** 1.5, lambda u: 0.2 + 0.5 * np.log1p(9 * u) / np.log(10),
                length=lambda u: 500 + 300 * u)),
    Spec("clip_higher_rise", "healthy", 500, DAPO,
         "entropy rises 0.15 → 0.40 from a low start, reward rises, length grows 300 → 550 untruncated",
         Curves(lambda u: 0.15 + 0.25 * _sat(u, 3), lambda u: 0.1 + 0.35 * _sat(u, 2.5),
                length=lambda u: 300 + 250 * _sat(u, 2), truncated=lambda u: 0.01 + 0.02 * u)),
    Spec("clip_higher_small", "healthy", 300, DAPO,
         "0.12 → 0.28 nats with reward rising and no truncation: a ratio of a tiny early level, not an explosion",
         Curves(lambda u: 0.12 + 0.16 * _sat(u, 4), lambda u: 0.15 + 0.3 * _sat(u, 3),
                length=lambda u: 250 + 150 * u, truncated=lambda u: 0.005 + 0 * u)),
    Spec("adaptive_target", "healthy", 800, ADAPTIVE,
         "entropy falls from 0.9 to a controller's target 0.35 by step ~150 and oscillates around it",
         Curves(lambda u: 0.35 + 0.55 * np.exp(-12 * u) + 0.03 * np.sin(40 * u), lambda u: 0.2 + 0.45 * _sat(u, 3))),
    Spec("adaptive_target_from_below", "healthy", 600, ADAPTIVE,
         "entropy starts at 0.14, below the target 0.3; the controller raises it and holds it there",
         Curves(lambda u: 0.3 - 0.16 * np.exp(-10 * u) + 0.02 * np.sin(30 * u), lambda u: 0.3 + 0.3 * _sat(u, 2.5),
                length=lambda u: 350 + 120 * _sat(u, 3))),
    Spec("noisy_plateau", "healthy", 500, "scenario: flat, noisy curves (no paper figure)",
         "entropy flat at 0.6 ± 15 %, reward flat at 0.5 ± 0.08",
         Curves(lambda u: 0.6 + 0 * u, lambda u: 0.5 + 0 * u, entropy_noise=0.15, reward_noise=0.08)),
    Spec("noisy_plateau_low", "healthy", 300, DAPO,
         "entropy flat at a tiny 0.08 ± 30 % (ratios of it are noise), reward flat",
         Curves(lambda u: 0.08 + 0 * u, lambda u: 0.6 + 0 * u, entropy_noise=0.3, reward_noise=0.06)),
    Spec("bad_batch_spike", "healthy", 400, "scenario: one bad batch, a two-step spike (no paper figure)",
         "slow fall with a two-step spike to 3× entropy and a reward dip at step ~200",
         Curves(lambda u: 0.5 + 0.4 * np.exp(-2 * u), lambda u: 0.3 + 0.3 * _sat(u, 3),
                spikes=((0.5, 2, 3.0, -0.3),))),
    Spec("bad_batch_dip", "healthy", 250, "scenario: single steps whose batch was all-identical answers (no paper figure)",
         "single-step drops to 5 % of the level and a single-step jump to 2.5×",
         Curves(lambda u: 0.7 - 0.2 * u, lambda u: 0.4 + 0.2 * u, spikes=((0.3, 1, 0.05, 0.0), (0.7, 1, 2.5, -0.2)))),
    Spec("forking_tokens_held", "healthy", 300, FORKING,
         "entropy held level (slightly rising), the tail kept, reward rising",
         Curves(lambda u: 0.55 + 0.1 * u, lambda u: 0.2 + 0.4 * _sat(u, 3), tail_ratio=lambda u: 2.8 + 0 * u)),
    # ---------------------------------------------------------------- collapse
    Spec("mechanism_collapse", "collapse", 600, MECHANISM,
         "entropy drains exponentially to ~0.01 within ~200 steps; reward follows the law, then plateaus",
         Curves(lambda u: _drain(u), lambda u: 0.8 - 0.3 * np.exp(_drain(u)),
                tail_ratio=lambda u: 2.4 - 1.4 * _sat(u, 10))),
    Spec("mechanism_collapse_slow", "collapse", 800, MECHANISM,
         "a slower drain to 0.03 by step ~500, reward flat for the last 300 steps",
         Curves(lambda u: 0.03 + 0.9 * np.exp(-7 * u), lambda u: 0.2 + 0.45 * _sat(u, 8))),
    Spec("high_lr_fast_collapse", "collapse", 200, SKYWORK,
         "high learning rate: entropy 0.9 → 0.01 between steps 40 and 70; reward rises briefly, then falls",
         Curves(lambda u: 0.01 + 0.9 * (1 - _sig(u, 0.27, 0.03)),
                lambda u: 0.3 + 0.15 * _sig(u, 0.25, 0.03) - 0.25 * _sig(u, 0.45, 0.05),
                tail_ratio=lambda u: 2.4 - 1.5 * _sig(u, 0.3, 0.03))),
    Spec("length_collapse", "collapse", 300, SKYWORK,
         "entropy collapses as completions shrink 400 → 60 tokens; reward stagnant",
         Curves(lambda u: 0.04 + 0.7 * (1 - _sig(u, 0.4, 0.06)), lambda u: 0.35 + 0.05 * _sat(u, 5),
                length=lambda u: 60 + 340 * (1 - _sig(u, 0.4, 0.06)))),
    Spec("premature_collapse", "collapse", 500, SKYWORK,
         "premature collapse: entropy ~0.05 by step 150, reward flat afterwards",
         Curves(lambda u: 0.04 + 0.8 * np.exp(-14 * u), lambda u: 0.3 + 0.2 * _sat(u, 15))),
    Spec("collapse_after_stable", "collapse", 600, SKYWORK,
         "stable for 300 steps, then entropy drains in ~50 steps and reward drops",
         Curves(lambda u: 0.02 + 0.6 * (1 - _sig(u, 0.55, 0.025)),
                lambda u: 0.3 + 0.2 * _sat(u, 4) - 0.2 * _sig(u, 0.6, 0.03))),
    # ---------------------------------------------------------------- explosion
    Spec("entropy_bonus_explosion", "explosion", 400, SKYWORK,
         "entropy-loss coefficient too large: entropy 0.8 → 4 over steps 100-250, reward to ~0, length at the cap",
         Curves(lambda u: 0.8 + 3.4 * _sig(u, 0.45, 0.07), lambda u: 0.45 * (1 - _sig(u, 0.5, 0.06)),
                length=lambda u: 400 + 600 * _sig(u, 0.5, 0.06), truncated=lambda u: 0.02 + 0.85 * _sig(u, 0.5, 0.06))),
    Spec("instability_after_stable", "explosion", 600, SKYWORK,
         "400 stable steps, then entropy 0.5 → 3 with reward crashing and truncation rising",
         Curves(lambda u: 0.5 + 2.5 * _sig(u, 0.75, 0.03), lambda u: 0.3 + 0.3 * _sat(u, 4) - 0.5 * _sig(u, 0.77, 0.03),
                truncated=lambda u: 0.03 + 0.6 * _sig(u, 0.77, 0.03))),
    Spec("low_start_explosion", "explosion", 400, DAPO,
         "from a low start 0.1, entropy climbs to 2.0; reward falls, truncation rises",
         Curves(lambda u: 0.1 + 1.9 * _sig(u, 0.5, 0.08), lambda u: 0.4 - 0.3 * _sig(u, 0.55, 0.08),
                truncated=lambda u: 0.02 + 0.5 * _sig(u, 0.55, 0.08))),
    Spec("low_start_runaway_length", "explosion", 300, DAPO,
         "0.15 → 1.2 nats; completions grow 4× (incoherent text), reward falls",
         Curves(lambda u: 0.15 + 1.05 * _sig(u, 0.5, 0.07), lambda u: 0.5 - 0.3 * _sig(u, 0.55, 0.07),
                length=lambda u: 200 + 600 * _sig(u, 0.55, 0.07))),
    Spec("clip_too_high", "explosion", 500, DAPO,
         "an upper clip far too high: entropy 0.3 → 2.5; reward rises at first, then falls",
         Curves(lambda u: 0.3 + 2.2 * _sig(u, 0.55, 0.1), lambda u: 0.2 + 0.3 * _sat(u, 6) - 0.35 * _sig(u, 0.65, 0.07),
                truncated=lambda u: 0.02 + 0.3 * _sig(u, 0.65, 0.07))),
]
CEILING = "scenario: a strong instruct model on an easy task, reward near its maximum from the start (issue #27)"
OVERLAP = [
    # ---------------------------------------------------------------- healthy, with failing-looking ratios
    Spec("slow_drain_reward_rising", "healthy", 800, MECHANISM,
         "entropy drains steadily 1.0 → 0.14 (below 0.2 × its start from step ~480) while reward keeps rising "
         "0.2 → 0.7 to the end: the useful early part of the trade, drawn long",
         Curves(lambda u: 0.12 + 0.88 * np.exp(-4 * u) * (1 - 0.02 * u), lambda u: 0.2 + 0.5 * u)),
    Spec("near_ceiling_drain", "healthy", 600, CEILING,
         "reward 0.90 → 0.93 of a maximum of 1, entropy drains 0.5 → 0.06 (a tenth) with the tail kept above "
         "0.05: nothing was left to gain",
         Curves(lambda u: 0.06 + 0.44 * np.exp(-3.5 * u), lambda u: 0.9 + 0.03 * _sat(u, 3), reward_noise=0.03),
         reward_range=(0.0, 1.0)),
    Spec("healthy_rise_3x", "healthy", 500, DAPO,
         "clip-higher from a low start: entropy 0.1 → 0.35 (3.5×), reward rising, completions growing 2× "
         "untruncated",
         Curves(lambda u: 0.1 + 0.25 * _sat(u, 3), lambda u: 0.15 + 0.4 * _sat(u, 3),
                length=lambda u: 300 + 300 * _sat(u, 2), truncated=lambda u: 0.01 + 0.01 * u)),
    # ---------------------------------------------------------------- collapse, with a healthy-looking ratio
    Spec("dapo_baseline_collapse", "collapse", 400, DAPO,
         "GRPO without clip-higher: entropy 0.6 → 0.15 (a quarter, not a fifth) within ~80 steps, then flat; "
         "reward plateaus early at 0.35",
         Curves(lambda u: 0.15 + 0.45 * np.exp(-18 * u), lambda u: 0.2 + 0.15 * _sat(u, 15))),
    Spec("plateau_below_ceiling_drain", "collapse", 600, MECHANISM,
         "the paper's collapse near a known maximum: entropy drains 0.5 → 0.06 as above, reward plateaus at 0.55 "
         "of a maximum of 1 from step ~150",
         Curves(lambda u: 0.06 + 0.44 * np.exp(-3.5 * u), lambda u: 0.3 + 0.25 * _sat(u, 10), reward_noise=0.03),
         reward_range=(0.0, 1.0)),
    # ---------------------------------------------------------------- explosion, with a healthy-looking ratio
    Spec("moderate_explosion", "explosion", 500, SKYWORK,
         "an instability that stays below 2× the early entropy: 0.9 → 1.6 over steps 250–350, reward crashing "
         "0.5 → 0.2, truncation 5 % → 50 %",
         Curves(lambda u: 0.9 + 0.7 * _sig(u, 0.6, 0.04), lambda u: 0.5 - 0.3 * _sig(u, 0.62, 0.04),
                truncated=lambda u: 0.05 + 0.45 * _sig(u, 0.62, 0.04))),
    Spec("low_level_explosion", "explosion", 400, DAPO,
         "from a very low level: 0.05 → 0.2 nats (4×, still small in nats), reward falling, length running to the "
         "cap",
         Curves(lambda u: 0.05 + 0.15 * _sig(u, 0.5, 0.06), lambda u: 0.45 - 0.25 * _sig(u, 0.55, 0.06),
                length=lambda u: 400 + 500 * _sig(u, 0.55, 0.06), truncated=lambda u: 0.02 + 0.4 * _sig(u, 0.55, 0.06))),
]
SPECS = SPECS + OVERLAP
BY_NAME = {s.name: s for s in SPECS}


def series(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """One synthetic series of the corpus with its noise drawn from `seed` (deterministic)."""
    spec = BY_NAME[name]
    c = spec.curves
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    n = spec.n_steps
    u = np.linspace(0, 1, n)
    ent = c.entropy(u) * np.exp(rng.normal(0, c.entropy_noise, n))
    tail = ent * c.tail_ratio(u) * np.exp(rng.normal(0, 0.05, n))
    reward = c.reward(u) + rng.normal(0, c.reward_noise, n)
    length = c.length(u) * np.exp(rng.normal(0, 0.04, n))
    trunc = np.clip(c.truncated(u) + rng.normal(0, 0.01, n), 0, 1)
    for at, width, factor, dr in c.spikes:
        i = int(at * (n - 1))
        ent[i : i + width] *= factor
        tail[i : i + width] *= factor
        reward[i : i + width] += dr
    return {"step": np.arange(1, n + 1), "entropy_mean": ent, "entropy_p90": tail, "reward_mean": reward,
            "completion_length_mean": length, "truncated_fraction": trunc}


@dataclass(frozen=True)
class DemoSeries:
    name: str
    label: str
    source: str
    data: dict[str, np.ndarray]
    vocab_size: int | None


def load_demo() -> list[DemoSeries]:
    """The demo's runs saved as CSV (`# label: ...`, `# source: ...`, `# vocab_size: ...` header lines)."""
    out = []
    for path in sorted(DEMO_DIR.glob("*.csv")):
        lines = path.read_text().splitlines()
        head = dict(line[2:].split(": ", 1) for line in lines if line.startswith("# "))
        rows = list(csv.DictReader(line for line in lines if not line.startswith("# ")))
        data = {k: np.array([float(r[k]) if r[k] != "" else np.nan for r in rows]) for k in rows[0]}
        vocab = int(head["vocab_size"]) if head.get("vocab_size", "").isdigit() else None
        out.append(DemoSeries(path.stem, head["label"], head["source"], data, vocab))
    return out
