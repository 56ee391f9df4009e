"""The thresholds of the health rules (`HealthRules`), each with its help text: the help is the documentation.

Two levels (docs/methods.md, "Health: warnings and alarms"): an entropy *signal* alone (a fast drop, a rise, a thin
tail) is a warning; the same signal with corroborating *evidence of harm* (reward not improving or falling,
completions collapsing or running into the length cap, the tail gone, entropy near log V) is an alarm. Only alarms
fail `forkwatch check` and stop training under `on_alarm="stop"`. Every threshold is forkwatch's own heuristic, not
a paper's; docs/methods.md gives each one's reason and how to tune it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from forkwatch.store.law import MIN_POINTS, MIN_R2


@dataclass(frozen=True)
class HealthRules:
    # --- history ---
    early_steps: int = field(
        default=5, metadata={"help": "The early level of a series is the median of its first `early_steps` finite steps."}
    )
    min_steps: int = field(
        default=8,
        metadata={"help": "No rule fires before this many finite entropy steps; fewer in all gives 'insufficient_data'."},
    )
    sustain_steps: int = field(
        default=3, metadata={"help": "A rule fires only when its condition holds this many consecutive steps."}
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
        metadata={"help": "Steps in the trailing window that smooths reward, length and truncation (medians) and "
                  "over which reward progress is measured (this window against the one before it)."},
    )
    reward_stall_fraction: float = field(
        default=0.05,
        metadata={"help": "Reward is 'not improving' (collapse evidence) when its gain over the last window is below "
                  "this fraction of the largest move of smoothed reward from its early level so far (and not "
                  "distinguishable from noise)."},
    )
    reward_drop_fraction: float = field(
        default=0.25,
        metadata={"help": "Reward is 'falling' (evidence for both kinds) when smoothed reward is below its best so far "
                  "by this fraction of the largest move from its early level (and by more than noise)."},
    )
    noise_z: float = field(
        default=5.0,
        metadata={"help": "A reward move counts only beyond noise_z standard errors of the window median (the "
                  "per-step noise measured over the last two windows)."},
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
        default=MIN_POINTS, metadata={"help": "The law fit refuses a ceiling from fewer (entropy, reward) points."}
    )
    law_min_r2: float = field(default=MIN_R2, metadata={"help": "The law fit refuses a ceiling when R² is below this."})
    saturation_gap: float = field(
        default=0.1,
        metadata={
            "help": "Saturation warning when (ceiling − reward) ≤ saturation_gap × (ceiling − early reward), the "
            "ceiling fitted on the steps so far: 90 % of the improvement the law predicts is used up, while "
            "entropy still falls."
        },
    )
    saturation_window: int = field(
        default=10, metadata={"help": "Steps over which the entropy trend is measured for saturation."}
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
        for name in ("reward_stall_fraction", "reward_drop_fraction", "noise_z", "truncation_rise", "tail_floor"):
            if getattr(self, name) < 0:
                raise ValueError(f"HealthRules.{name} must be >= 0, got {getattr(self, name)!r}")

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
