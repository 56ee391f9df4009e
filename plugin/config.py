"""`ForkwatchConfig`: every user option of `forkwatch.attach`, validated once at attach time."""

from __future__ import annotations

import warnings
from dataclasses import InitVar, asdict, dataclass, field
from typing import Any, Literal

from forkwatch.store import alerts
from forkwatch.store.arrow_columns import DEFAULT_STAT_MANTISSA_BITS, check_mantissa_bits
from forkwatch.store.health import HealthRules
from forkwatch.store.location import check_log_dir, default_log_dir
from forkwatch.store.run_folder import check_run_id
from forkwatch.store.writer import DEFAULT_QUEUE_ROWS


@dataclass
class ForkwatchConfig:
    # --- where the run is written ---
    log_dir: str = field(
        default_factory=default_log_dir,
        metadata={"help": "Folder holding one sub-folder per run, or s3://bucket/prefix. Default: the environment "
                  "variable FORKWATCH_LOG_DIR when set, else 'runs'."},
    )
    run_name: str | None = field(
        default=None,
        metadata={
            "help": "Run id (folder name). None: a timestamp plus a short random id; a run resumed from a checkpoint "
            "written with forkwatch attached keeps the id stored in that checkpoint."
        },
    )

    # --- token selection (loss hooks) ---
    select: str | None = field(
        default=None,
        metadata={"help": "Selector name from the registry (e.g. 'ict', 'high_entropy'); None only watches."},
    )
    fraction: float | None = field(
        default=None, metadata={"help": "Fraction of tokens the selector keeps; None uses the method's default."}
    )
    warmup_steps: int | None = field(
        default=None, metadata={"help": "Dense optimizer steps before selection starts; None: the method's default."}
    )
    select_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Further keyword options passed to the selector."}
    )
    max_empty_selection_steps: int = field(
        default=5,
        metadata={
            "help": "A step whose selection keeps no token (or only tokens of zero gradient weight) trains on "
            "nothing: each is counted (run.json `empty_selection_steps`, the `forkwatch/select/empty_steps` scalar) "
            "and warned about with the selector and the step; this many such steps in a row stop training with an "
            "error naming the cause. 0 never stops."
        },
    )

    # --- what is computed ---
    group_js: bool | Literal["auto"] = field(
        default="auto",
        metadata={
            "help": "Compute ICT's group Jensen-Shannon score, from the logits of each decoding step during "
            "generation; where that cannot be done (vLLM, custom rollouts, tool-calling loops) from the loss pass's "
            "own hidden states, or an extra no-grad backbone pass when a micro-batch holds only part of the "
            "generation batch. 'auto': only when the selector needs it."
        },
    )
    group_js_chunk: int = field(
        default=64,
        metadata={
            "help": "Chunk of the group_js arithmetic: rows per chunk during generation (chunk x vocab temporaries "
            "besides the batch's own B x vocab probabilities); positions per chunk in the extra pass (at most "
            "G x chunk x vocab floats at once)."
        },
    )
    fork_fraction: float = field(
        default=0.2, metadata={"help": "Fork positions: the top fraction of the micro-batch's tokens by entropy."}
    )
    fork_top_k: int = field(default=5, metadata={"help": "Alternatives (token id, probability) stored per fork."})

    # --- collapse lenses (docs/collapse-lenses.md); the entropy spectrum is always recorded ---
    effective_rank_every: int = field(
        default=10,
        metadata={"help": "At most every this many steps (and within `lens_budget`), the effective rank of recorded "
                  "completions' final-layer hidden states (arXiv:2509.23808), from the loss pass's own backbone "
                  "output; 0 turns it off."},
    )
    effective_rank_completions: int = field(
        default=4, metadata={"help": "Recorded completions per rank whose effective rank is measured on a due step."}
    )
    lens_budget: float | None = field(
        default=0.005,
        metadata={"help": "Share of training time the periodic lenses (probes, effective rank) may take, split "
                  "equally between those that are on. A lens runs only at multiples of its own `*_every` steps, and "
                  "there only when the time it took so far plus its last measured cost stays within its share of the "
                  "training time so far, both measured on the run; its other such steps are skipped. run.json "
                  "`lenses` and the dashboard list the steps each lens ran and was skipped at. None: every `*_every` "
                  "steps, whatever they cost."},
    )
    lens_max_every: int | None = field(
        default=100,
        metadata={"help": "A lens the budget held back this many steps runs anyway at its next due step (listed as "
                  "forced: its cost then exceeds the budget); None: the budget always wins."},
    )
    probes: list[tuple[str, str]] | None = field(
        default=None,
        metadata={"help": "(prompt, completion) texts scored teacher-forced, without gradient, before training and "
                  "then at most every `probe_every` steps, within `lens_budget` (table `probes`); None: the first "
                  "`probe_count` recorded completions."},
    )
    probe_every: int = field(
        default=10, metadata={"help": "Fewest steps between two scorings of the probes (more where `lens_budget` "
                              "holds them back); 0 turns probes off."}
    )
    probe_count: int = field(default=4, metadata={"help": "How many recorded completions become probes by default."})

    # --- fork value during training (docs/methods.md, "Fork value"; plugin/fork_value_online.py) ---
    fork_value_every: int = field(
        default=0,
        metadata={"help": "Every this many steps, at the step's end, measure the fork value of a stratified sample of "
                  "the step's recorded positions (table `fork_values`): the sampled token and its alternatives rolled "
                  "out with the trainer's own model, sampling settings and reward functions. Training is unchanged "
                  "(tested bit for bit). 0 (default) turns it off: its cost is to be measured (BENCHMARKS.md, 'Fork value "
                  "during training'); `forkwatch forkvalue` measures after training instead."},
    )
    fork_value_positions: int = field(
        default=16, metadata={"help": "The budget of one measurement, 1 of 3: positions measured, over all ranks."}
    )
    fork_value_branches: int = field(
        default=4, metadata={"help": "The budget, 2 of 3: top-k candidate tokens per position (the sampled token is "
                             "always one; 'any other token' is added where the rest of the probability is large)."}
    )
    fork_value_rollouts: int = field(
        default=4, metadata={"help": "The budget, 3 of 3: continuations per branch (at least 2)."}
    )
    fork_value_min_value: float = field(
        default=0.05, metadata={"help": "A position is consequential when its fork value is above this (reward "
                                "units) at one-sided 95 % confidence."}
    )

    # --- how much is recorded (step aggregates always cover every token) ---
    record_every_steps: int = field(
        default=1, metadata={"help": "Record completions and tokens at steps 1, 1+k, 1+2k, ..."}
    )
    record_completions_per_step: int | None = field(
        default=32,
        metadata={
            "help": "Completions recorded per recorded step over all ranks, drawn with forkwatch's own generator; "
            "None records every completion. 32 keeps a 512 x 2k-token, 1,000-step run near 1 GB."
        },
    )
    record_tokens: bool = field(default=True, metadata={"help": "Write per-token rows (and forks) of recorded completions."})
    record_forks: bool = field(default=True, metadata={"help": "Write top-k alternatives at fork positions."})
    seed: int = field(default=0, metadata={"help": "Seed of forkwatch's own generator (sampling, random selectors)."})
    handoff_interval_s: float = field(
        default=1.0,
        metadata={
            "help": "Steps shorter than this are handed to forkwatch's writer together, at most once per this many "
            "seconds (copying the recorded rows out, text decoding, the live health rules: fixed costs that would "
            "dominate small steps); longer steps are handed over at their end. Warnings come at the hand-off; with "
            "on_alarm='stop' the rules also run at every step end, so training stops at the alarm's own step. "
            "0 hands over every step. (Formerly `worker_interval_s`, still accepted with a FutureWarning.)"
        },
    )
    queue_rows: int = field(
        default=DEFAULT_QUEUE_ROWS,
        metadata={"help": "Rows the writer queue holds; a full queue drops records, never blocks."},
    )
    stat_mantissa_bits: int | None = field(
        default=DEFAULT_STAT_MANTISSA_BITS,
        metadata={
            "help": "Token statistics are stored rounded to this many float32 mantissa bits (relative error "
            "<= 2**-(bits+1)); None stores exact float32."
        },
    )

    # --- health alarms ---
    health_rules: HealthRules | dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Thresholds of the health rules: a forkwatch.store.health.HealthRules, or a dict of some of its "
            "field names (the others keep their defaults); None: the defaults. Unknown names are refused at attach."
        },
    )
    on_alarm: Literal["log", "stop"] = field(
        default="log",
        metadata={"help": "'log' warns when a health rule fires; 'stop' also ends training at the end of the step "
                  "where an alarm fired (the rules then run at every step end)."},
    )

    # --- alerts (store/alerts.py) ---
    alert_webhook: str | None = field(
        default_factory=alerts.from_environment,
        metadata={"help": "A webhook URL (Slack-compatible, or any endpoint taking JSON) that gets one POST per new "
                  "health warning and alarm, with its evidence and the recommended action; sent from the writer's "
                  "thread with a short timeout and bounded retries, never blocking training; failures are counted "
                  "in run.json (alerts). Default: $FORKWATCH_ALERT_WEBHOOK when set. run.json keeps only its host."},
    )
    dashboard_url: str | None = field(
        default_factory=alerts.dashboard_from_environment,
        metadata={"help": "The address the dashboard is served at (e.g. http://127.0.0.1:8501): each alert links to "
                  "the run's page there. Default: $FORKWATCH_DASHBOARD_URL when set."},
    )

    # the old name of `handoff_interval_s` (an option named after a worker thread that no longer exists)
    worker_interval_s: InitVar[float | None] = None

    def __post_init__(self, worker_interval_s: float | None) -> None:
        if worker_interval_s is not None:
            warnings.warn("forkwatch: `worker_interval_s` is now `handoff_interval_s` (the hand-off to the writer); "
                          "the old name will be removed: pass handoff_interval_s instead", FutureWarning, stacklevel=3)
            self.handoff_interval_s = worker_interval_s
        self.health_rules = _health_rules(self.health_rules)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad value and the fix."""
        check_log_dir(self.log_dir)  # a folder or s3://bucket/prefix; any other scheme is refused
        if self.run_name is not None:
            check_run_id(self.run_name, "run_name")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction={self.fraction!r}: pass a number in (0, 1], e.g. 0.2, or None")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r}: pass an integer >= 0, or None")
        if not isinstance(self.select_options, dict):
            raise ValueError(f"select_options={self.select_options!r}: pass a dict of keyword options")
        if self.select is None and (self.fraction is not None or self.warmup_steps is not None or self.select_options):
            raise ValueError("fraction / warmup_steps / select_options need a selector: pass select='<name>'")
        if self.group_js not in (True, False, "auto"):
            raise ValueError(f"group_js={self.group_js!r}: pass True, False or 'auto'")
        if self.group_js_chunk < 1:
            raise ValueError(f"group_js_chunk={self.group_js_chunk!r}: pass an integer >= 1")
        if not 0.0 <= self.fork_fraction <= 1.0:
            raise ValueError(f"fork_fraction={self.fork_fraction!r}: pass a number in [0, 1], e.g. 0.2")
        if self.fork_top_k < 1:
            raise ValueError(f"fork_top_k={self.fork_top_k!r}: pass an integer >= 1, e.g. 5")
        if not (isinstance(self.handoff_interval_s, (int, float)) and self.handoff_interval_s >= 0):
            raise ValueError(f"handoff_interval_s={self.handoff_interval_s!r}: pass seconds >= 0, e.g. 0.5 "
                             "(0: every step)")
        if not (isinstance(self.max_empty_selection_steps, int) and self.max_empty_selection_steps >= 0):
            raise ValueError(f"max_empty_selection_steps={self.max_empty_selection_steps!r}: pass an integer >= 0, "
                             "e.g. 5 (0: never stop)")
        if self.record_every_steps < 1:
            raise ValueError(f"record_every_steps={self.record_every_steps!r}: pass an integer >= 1")
        if self.record_completions_per_step is not None and self.record_completions_per_step < 0:
            raise ValueError(
                f"record_completions_per_step={self.record_completions_per_step!r}: pass an integer >= 0, "
                "or None to record every completion"
            )
        if self.queue_rows < 1:
            raise ValueError(f"queue_rows={self.queue_rows!r}: pass an integer >= 1")
        check_mantissa_bits(self.stat_mantissa_bits)
        if not isinstance(self.health_rules, HealthRules):
            raise ValueError(f"health_rules={self.health_rules!r}: pass a HealthRules, a dict of its fields, or None")
        if self.on_alarm not in ("log", "stop"):
            raise ValueError(f"on_alarm={self.on_alarm!r}: pass 'log' or 'stop'")
        if self.alert_webhook is not None:
            alerts.check_url(self.alert_webhook, "alert_webhook")  # names $FORKWATCH_ALERT_WEBHOOK's value too
        if self.dashboard_url is not None:
            alerts.check_url(self.dashboard_url, "dashboard_url")
        self._validate_lenses()
        self._validate_fork_value()

    def _validate_fork_value(self) -> None:
        if not isinstance(self.fork_value_every, int) or self.fork_value_every < 0:
            raise ValueError(f"fork_value_every={self.fork_value_every!r}: pass an integer >= 0 (0 turns it off)")
        for name, low in (("fork_value_positions", 1), ("fork_value_branches", 1), ("fork_value_rollouts", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r}: pass an integer >= {low}")
        if not self.fork_value_min_value >= 0:
            raise ValueError(f"fork_value_min_value={self.fork_value_min_value!r}: pass a reward difference >= 0")

    def _validate_lenses(self) -> None:
        if self.lens_budget is not None and not (isinstance(self.lens_budget, int | float)
                                                 and not isinstance(self.lens_budget, bool)
                                                 and 0 < self.lens_budget <= 1):
            raise ValueError(f"lens_budget={self.lens_budget!r}: pass a share of training time in (0, 1], e.g. 0.005, "
                             "or None for no budget")
        if self.lens_max_every is not None and not (isinstance(self.lens_max_every, int)
                                                    and not isinstance(self.lens_max_every, bool)
                                                    and self.lens_max_every >= 1):
            raise ValueError(f"lens_max_every={self.lens_max_every!r}: pass an integer >= 1, e.g. 100, or None")
        for name in ("effective_rank_every", "probe_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r}: pass an integer >= 0, e.g. 10 (0 turns it off)")
        for name in ("effective_rank_completions", "probe_count"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: pass an integer >= 1, e.g. 4")
        if self.probes is not None:
            ok = isinstance(self.probes, (list, tuple)) and self.probes and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) and x for x in p)
                for p in self.probes)
            if not ok:
                raise ValueError(f"probes={self.probes!r}: pass a list of (prompt, completion) pairs of non-empty "
                                 "strings, e.g. [('2+3=', '5')], or None for the first recorded completions")

    def selector_options(self) -> dict[str, Any]:
        """Options for `get_selector`: fraction / warmup_steps only when set, so the method's defaults apply."""
        options = dict(self.select_options)
        if self.fraction is not None:
            options["fraction"] = self.fraction
        if self.warmup_steps is not None:
            options["warmup_steps"] = self.warmup_steps
        return options

    def to_dict(self) -> dict[str, Any]:
        """The options as run.json records them (the webhook's path, a chat channel's secret, left out)."""
        return asdict(self) | {"alert_webhook": alerts.redact(self.alert_webhook)}


# accepted by `attach` besides the fields: old option name -> its new name
RENAMED = {"worker_interval_s": "handoff_interval_s"}


def _health_rules(value: Any) -> Any:
    """`health_rules` as given -> a HealthRules (None: the defaults); names it does not have are refused, listed."""
    if value is None:
        return HealthRules()
    if isinstance(value, dict):
        return HealthRules.from_dict(value)  # refuses a misspelt name, listing the valid ones
    return value
