"""Runs forkwatch did not record: a TRL `trainer_state.json` (or a checkpoint or output folder holding them), a CSV
or JSONL file of per-step metrics, or a TensorBoard event folder, read into a step series under the steps table's
names, so that the health rules judge it like any run (`forkwatch check PATH`) and `import_run` writes it as an
ordinary run folder (`forkwatch import`), which the dashboard and SQL then read like one forkwatch recorded.

Steps are the source's own (TRL's `global_step`, verl's `step`, a CSV's step column); a source that logs every N
steps gives a row every N steps. Names are mapped by a preset (TRL, verl, OpenRLHF) or by `--columns`; a metric the
source does not log stays missing, and the rules that need it are "not evaluated" in the report. A value logged as
NaN or ±inf is kept as logged (a missing value is NULL): a non-finite loss or gradient norm is an alarm. Reading
TensorBoard event files needs the optional `tensorboard` package (`pip install 'forkwatch[tensorboard]'`).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .health_rules import ENTROPY, LENGTH, NON_FINITE, REWARD, TRAINER_SCALARS, TRUNCATED

STEP = "step"
TAIL = "entropy_p90"
# the steps-table columns an import fills, in order; `non_finite` is derived from loss and grad_norm
COLUMNS = (ENTROPY, TAIL, REWARD, LENGTH, TRUNCATED, *TRAINER_SCALARS)
# what `--columns` accepts on the left of `=`, besides the column names themselves
ALIASES = {"entropy": ENTROPY, "tail": TAIL, "p90": TAIL, "reward": REWARD, "length": LENGTH,
           "truncated": TRUNCATED, "clipped": TRUNCATED}

# Each framework's names for what the rules read, in order of preference (a name is also found under a "train/"
# prefix, as Hugging Face's TensorBoard and W&B callbacks log it).
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    # TRL GRPOTrainer's log_history (trainer_state.json); older releases logged completion_length and clip_ratio
    "trl": {
        STEP: ("step", "global_step"), ENTROPY: ("entropy",), REWARD: ("reward",),
        LENGTH: ("completions/mean_length", "completion_length"), TRUNCATED: ("completions/clipped_ratio",),
        "loss": ("loss",), "grad_norm": ("grad_norm",), "kl": ("kl",),
        "clip_ratio_low": ("clip_ratio/low_mean",), "clip_ratio_high": ("clip_ratio/high_mean",),
        "clip_ratio_region": ("clip_ratio/region_mean", "clip_ratio"),
    },
    # verl's metric names (verl/trainer/ppo/metric_utils.py and the actor's metrics), as its trackers log them
    "verl": {
        STEP: ("step", "_step", "Step", "global_step"), ENTROPY: ("actor/entropy",),
        REWARD: ("critic/score/mean", "critic/rewards/mean"), LENGTH: ("response_length/mean",),
        TRUNCATED: ("response_length/clip_ratio",), "loss": ("actor/pg_loss",), "grad_norm": ("actor/grad_norm",),
        "kl": ("actor/kl_loss", "critic/kl"), "clip_ratio_low": ("actor/pg_clipfrac_lower",),
        "clip_ratio_region": ("actor/pg_clipfrac",),
    },
    # OpenRLHF's PPO/GRPO status (logged as train/<name>); it logs the policy's entropy as `entropy_loss`, and only
    # when --entropy_loss_coef is set
    "openrlhf": {
        STEP: ("global_step", "step", "_step"), ENTROPY: ("entropy_loss", "policy_entropy", "entropy"),
        REWARD: ("reward",), LENGTH: ("response_length",), "loss": ("policy_loss",), "kl": ("kl",),
        "clip_ratio_region": ("ppo_clip_ratio", "clip_ratio"),
    },
}
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_EVENTS = "events.out.tfevents."


class SourceError(ValueError):
    """A source forkwatch cannot read, with the file and the fix in the message."""


@dataclass
class ImportedRun:
    """A run read from a source: its step series under the steps table's names (None: not logged at that step;
    NaN or ±inf: logged so), and where each column came from."""

    source: str  # the file or folder read
    format: str  # "trainer_state" | "csv" | "jsonl" | "tensorboard"
    preset: str | None  # the preset used for names not given in `--columns`
    mapping: dict[str, str]  # steps column -> the source's name
    values: dict[str, list[float | None]]  # steps column -> one value per step (STEP included)
    notes: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)  # the source's numeric names no column took

    @property
    def n_steps(self) -> int:
        return len(self.values[STEP])

    def series(self) -> dict[str, np.ndarray]:
        """The step series the health rules judge (missing values as NaN, `non_finite` as 1/0/NaN)."""
        return {k: np.array([math.nan if v is None else v for v in col], dtype=np.float64)
                for k, col in self.values.items()}

    def steps_columns(self) -> dict[str, Any]:
        """The same as columns of the steps table (`RunWriter.put("steps", ...)`): missing values are NULL."""
        out: dict[str, Any] = {STEP: np.asarray(self.values[STEP], dtype=np.int32)}
        for name, col in self.values.items():
            if name == NON_FINITE:
                out[name] = [None if v is None else bool(v) for v in col]
            elif name != STEP:
                out[name] = col
        return out

    def meta(self) -> dict[str, Any]:
        """What run.json records about where the run came from."""
        return {"imported_from": {"source": self.source, "format": self.format, "preset": self.preset,
                                  "columns": self.mapping, "steps": self.n_steps}}


# --------------------------------------------------------------------------- options


def parse_columns(text: str | None) -> dict[str, str]:
    """`--columns entropy=actor/entropy,reward=critic/score/mean` -> {steps column: source name}. A left side is a
    steps column (entropy_mean, reward_mean, ...) or its short name (entropy, reward, length, truncated, tail)."""
    if not text:
        return {}
    out = {}
    valid = [STEP, *COLUMNS, *ALIASES]
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise SourceError(f"--columns {text!r}: each item is NAME=SOURCE_NAME, e.g. entropy=actor/entropy")
        key, name = (x.strip() for x in item.split("=", 1))
        column = ALIASES.get(key, key)
        if column not in (STEP, *COLUMNS) or not name:
            raise SourceError(f"--columns: {key!r} is not a column forkwatch judges; use one of {valid}")
        out[column] = name
    return out


def check_preset(preset: str | None) -> None:
    if preset is not None and preset not in PRESETS:
        raise SourceError(f"preset {preset!r}: use one of {sorted(PRESETS)}")


# --------------------------------------------------------------------------- reading


def read_source(path: str | Path, *, columns: Mapping[str, str] | None = None, preset: str | None = None
                ) -> ImportedRun:
    """Read a run from a file or folder (see the module docstring); raise SourceError naming the file and the fix
    when it cannot be read, or holds no step column or no metric the rules read."""
    check_preset(preset)
    columns = dict(columns or {})
    p = Path(path)
    if not p.exists():
        raise SourceError(f"{p}: no such file or folder")
    notes: list[str] = []
    if p.is_dir():
        p, notes = _pick_in_folder(p)
    name = p.name
    if p.is_dir():
        rows, fmt = _read_tensorboard(p), "tensorboard"
    elif name == TRAINER_STATE or name.endswith(".json") and not name.endswith(".jsonl"):
        rows, fmt = _read_trainer_state(p), "trainer_state"
        preset = preset or "trl"
    elif name.endswith(".jsonl") or name.endswith(".ndjson"):
        rows, fmt = _read_jsonl(p), "jsonl"
    elif name.endswith(".csv") or name.endswith(".tsv"):
        rows, fmt = _read_csv(p), "csv"
    else:
        raise SourceError(f"{p}: not a format forkwatch reads; give a trainer_state.json, a .csv, a .jsonl, or a "
                          "folder holding checkpoints or TensorBoard event files")
    return _to_run(str(p), fmt, rows, columns, preset, notes)


def is_source_folder(folder: str | Path) -> bool:
    """Whether a folder holds something `read_source` reads (a trainer_state.json, in it or in a checkpoint-N/
    folder, or TensorBoard event files), as opposed to a forkwatch log directory."""
    p = Path(folder)
    if not p.is_dir():
        return False
    if (p / TRAINER_STATE).is_file() or any((d / TRAINER_STATE).is_file() for d in p.glob("checkpoint-*")):
        return True
    return next(p.rglob(f"{_EVENTS}*"), None) is not None


def _pick_in_folder(folder: Path) -> tuple[Path, list[str]]:
    """The newest trainer_state.json in a checkpoint or output folder (the highest global_step: it holds the whole
    log so far), else the newest folder of TensorBoard event files."""
    states = [folder / TRAINER_STATE] if (folder / TRAINER_STATE).is_file() else []
    states += [d / TRAINER_STATE for d in folder.iterdir() if d.is_dir() and _CHECKPOINT.match(d.name)
               and (d / TRAINER_STATE).is_file()]
    if states:
        def global_step(f: Path) -> int:
            try:
                return int(json.loads(f.read_text()).get("global_step", -1))
            except (ValueError, OSError, AttributeError):
                return -1

        best = max(states, key=lambda f: (global_step(f), f.parent == folder))
        notes = [f"read {best} (the newest of {len(states)} trainer_state.json files)"] if len(states) > 1 else []
        return best, notes
    event_dirs = sorted({f.parent for f in folder.rglob(f"{_EVENTS}*") if f.is_file()},
                        key=lambda d: max(f.stat().st_mtime for f in d.glob(f"{_EVENTS}*")))
    if event_dirs:
        notes = [f"read {event_dirs[-1]} (the newest of {len(event_dirs)} TensorBoard runs)"] if len(event_dirs) > 1 \
            else []
        return event_dirs[-1], notes
    raise SourceError(f"{folder}: no trainer_state.json (in it or in a checkpoint-N/ folder) and no TensorBoard "
                      f"event files ({_EVENTS}*); point at one of those, or at a .csv / .jsonl file")


Row = dict[str, Any]


def _read_trainer_state(p: Path) -> list[Row]:
    try:
        state = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{p}: cannot read it ({e})") from None
    except ValueError as e:
        raise SourceError(f"{p}: not valid JSON ({e}); a TRL trainer_state.json is one JSON object — is the file "
                          "complete (a run killed while saving leaves it cut)?") from None
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise SourceError(f"{p}: no 'log_history' list; a TRL trainer_state.json has one (is this the file "
                          "Trainer.save_state() writes?)")
    return [r for r in state["log_history"] if isinstance(r, dict)]


def _read_jsonl(p: Path) -> list[Row]:
    rows = []
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{p}: cannot read it ({e})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise SourceError(f"{p}, line {i}: not valid JSON ({e}); a JSONL file holds one JSON object per line") \
                from None
        if not isinstance(row, dict):
            raise SourceError(f"{p}, line {i}: not a JSON object; a JSONL file holds one object per line")
        rows.append(row)
    return rows


def _read_csv(p: Path) -> list[Row]:
    # the csv module, not pandas: an empty cell (not logged) must stay apart from "nan" (logged NaN)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{p}: cannot read it ({e})") from None
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    if not lines:
        raise SourceError(f"{p}: empty; a CSV of per-step metrics has a header line and one line per step")
    reader = csv.DictReader(lines, delimiter="\t" if p.suffix == ".tsv" else ",")
    rows = []
    for i, row in enumerate(reader, 2):
        if None in row:
            raise SourceError(f"{p}, line {i}: more cells than the header has names; check the delimiter and quoting")
        out: Row = {}
        for k, v in row.items():
            v = (v or "").strip()
            if not v:
                continue
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v  # text (a run name, a date): not a metric
        rows.append(out)
    return rows


def _read_tensorboard(folder: Path) -> list[Row]:
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError:
        raise SourceError(f"{folder}: reading TensorBoard event files needs the tensorboard package, which is not "
                          "installed: pip install 'forkwatch[tensorboard]'") from None
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    try:
        acc.Reload()
    except Exception as e:  # the reader's own errors (a corrupt record) have no common base class
        raise SourceError(f"{folder}: cannot read its TensorBoard event files ({e!r})") from None
    by_step: dict[int, Row] = {}
    for tag in acc.Tags().get("scalars", []):
        for event in acc.Scalars(tag):
            by_step.setdefault(int(event.step), {"step": int(event.step)})[tag] = float(event.value)
    if not by_step:
        raise SourceError(f"{folder}: its TensorBoard event files hold no scalars")
    return [by_step[s] for s in sorted(by_step)]


# --------------------------------------------------------------------------- mapping


def _find(names: Iterable[str], candidates: tuple[str, ...]) -> str | None:
    available = set(names)
    for c in candidates:
        for name in (c, f"train/{c}"):
            if name in available:
                return name
    return None


def _numeric_names(rows: list[Row]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                seen.setdefault(k)
    return list(seen)


def _choose_preset(names: list[str]) -> str | None:
    """The preset that maps the most of the source's names, the entropy first (none maps any: None)."""
    scores = {p: (_find(names, m[ENTROPY]) is not None,
                  sum(_find(names, c) is not None for k, c in m.items() if k != STEP))  # "step" matches anything
              for p, m in PRESETS.items()}
    best = max(scores, key=lambda p: scores[p])
    return best if scores[best][1] else None


def _to_run(source: str, fmt: str, rows: list[Row], columns: dict[str, str], preset: str | None,
            notes: list[str]) -> ImportedRun:
    names = _numeric_names(rows)
    if not rows or not names:
        raise SourceError(f"{source}: no numeric metrics in it")
    preset = preset or _choose_preset(names)
    mapping: dict[str, str] = {}
    for column in (STEP, *COLUMNS):
        if column in columns:
            if columns[column] not in names:
                raise SourceError(f"{source}: --columns {column}={columns[column]!r}, but the source has no numeric "
                                  f"{columns[column]!r}; its names: {sorted(names)}")
            mapping[column] = columns[column]
        elif preset is not None and column in PRESETS[preset] and (found := _find(names, PRESETS[preset][column])):
            mapping[column] = found
    step_names = PRESETS[preset][STEP] if preset else tuple(dict.fromkeys(n for m in PRESETS.values() for n in m[STEP]))
    if STEP not in mapping and (found := _find(names, step_names)):
        mapping[STEP] = found
    if STEP not in mapping:
        raise SourceError(f"{source}: no step column (looked for {list(step_names)}); pass --columns step=<name>; "
                          f"its names: {sorted(names)}")
    if not set(mapping) - {STEP}:
        hint = f"preset {preset!r} found none of its names" if preset else "no preset matches its names"
        raise SourceError(f"{source}: no metric the health rules read ({hint}); pass --columns, e.g. "
                          f"--columns entropy=<name>,reward=<name>; its names: {sorted(names)}")
    # one row per step, in step order: rows of the same step (TRL logs train, eval and summary entries apart) merge,
    # a later value replacing an earlier one
    merged: dict[int, dict[str, float]] = {}
    for r in rows:
        step = r.get(mapping[STEP])
        if not isinstance(step, int | float) or isinstance(step, bool) or not math.isfinite(step):
            continue
        got = {c: float(r[n]) for c, n in mapping.items()
               if c != STEP and isinstance(r.get(n), int | float) and not isinstance(r.get(n), bool)}
        if got:
            merged.setdefault(int(step), {}).update(got)
    if not merged:
        raise SourceError(f"{source}: no row has both a step and a mapped metric ({mapping})")
    steps = sorted(merged)
    values: dict[str, list[float | None]] = {STEP: [float(s) for s in steps]}
    for column in (c for c in COLUMNS if c in mapping):
        values[column] = [merged[s].get(column) for s in steps]
    if "loss" in mapping or "grad_norm" in mapping:  # the fact, kept apart from a NaN that reads back as NULL
        checked = [[merged[s][c] for c in ("loss", "grad_norm") if c in merged[s]] for s in steps]
        values[NON_FINITE] = [None if not v else float(not all(map(math.isfinite, v))) for v in checked]
    unmapped = sorted(set(names) - set(mapping.values()))
    missing = [c for c in (ENTROPY, REWARD, LENGTH, TRUNCATED, TAIL) if c not in mapping]
    if missing:
        notes.append(f"not in the source (rules needing them are not evaluated): {', '.join(missing)}")
    return ImportedRun(source, fmt, preset, mapping, values, notes, unmapped)


def trainer_scalars(logs: Mapping[str, Any]) -> dict[str, float | bool]:
    """One TRL log entry's loss, gradient norm, KL and clip ratios under the steps table's names (the live plugin
    reads the trainer's logs with the same names as an imported trainer_state.json), and `non_finite`: the loss or
    the gradient norm is NaN or ±inf."""
    out: dict[str, float | bool] = {}
    for column in TRAINER_SCALARS:
        name = _find(logs, PRESETS["trl"][column])
        value = logs.get(name) if name else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[column] = float(value)
    checked = [out[c] for c in ("loss", "grad_norm") if c in out]
    if checked:
        out[NON_FINITE] = not all(math.isfinite(v) for v in checked)
    return out


# --------------------------------------------------------------------------- writing


def default_run_id(run: ImportedRun) -> str:
    """A run id from the source's path: its folder and file name, reduced to a plain folder name."""
    p = Path(run.source)
    base = p.parent.name + "-" + p.stem if p.stem == "trainer_state" or run.format == "tensorboard" else p.stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip(".-") or "imported"


def import_run(run: ImportedRun, log_dir: str, *, run_id: str | None = None, rules: Mapping[str, Any] | None = None
               ) -> str:
    """Write `run` as an ordinary run folder under `log_dir` (a folder or s3://bucket/prefix) through the store's
    writer: run.json (where it came from, and `rules` as the run's health rules when given) and its steps table.
    -> the run id. Raises ValueError when a run of that id exists already (nothing is overwritten)."""
    from .location import resolve
    from .run_folder import check_run_id, run_dirs
    from .writer import RunWriter

    run_id = run_id or default_run_id(run)
    check_run_id(run_id, "--run")
    loc = resolve(log_dir)
    if loc.exists() and run_id in run_dirs(loc):
        raise ValueError(f"{loc.display(loc.path(run_id))} exists already: pass another --run name")
    meta: dict[str, Any] = {"name": run_id, **run.meta()}
    if rules is not None:
        meta["config"] = {"health_rules": dict(rules)}
    writer = RunWriter(log_dir, run_id, meta=meta, stat_mantissa_bits=None)
    writer.put("steps", run.steps_columns())
    writer.close("imported")
    if sum(writer.dropped.values()):
        raise OSError(f"could not write {loc.display(loc.path(run_id))}: {writer.dropped} rows dropped (see the "
                      "warning above)")
    return run_id
