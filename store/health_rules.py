"""The health rules as options: every threshold (`HealthRules`, each with its help text: the help is the
documentation), the catalogue of rules (what each watches, which columns it needs, which evidence corroborates it)
and the recommended action that comes with each flag, with its source.

Two levels (docs/methods.md, "Health: warnings and alarms"): an entropy *signal* alone (a fast drop, a rise, a thin
tail) is a warning; the same signal with corroborating *evidence of harm* (reward not improving or falling,
completions collapsing or running into the length cap, the tail gone, entropy near log V) is an alarm. A non-finite
loss or gradient norm is an alarm by itself. Only alarms fail `forkwatch check` and stop training under
`on_alarm="stop"`. Every threshold is forkwatch's own heuristic, not a paper's; docs/methods.md gives each one's
reason and how to tune it. The judge is store/health.py, the report store/check.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

LAW_MIN_POINTS = 8  # fewer (entropy, reward) pairs than this give no ceiling: two parameters need some spread to pin
LAW_MIN_R2 = 0.6  # below this the exponential does not describe the run well enough to quote its ceiling


@dataclass(frozen=True)
class HealthRules:
    # --- history (counted in logged steps: rows of the series with a finite mean entropy) ---
    early_steps: int = field(
        default=5, metadata={"help": "The early level of a series is the median of its first `early_steps` finite steps."}
    )
    min_steps: int = field(
        default=8,
        metadata={"help": "No entropy rule fires before this many finite entropy steps; fewer in all gives "
                  "'insufficient_data'. (A non-finite loss or gradient norm needs no history.)"},
    )
    sustain_steps: int = field(
        default=3,
        metadata={"help": "A rule fires only when its condition holds this many consecutive logged steps (a run "
                  "that logs every N steps: N × this many training steps)."},
    )
    # --- entropy signals (alone: warnings) ---
    collapse_fraction: float = field(
        default=0.2, metadata={"help": "Collapse signal when mean entropy < collapse_fraction × its early level."}
    )
    tail_column: str = field(
        default="entropy_p90", metadata={"help": "The high-entropy tail percentile watched by the tail rule."}
    )
    tail_floor: float = field(
        default=0.05,
        metadata={"help": "Tail signal when the tail percentile (nats) drops below this floor, having started above it; "
                  "also evidence that a mean-entropy collapse is real ('the tail is gone')."},
    )
    explosion_factor: float = field(
        default=2.0, metadata={"help": "Explosion signal when mean entropy > explosion_factor × its early level."}
    )
    explosion_log_vocab_fraction: float = field(
        default=0.5,
        metadata={"help": "Explosion ALARM (no further evidence needed: sampling is close to uniform) when mean "
                  "entropy > this fraction of log(vocab size); only when V is known."},
    )
    # --- evidence of harm (signal + evidence: alarms) ---
    alarm_needs_evidence: bool = field(
        default=True,
        metadata={"help": "False: every collapse or explosion signal is an alarm by itself (the rules before "
                  "severity levels); True: a signal is a warning until evidence of harm corroborates it."},
    )
    evidence_window: int = field(
        default=20,
        metadata={"help": "Logged steps in the trailing window that smooths reward, length and truncation (medians) "
                  "and over which reward progress is measured (this window against the one before it)."},
    )
    reward_stall_fraction: float = field(
        default=0.05,
        metadata={"help": "Reward is 'not improving' (collapse evidence) when its gain over the last window is below "
                  "this fraction of the largest move of smoothed reward from its early level so far, and not "
                  "distinguishable from noise (a gain above noise_z standard errors counts as improving, however "
                  "small)."},
    )
    reward_drop_fraction: float = field(
        default=0.25,
        metadata={"help": "Reward is 'falling' (evidence for both kinds) when smoothed reward is below its best so far "
                  "by this fraction of the largest move from its early level (and by more than noise)."},
    )
    noise_z: float = field(
        default=5.0,
        metadata={"help": "A reward move (a gain, a fall) is told from noise only beyond noise_z standard errors (the "
                  "per-step noise measured over the last two windows)."},
    )
    reward_range: tuple[float, float] | None = field(
        default=None,
        metadata={"help": "(lowest, highest) mean reward the reward functions can give, when known, e.g. (0, 1) for a "
                  "pass/fail reward. With it, smoothed reward within reward_ceiling_margin of the highest is at its "
                  "ceiling: reward evidence ('not improving', 'falling') is then no harm — nothing is left to gain, "
                  "and a dip that stays at the ceiling is noise. None: not known; reward evidence counts wherever "
                  "the reward is."},
    )
    reward_ceiling_margin: float = field(
        default=0.1,
        metadata={"help": "With reward_range: smoothed reward within this fraction of the range below its highest "
                  "value is 'at its ceiling'."},
    )
    length_collapse_fraction: float = field(
        default=0.5,
        metadata={"help": "Collapse evidence: smoothed completion length < this fraction of its early level."},
    )
    length_runaway_factor: float = field(
        default=3.0,
        metadata={"help": "Explosion evidence: smoothed completion length > this factor × its early level."},
    )
    truncation_rise: float = field(
        default=0.15,
        metadata={"help": "Explosion evidence: smoothed truncated fraction > its early level + this (absolute)."},
    )
    # --- saturation and the law (warnings) ---
    law_min_points: int = field(
        default=LAW_MIN_POINTS, metadata={"help": "The law fit refuses a ceiling from fewer (entropy, reward) points."}
    )
    law_min_r2: float = field(
        default=LAW_MIN_R2, metadata={"help": "The law fit refuses a ceiling when R² is below this."}
    )
    saturation_gap: float = field(
        default=0.1,
        metadata={
            "help": "Saturation warning when (ceiling − reward) ≤ saturation_gap × (ceiling − early reward), the "
            "ceiling fitted on the steps so far: 90 % of the improvement the law predicts is used up, while "
            "entropy still falls."
        },
    )
    saturation_window: int = field(
        default=10, metadata={"help": "Logged steps over which the entropy trend is measured for saturation."}
    )
    saturation_min_drop: float = field(
        default=0.05,
        metadata={"help": "'Still falling': entropy dropped ≥ this fraction of its early level over the window."},
    )

    def __post_init__(self) -> None:
        for name in ("early_steps", "min_steps", "sustain_steps", "law_min_points", "saturation_window",
                     "evidence_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"HealthRules.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("collapse_fraction", "length_collapse_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"HealthRules.{name} must be in (0, 1), got {getattr(self, name)!r}")
        for name in ("explosion_factor", "length_runaway_factor"):
            if getattr(self, name) <= 1:
                raise ValueError(f"HealthRules.{name} must be > 1, got {getattr(self, name)!r}")
        for name in ("reward_stall_fraction", "reward_drop_fraction", "noise_z", "truncation_rise", "tail_floor",
                     "reward_ceiling_margin"):
            if getattr(self, name) < 0:
                raise ValueError(f"HealthRules.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.reward_range is not None:
            r = self.reward_range
            ok = (isinstance(r, tuple | list) and len(r) == 2 and all(isinstance(v, int | float) for v in r)
                  and all(math.isfinite(v) for v in r) and r[0] < r[1])
            if not ok:
                raise ValueError(f"HealthRules.reward_range={r!r}: pass (lowest, highest) with lowest < highest, "
                                 "e.g. (0, 1), or None")
            object.__setattr__(self, "reward_range", (float(r[0]), float(r[1])))  # a JSON list becomes a tuple

    @classmethod
    def help(cls) -> dict[str, str]:
        """Each threshold's documentation, by name (for CLIs, config docs and the dashboard)."""
        return {f.name: f.metadata["help"] for f in fields(cls)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> HealthRules:
        """Rules from a mapping of some of the fields (the rest default); a name that is not a field is refused,
        with the valid names, so a misspelt threshold never silently falls back to its default."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"health rules: unknown rule option(s) {unknown}; valid names: {valid}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise ValueError(f"health rules {dict(values)!r}: {e}") from None

    def changed(self) -> dict[str, Any]:
        """The fields that differ from the defaults (how a report names the rules it used)."""
        default = HealthRules()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}


# --------------------------------------------------------------------------- the catalogue

RULE_KINDS = ("collapse", "explosion", "saturation")
ALARM_KINDS = ("collapse", "explosion")  # the kinds whose alarms fail `forkwatch check` and may stop training
SEVERITIES = ("warning", "alarm")

# The columns of a step series the rules read (the steps table's names; an importer maps a source's names onto
# these). The tail column is HealthRules.tail_column.
ENTROPY, REWARD, LENGTH, TRUNCATED = "entropy_mean", "reward_mean", "completion_length_mean", "truncated_fraction"
NON_FINITE = "non_finite"  # 1 at a logged step whose loss or gradient norm was NaN or ±inf, 0 when both were finite
TRAINER_SCALARS = ("loss", "grad_norm", "kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region")
CONTEXT_COLUMNS = ("kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region")  # quoted at a flag, where logged

# rule -> (the columns it needs, what it watches). "tail" stands for HealthRules.tail_column.
RULES: dict[str, tuple[tuple[str, ...], str]] = {
    "collapse.mean": ((ENTROPY,), "mean entropy far below its early level"),
    "collapse.tail": (("tail",), "the high-entropy tail percentile near zero"),
    "explosion.mean": ((ENTROPY,), "mean entropy far above its early level"),
    "explosion.log_vocab": ((ENTROPY,), "mean entropy near log V (needs the vocabulary size)"),
    "explosion.non_finite": ((NON_FINITE,), "a non-finite loss or gradient norm"),
    "saturation": ((ENTROPY, REWARD), "reward at the entropy-reward law's ceiling while entropy falls"),
}

# evidence of harm -> the column it needs; and which evidence corroborates which signal (docs/methods.md gives each
# one's reason)
EVIDENCE_NEEDS = {
    "reward_not_improving": REWARD, "reward_falling": REWARD, "length_collapsed": LENGTH, "length_runaway": LENGTH,
    "truncation_runaway": TRUNCATED, "tail_gone": "tail",
}
EVIDENCE_FOR = {
    "collapse.mean": ("reward_not_improving", "reward_falling", "length_collapsed", "tail_gone"),
    "collapse.tail": ("reward_not_improving", "reward_falling", "length_collapsed"),
    "explosion.mean": ("reward_falling", "length_runaway", "truncation_runaway"),
}


@dataclass(frozen=True)
class Action:
    """What to try next when a rule fires, and where that advice comes from."""

    text: str
    source: str


_COLLAPSE = Action(
    "keep entropy up: forkwatch's select='clip_cov' or 'kl_cov' (Clip-Cov / KL-Cov), or a higher clip for rising "
    "tokens (GRPOConfig epsilon_high, e.g. 0.28); a higher sampling temperature; a lower learning rate",
    "Clip-Cov/KL-Cov: arXiv:2505.22617 §4; clip-higher: DAPO, arXiv:2503.14476; temperature and learning rate: "
    "forkwatch's reading, no paper",
)
_EXPLOSION = Action(
    "calm the policy: a lower entropy coefficient (GRPOConfig entropy_coef, or use_adaptive_entropy) or learning "
    "rate; a tighter clip (a lower epsilon_high)",
    "entropy coefficient: Skywork-OR1, arXiv:2505.22312; clip range: DAPO, arXiv:2503.14476",
)
_LENGTH = Action(
    "check the truncation settings: GRPOConfig max_completion_length, and mask_truncated_completions=True so cut "
    "completions do not train; then a lower entropy coefficient or learning rate",
    "overlong filtering: DAPO, arXiv:2503.14476; entropy coefficient: Skywork-OR1, arXiv:2505.22312",
)
ACTIONS: dict[str, Action] = {
    "collapse.mean": _COLLAPSE,
    "collapse.tail": Action(
        "keep the forking tokens: train on the high-entropy minority (select='high_entropy', or GRPOConfig "
        "top_entropy_quantile=0.2), or Clip-Cov / KL-Cov; a higher sampling temperature",
        "high-entropy tokens: arXiv:2506.01939; Clip-Cov/KL-Cov: arXiv:2505.22617 §4",
    ),
    "explosion.mean": _EXPLOSION,
    "explosion.log_vocab": _EXPLOSION,
    "explosion.non_finite": Action(
        "stop and resume from the last checkpoint with finite values, with a lower learning rate and gradient "
        "clipping (TrainingArguments max_grad_norm); check the reward functions for NaN/inf and the dtype for overflow",
        "forkwatch's reading (standard practice, no paper)",
    ),
    "saturation": Action(
        "little reward is left to gain at this entropy: stop here, or keep entropy up (Clip-Cov / KL-Cov) to raise "
        "the ceiling",
        "the entropy-reward law and its ceiling: arXiv:2505.22617",
    ),
}
LENGTH_EVIDENCE = ("length_runaway", "truncation_runaway")


def action_for(rule: str, harm: list[str] | tuple[str, ...] = ()) -> Action:
    """The recommended action for a flag of `rule` raised with the evidence `harm` (an explosion whose evidence is
    length running away or hitting the cap gets the truncation advice first)."""
    if rule.startswith("explosion.mean") and any(h in LENGTH_EVIDENCE for h in harm):
        return _LENGTH
    return ACTIONS[rule]
