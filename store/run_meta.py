"""run.json and rank-NNN.json: what they hold, the fields the store writes into them, and every reading of them.

The one module that reads these files and interprets their content; the writer thread (store/writer.py) writes
them whole, at start, on `update_meta` and at close, with the documents built here.

    field                                         written by
    run_id, name, rank, world_size, status,       the store (`start`, `document`, `closing`)
    created_at, updated_at, schema_version,
    forkwatch_version, layout_version,
    resumed_from_step, last_step, dropped, faults,
    alerts (sent / failed, rank 0)
    config (the ForkwatchConfig), model,          the plugin at train start (RunWriter's `meta`, from
    model_type, architectures, vocab_size,        plugin/callback.py)
    trl_version, transformers_version,
    torch_version, group_js, trainer
    faults_by_rank, stopped_by_alarm, probes,     the plugin while the run goes on and at its end
    group_js_split_groups, group_js_fallbacks,    (`RunWriter.update_meta`)
    fork_fallbacks, lenses

A rank > 0 writes only `RANK_FIELDS`, into its own rank-NNN.json. Any other field a caller passes is kept as given.

Readers: `read_run_json` (the file, on disk or S3), `runs_row` (a run's row of the `runs` view, whose `meta` column
carries the whole run.json as text), and, from that text, `parse_meta`, `config_of`, `vocab_size_from_meta`,
`fork_fraction_of`, `rules_of_run` (the health rules the run was trained under), `alert_counts` and `lens_notes`
(which steps each periodic lens ran and was skipped at, under the lens budget, in words).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import run_folder
from .health_rules import HealthRules
from .location import Location, resolve
from .schema import SCHEMA_VERSION, SchemaVersionError, check_version

logger = logging.getLogger(__name__)

RANK_FIELDS = ("run_id", "rank", "status", "dropped", "faults", "updated_at", "last_step")  # rank-NNN.json


# ---------------------------------------------------------------------------------------------------- the file


def file_name(rank: int) -> str:
    """The file a rank writes: run.json for rank 0, rank-NNN.json for the others."""
    return run_folder.RUN_JSON if rank == 0 else run_folder.rank_json(rank)


def read_run_json(where: Location | str | os.PathLike[str], run_id: str, name: str = run_folder.RUN_JSON) -> dict[str, Any]:
    """A run's run.json (or `name`, e.g. rank_json(1)) as a dict, on disk or S3.
    {} when missing; an unreadable or non-object file is logged and read as {}."""
    loc = resolve(where)
    path = loc.path(run_id, name)
    try:
        meta = loc.read_json(path)
        if meta is None:
            return {}
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        return meta
    except (OSError, ValueError) as e:
        logger.warning("forkwatch: unreadable %s: %s", loc.display(path), e)
        return {}


# ---------------------------------------------------------------------------------------------------- writing


def _utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def start(previous: Mapping[str, Any], given: Mapping[str, Any], *, run_id: str, rank: int, world_size: int,
          resume_step: int | None) -> dict[str, Any]:
    """The document a writer starts with: the file as it was (a resumed or restarted run keeps its creation time
    and earlier fields), the store's own fields, then the fields the caller gave (`RunWriter(meta=...)`)."""
    from forkwatch import __version__

    given = dict(given)
    base = {
        "run_id": run_id,
        "name": given.pop("name", None) or previous.get("name") or run_id,
        "status": "running",
        "created_at": previous.get("created_at", _utcnow()),
        "schema_version": SCHEMA_VERSION,
        "forkwatch_version": __version__,
        "world_size": world_size,
        "rank": rank,
        run_folder.LAYOUT_KEY: run_folder.LAYOUT_VERSION,
    }
    if resume_step is not None:
        base["resumed_from_step"] = resume_step
        base["last_step"] = resume_step
    return {**previous, **base, **given}


def document(meta: Mapping[str, Any], *, rank: int, dropped: Mapping[str, int], faults: Mapping[str, int],
             alerts: Mapping[str, int] | None = None) -> bytes:
    """The bytes of a rank's file now: `meta` with the rank's dropped records and faults, the alerts sent and failed
    (rank 0 sends them; absent when none was due) and the time; a rank > 0 keeps RANK_FIELDS only."""
    doc = {**meta, "dropped": dict(dropped), "faults": dict(faults), "updated_at": _utcnow()}
    if alerts:
        doc["alerts"] = dict(alerts)
    if rank != 0:
        doc = {k: doc[k] for k in RANK_FIELDS if k in doc}
    return json.dumps(doc, indent=1, default=str).encode()


def closing(meta: Mapping[str, Any], status: str, last_step: int | None) -> dict[str, Any]:
    """The fields a writer merges at close: the status, and the last step it wrote (never below the one recorded
    before, which a resumed run starts from)."""
    fields: dict[str, Any] = {"status": status}
    if last_step is not None:
        prev = meta.get("last_step")
        fields["last_step"] = max(last_step, prev) if isinstance(prev, int) else last_step
    return fields


def alert_counts(meta: Any) -> dict[str, int]:
    """run.json's `alerts`: {"sent": n, "failed": m}, or {} for a run that sent none."""
    alerts = parse_meta(meta).get("alerts")
    return {k: int(alerts.get(k, 0)) for k in ("sent", "failed")} if isinstance(alerts, Mapping) else {}


# ---------------------------------------------------------------------------------------------------- the runs view


def runs_row(listing: run_folder.RunListing, meta: Mapping[str, Any], *, recorded_tokens: int = 0) -> dict[str, Any]:
    """The `runs` row of a run (the columns of schema.RUNS), from its run.json as read (`meta`, {} when missing or
    unreadable) and its ranks' files. `recorded_tokens` comes from the token parts' footers (store/views.py)."""
    loc, run_id = listing.location, listing.run_id
    path = loc.display(loc.path(run_id, run_folder.RUN_JSON))
    if "schema_version" in meta:
        try:
            check_version(meta["schema_version"], path)
        except SchemaVersionError as e:
            logger.warning("forkwatch: %s", e)
    dropped = _dropped_total(meta.get("dropped"))
    # faults per rank: each rank's own file, or what rank 0 last gathered from it (a rank that died before writing
    # its file is still counted), whichever saw more
    gathered = meta.get("faults_by_rank") if isinstance(meta.get("faults_by_rank"), dict) else {}
    faults = {int(r): _counts(c) for r, c in gathered.items() if str(r).isdigit()}
    faults[0] = _max_counts(faults.get(0, {}), _counts(meta.get("faults")))
    for rank, _ in listing.rank_files():
        rank_meta = read_run_json(loc, run_id, run_folder.rank_json(rank))
        dropped += _dropped_total(rank_meta.get("dropped"))
        faults[rank] = _max_counts(faults.get(rank, {}), _counts(rank_meta.get("faults")))

    def _int(key: str) -> int | None:
        v = meta.get(key)
        return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    def _str(key: str) -> str | None:
        v = meta.get(key)
        return None if v is None else str(v)

    return {
        "run_id": run_id,
        "name": _str("name") or run_id,
        "status": _str("status") or "unknown",
        "created_at": _str("created_at"),
        "updated_at": _str("updated_at"),
        "schema_version": _int("schema_version"),
        "forkwatch_version": _str("forkwatch_version"),
        "trl_version": _str("trl_version"),
        "model": _str("model"),
        "world_size": _int("world_size"),
        "last_step": _int("last_step"),
        "resumed_from_step": _int("resumed_from_step"),
        "recorded_tokens": recorded_tokens,
        "dropped": dropped,
        "faults": sum(sum(c.values()) for c in faults.values()),
        "faults_detail": fault_detail(faults),
        "meta": json.dumps(meta, default=str),
    }


def _counts(d: Any) -> dict[str, int]:
    """A {place: count} mapping from run.json, ignoring anything else found there."""
    if not isinstance(d, dict):
        return {}
    return {str(k): int(v) for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool) and v}


def _max_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: max(a.get(k, 0), b.get(k, 0)) for k in {**a, **b}}


def fault_detail(by_rank: dict[int, dict[str, int]]) -> str:
    """"rank 0: step_end 2, log 1; rank 1: records 1" (ranks without faults left out; '' when none)."""
    return "; ".join(f"rank {r}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
                     for r, c in sorted(by_rank.items()) if c)


def _dropped_total(d: Any) -> int:
    if isinstance(d, dict):
        return sum(int(v) for v in d.values() if isinstance(v, int | float))
    return 0


# ---------------------------------------------------------------------------------------------------- the meta column


def parse_meta(meta: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """run.json as a dict, from the `runs` view's `meta` text (or a dict); empty when missing or not a JSON
    object."""
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            return {}
    return dict(meta) if isinstance(meta, Mapping) else {}


def config_of(meta: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """The ForkwatchConfig the run was trained with, as run.json stores it (empty when it has none)."""
    config = parse_meta(meta).get("config")
    return dict(config) if isinstance(config, Mapping) else {}


def vocab_size_from_meta(meta: Mapping[str, Any] | str | None) -> int | None:
    """The vocabulary size the plugin records at the top of run.json (`vocab_size`), when there is one."""
    v = parse_meta(meta).get("vocab_size")
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 1 else None


def fork_fraction_of(meta: Mapping[str, Any] | str | None) -> float | None:
    """The share of tokens the run marked as forks (its `fork_fraction` option), when run.json says and it is > 0."""
    v = config_of(meta).get("fork_fraction")
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1 else None


@dataclass(frozen=True)
class RunRules:
    """The rules a run is judged with, and where they came from (a report says so)."""

    rules: HealthRules
    source: str  # "run" (run.json's config.health_rules) | "default" | "given" (check --rules)
    note: str


def rules_of_run(meta: Mapping[str, Any] | str | None) -> RunRules:
    """The health rules the run was trained under (run.json `config.health_rules`), or the defaults, saying why."""
    stored = config_of(meta).get("health_rules")
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


# ---------------------------------------------------------------------------------------------------- the lenses

LENS_WORDS = {"probes": ("Probes", "scored", "a scoring"), "effective_rank": ("Effective rank", "measured",
                                                                               "a measurement")}


def lens_notes(meta: Mapping[str, Any] | str | None) -> dict[str, str]:
    """One sentence per periodic lens of the run (`probes`, `effective_rank`) from run.json's `lenses` (written by
    plugin/lens_budget.py): the steps it ran at, those it was skipped at to keep the lenses within the lens budget,
    those it was forced at, what it cost, and the share of training time all lenses took. {} for a run written
    before forkwatch recorded it, or with both lenses off."""
    lenses = parse_meta(meta).get("lenses")
    if not isinstance(lenses, Mapping):
        return {}
    budget = lenses.get("budget")
    train_s, share = lenses.get("train_seconds"), lenses.get("share")
    total = (f"all lenses took {_pct(share)} of {_seconds(train_s)} of training so far"
             if _number(share) and _number(train_s) else None)
    out = {}
    for name, (title, done, one) in LENS_WORDS.items():
        lens = lenses.get(name)
        if not isinstance(lens, Mapping):
            continue
        every = lens.get("every")
        ran, skipped, forced = (_ints(lens.get(k)) for k in ("ran", "skipped", "forced"))
        first = lens.get("first") if isinstance(lens.get("first"), Mapping) else {}
        parts = [f"{title} {done} at " + (_steps_text(ran, every) if ran else "no step yet")]
        if first.get("source") == "loss pass":
            parts[0] += f" (step {first.get('step')}: the initial policy's, from the first step's own loss pass)"
        if budget is None:
            parts.append(f"{_every(every)}, with no lens budget (lens_budget=None)")
        else:
            each = lenses.get("share_each")
            within = (f"its share ({_pct(each)}) of a lens budget of {_pct(budget)}" if _number(each) and each != budget
                      else f"a lens budget of {_pct(budget)}")
            cadence = f"due {_every(every)} within {within} of training time"
            if skipped:
                cadence += f"; skipped at {_steps_text(skipped, every)} ({len(skipped)} of {len(skipped) + len(ran)})"
            else:
                cadence += "; none skipped"
            parts.append(cadence)
        if forced:
            parts.append(f"forced at {_steps_text(forced, every)} (held back {lenses.get('max_every')} steps: "
                         "lens_max_every), over the budget there")
        cost = lens.get("cost_s")
        if _number(cost):
            parts.append(f"{one} took {_seconds(cost)}")
        if total:
            parts.append(total)
        out[name] = "; ".join(parts) + "."
    return out


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _ints(v: Any) -> list[int]:
    return [int(x) for x in v if _number(x)] if isinstance(v, list) else []


def _every(every: Any) -> str:
    return "every step" if every == 1 else f"every {every} steps"


def _pct(share: float) -> str:
    return f"{100 * share:.2g} %" if share < 0.01 else f"{100 * share:.1f} %"


def _seconds(s: float) -> str:
    return f"{1000 * s:.1f} ms" if s < 1 else f"{s:.2f} s" if s < 100 else f"{s:.0f} s"


def _steps_text(steps: list[int], every: Any, most: int = 12) -> str:
    """"10, 20–60, 80" (a run of three or more steps `every` apart as a range), at most `most` items."""
    step = every if isinstance(every, int) and every > 0 else 1
    items: list[str] = []
    i = 0
    while i < len(steps):
        j = i
        while j + 1 < len(steps) and steps[j + 1] - steps[j] == step:
            j += 1
        if j - i >= 2:
            items.append(f"{steps[i]}–{steps[j]}")
        else:
            items += [str(x) for x in steps[i : j + 1]]
        i = j + 1
    if len(items) > most:
        items = [*items[: most - 1], "…", items[-1]]
    return ", ".join(items)
