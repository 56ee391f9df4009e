"""What the health judgement and the pages read from a run's run.json, as the `runs` view carries it (its `meta`
column, the file's text): the parsed document, the vocabulary size, and the health rules the run was trained under.

The one place that interprets run.json's content on the read side; views.py reads the file into the view.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from forkwatch.store.health_rules import HealthRules


def parse_meta(meta: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """run.json as a dict (empty when missing or not a JSON object)."""
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            return {}
    return dict(meta) if isinstance(meta, Mapping) else {}


def vocab_size_from_meta(meta: Mapping[str, Any] | str | None) -> int | None:
    """The vocabulary size the plugin records at the top of run.json (`vocab_size`), when there is one."""
    v = parse_meta(meta).get("vocab_size")
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 1 else None


@dataclass(frozen=True)
class RunRules:
    """The rules a run is judged with, and where they came from (a report says so)."""

    rules: HealthRules
    source: str  # "run" (run.json's config.health_rules) | "default" | "given" (check --rules)
    note: str


def rules_of_run(meta: Mapping[str, Any] | str | None) -> RunRules:
    """The health rules the run was trained under (run.json `config.health_rules`), or the defaults, saying why."""
    stored = parse_meta(meta).get("config", {})
    stored = stored.get("health_rules") if isinstance(stored, Mapping) else None
    if not isinstance(stored, Mapping):
        return RunRules(HealthRules(), "default", "judged with the default rules: run.json records none (a run "
                        "written before forkwatch stored them)")
    try:
        rules = HealthRules.from_dict(stored)
    except ValueError as e:
        return RunRules(HealthRules(), "default", f"judged with the default rules: run.json's rules are unreadable "
                        f"({e})")
    changed = rules.changed()
    what = ", ".join(f"{k}={v!r}" for k, v in changed.items()) if changed else "the defaults"
    return RunRules(rules, "run", f"judged with the rules the run was trained under (run.json: {what})")


def given_rules(rules: HealthRules) -> RunRules:
    """Rules a person passed (`check --rules`), overriding the run's own."""
    changed = rules.changed()
    what = ", ".join(f"{k}={v!r}" for k, v in changed.items()) if changed else "the defaults"
    return RunRules(rules, "given", f"re-judged with the rules given to --rules ({what}), not the run's own")
