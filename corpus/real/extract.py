"""Turn a public run's own log into one small per-step CSV for the real-run corpus.

Standard library only. Every value is written as the source logged it (no smoothing, no resampling, no
renaming): the headers are the source's metric names, ``step`` is the step as the source counts it. Only
per-step training metrics are kept; evaluation rows, timing, throughput and memory figures are dropped.

Formats (``--format``):

- ``trl-state``    a TRL ``trainer_state.json`` (its ``log_history``) or a JSON list of such rows.
- ``trl-console``  TRL's console output: one ``{'loss': ...}`` dict per logging step, no step in it; the
                   i-th dict is step ``i * every`` (``--every``, the run's ``logging_steps``), checked
                   against tqdm's redraws where they can be read.
- ``verl-console`` verl's console lines ``step:N - key:value - ...`` (also inside wandb's ``output.log``).
- ``jsonl``        one JSON object per line; ``--step-key`` names the step field (ROLL: ``system/step``).
- ``tfevents``     a TensorBoard event file (scalar summaries, read without TensorBoard).
- ``json-series``  ``{step: {metric: value}}`` or ``[{"step": .., metric: ..}]`` under a key (``path#key``),
                   the metric renamed to the name its file records (``<metric>_key``).
- ``md-table``     a per-step Markdown table in an author's report (``| Step | ... |``), the one under the
                   heading named by the key (``path#heading``); bold marks are dropped, the authors' rounding
                   and column names are kept.
- ``xtuner-console`` XTuner's RL trainer log: per rollout, the ``Rollout N data statistics:`` block and the
                   ``Rollout N: avg entropy: ..`` line; the rollout number is the step.
- ``csv``          a table with a ``step`` column, one row a step (such as a W&B history an author exported);
                   empty cells are dropped.

A manifest row's notes may name ``columns=a,b,c``: only those metrics are kept, and a step none of them
was logged at is dropped (runs read through a file index one page at a time, where the other columns were
not transcribed; author exports that mix in evaluation or method bookkeeping columns).

``--all`` rebuilds every CSV of ``manifest.csv`` from the original files, read with ``git show
COMMIT:PATH`` from clones under ``--clones`` (``<owner>/<name>`` or ``<owner>+<name>/repo``); ``--check``
does the same and fails on any difference with the committed CSV.
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import math
import re
import struct
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Metrics that are not about the policy's training: time, throughput, memory, counters, bookkeeping.
DROP = re.compile(
    r"^(eval[_/]|val[-/]|test[_/]|timing|perf/|time/|system/|train_runtime|train_samples|train_steps|train_loss$"
    r"|total_flos|epoch$|num_tokens$|step_time$|global_seqlen|prompt_length/|training/|.*_per_second$"
    r"|.*memory|.*throughput|.*mfu|judge/|scheduler/)"
)
# verl prints ~100 metrics a step; these prefixes are the policy-side ones worth keeping.
VERL_KEEP = ("actor/", "critic/score/", "critic/rewards/", "response_length/")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
NUMBER = re.compile(r"^np\.float\d*\((.*)\)$")


def keep(name: str, framework_keep: tuple[str, ...] | None = None) -> bool:
    if DROP.match(name):
        return False
    return framework_keep is None or name.startswith(framework_keep)


def cell(value: object) -> str:
    """The logged value as text; floats keep their shortest round-trip form."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    text = str(value).strip()
    inner = NUMBER.match(text)
    return inner.group(1) if inner else text


def numeric(rows: list[dict]) -> list[dict]:
    """Drop non-numeric fields (strings such as 'global_step/max_steps') so the CSV is a table of numbers."""
    out = []
    for row in rows:
        clean = {}
        for k, v in row.items():
            text = cell(v)
            try:
                float(text)
            except ValueError:
                continue
            clean[k] = text
        out.append(clean)
    return out


# --- formats ---------------------------------------------------------------------------------------------


def from_trl_state(raw: bytes, key: str | None) -> list[dict]:
    data = json.loads(raw)
    if key:
        data = data[key]
    history = data["log_history"] if isinstance(data, dict) else data
    rows = []
    for entry in history:
        if "step" not in entry or any(k.startswith("eval_") for k in entry) or "train_runtime" in entry:
            continue
        row = {"step": entry["step"]} | {k: v for k, v in entry.items() if k != "step" and keep(k)}
        rows.append(row)
    return rows


def _tqdm_log_steps(text: str) -> list[int]:
    """Steps at which tqdm was cleared and redrawn at the same count: where TRL printed a log line.

    The log lines themselves land elsewhere (stdout and stderr are buffered apart), and some redraws are
    split by them, so this finds a subset of the logging steps: enough to refuse a wrong ``--every``.
    """
    steps = []
    for m in re.finditer(r"\| *(\d+)/\d+ \[[^\]]*\]\r {10,}\r\r? *\d+%\|[^|]*\| *(\d+)/\d+", text):
        if m.group(1) == m.group(2):
            steps.append(int(m.group(1)))
    return steps


def from_trl_console(raw: bytes, every: int) -> list[dict]:
    text = raw.decode("utf-8", "replace")
    logs = []
    for m in re.finditer(r"\{'[^{}\n]*\}", text):
        try:
            entry = ast.literal_eval(m.group(0))
        except (ValueError, SyntaxError):
            continue
        if not isinstance(entry, dict) or "loss" not in entry or any(str(k).startswith("eval_") for k in entry):
            continue
        logs.append(entry)
    expected = [every * (i + 1) for i in range(len(logs))]
    stray = sorted(set(_tqdm_log_steps(text)) - set(expected))
    if stray:
        raise ValueError(f"tqdm shows logs at steps {stray[:5]}, not every {every} steps: pass the run's --every")
    return [{"step": every * (i + 1)} | {k: v for k, v in e.items() if keep(k)} for i, e in enumerate(logs)]


def from_verl_console(raw: bytes) -> list[dict]:
    rows: dict[int, dict] = {}
    for line in ANSI.sub("", raw.decode("utf-8", "replace")).splitlines():
        m = re.search(r"(?:^|\s)step:(\d+) - (.*)$", line)
        if not m or "actor/" not in m.group(2):
            continue
        row = {"step": int(m.group(1))}
        for part in m.group(2).split(" - "):
            name, sep, value = part.partition(":")
            if sep and keep(name.strip(), VERL_KEEP):
                row[name.strip()] = value.strip()
        rows[row["step"]] = row  # a resumed run prints a step again: the later line is the one that counted
    return [rows[s] for s in sorted(rows)]


def from_jsonl(raw: bytes, step_key: str) -> list[dict]:
    rows = []
    for line in raw.decode("utf-8").splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        if step_key not in entry:
            continue
        step = entry[step_key]
        step = int(step) if float(step).is_integer() else step  # ROLL logs the step as 1.0
        rows.append({"step": step} | {k: v for k, v in entry.items() if k != step_key and keep(k)})
    return rows


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message; length-delimited values as bytes."""
    i = 0
    while i < len(buf):
        tag, i = _varint(buf, i)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i : i + size], i + size
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"protobuf wire type {wire} is not used by TensorBoard scalars")
        yield number, wire, value


def _float32(four: bytes) -> str:
    """A float32 in its shortest decimal form that reads back to the same float32."""
    value = struct.unpack("<f", four)[0]
    if math.isnan(value) or math.isinf(value):
        return cell(value)
    for digits in range(6, 10):
        text = f"{value:.{digits}g}"
        if struct.pack("<f", float(text)) == four:
            return text
    return repr(value)


def from_tfevents(raw: bytes) -> list[dict]:
    """Scalars of a TensorBoard event file: Event{step=2, summary=5{value=1{tag=1, simple_value=2}}}."""
    rows: dict[int, dict] = {}
    i = 0
    while i + 12 <= len(raw):
        (length,) = struct.unpack("<Q", raw[i : i + 8])
        event, i = raw[i + 12 : i + 12 + length], i + 12 + length + 4  # skip both CRCs
        step, values = 0, []
        for number, _, value in _fields(event):
            if number == 2:
                step = value
            elif number == 5:
                for vnum, _, v in _fields(value):
                    if vnum != 1:
                        continue
                    parts = {n: x for n, _, x in _fields(v)}
                    if 1 in parts and 2 in parts:
                        values.append((parts[1].decode(), _float32(parts[2])))
        for tag, text in values:
            if keep(tag.removeprefix("train/")):
                rows.setdefault(step, {"step": step})[tag] = text
    return [rows[s] for s in sorted(rows)]


def from_json_series(raw: bytes, key: str | None) -> list[dict]:
    data = json.loads(raw)
    if key:
        data = data[key]
    names = {k.removesuffix("_key"): v for k, v in data.items() if k.endswith("_key")}
    body = data.get("data", data.get("merged", data))
    items = body.items() if isinstance(body, dict) else ((e["step"], e) for e in body)
    rows = []
    for step, values in items:
        row = {"step": int(step)}
        for k, v in values.items():
            if k == "step":
                continue
            # the file renamed the logged metric ('entropy' for 'actor/entropy'); write the logged name back
            name = names.get(k) or names.get(k.removeprefix("train_")) or k
            if keep(name):
                row[name] = v
        rows.append(row)
    return sorted(rows, key=lambda r: r["step"])


def from_md_table(raw: bytes, heading: str | None) -> list[dict]:
    """The first table with a ``Step`` column under the heading whose text is ``heading``."""
    if not heading:
        raise ValueError("md-table needs the heading above the table as the key: path#heading")
    lines = raw.decode("utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("#") and line.lstrip("#").strip() == heading]
    if len(starts) != 1:
        raise ValueError(f"{len(starts)} headings read {heading!r}: the key must name exactly one")
    rows, columns = [], None
    for line in lines[starts[0] + 1 :]:
        if line.startswith("#"):
            break
        cells = [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]
        if not line.startswith("|"):
            if columns:
                break
            continue
        if columns is None:
            if cells[0].lower() == "step":
                columns = cells
            continue
        if set(cells[0]) <= set("-: "):
            continue  # the header's separator row
        row = dict(zip(columns, cells, strict=True))
        rows.append({"step": int(row.pop(columns[0]))} | row)
    if not rows:
        raise ValueError(f"no table with a Step column under {heading!r}")
    return rows


def from_xtuner_console(raw: bytes) -> list[dict]:
    rows: dict[int, dict] = {}
    block = None
    for line in raw.decode("utf-8", "replace").splitlines():
        if m := re.search(r"\] Rollout (\d+) data statistics:$", line):
            block = rows.setdefault(int(m.group(1)), {"step": int(m.group(1))})
            continue
        if block is not None and (m := re.match(r"^  - ([\w/]+) *: (\S+)$", line)):
            if keep(m.group(1)):
                block[m.group(1)] = m.group(2)
            continue
        block = None
        if m := re.search(r"\] Rollout (\d+): (avg entropy): (\S+), (avg rollout entropy): (\S+)$", line):
            row = rows.setdefault(int(m.group(1)), {"step": int(m.group(1))})
            row[m.group(2)], row[m.group(4)] = m.group(3), m.group(5)
    return [rows[s] for s in sorted(rows)]


def from_csv(raw: bytes) -> list[dict]:
    rows = []
    for record in csv.DictReader(raw.decode("utf-8-sig").splitlines()):
        row = {"step": int(record.pop("step"))}
        row |= {k: v for k, v in record.items() if v not in ("", None) and keep(k)}
        rows.append(row)
    return sorted(rows, key=lambda r: r["step"])


# --- output ----------------------------------------------------------------------------------------------


def merge(parts: list[list[dict]]) -> list[dict]:
    """Join the series of several files of one run on the step."""
    rows: dict[int, dict] = {}
    for part in parts:
        for row in part:
            rows.setdefault(int(row["step"]), {}).update(row)
    return [rows[s] for s in sorted(rows)]


def to_csv(rows: list[dict]) -> str:
    rows = numeric(rows)
    if not rows or not any(k for r in rows for k in r if "entropy" in k.lower()):
        raise ValueError("no per-step entropy in this source: it does not belong in the corpus")
    columns = ["step"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def parse(raw: bytes, fmt: str, *, key: str | None, every: int | None, step_key: str | None) -> list[dict]:
    if fmt == "trl-state":
        return from_trl_state(raw, key)
    if fmt == "trl-console":
        if not every:
            raise ValueError("trl-console needs --every (the run's logging_steps): its log lines carry no step")
        return from_trl_console(raw, every)
    if fmt == "verl-console":
        return from_verl_console(raw)
    if fmt == "jsonl":
        return from_jsonl(raw, step_key or "step")
    if fmt == "tfevents":
        return from_tfevents(raw)
    if fmt == "json-series":
        return from_json_series(raw, key)
    if fmt == "md-table":
        return from_md_table(raw, key)
    if fmt == "xtuner-console":
        return from_xtuner_console(raw)
    if fmt == "csv":
        return from_csv(raw)
    raise ValueError(f"unknown format {fmt!r}")


# --- the manifest's runs ---------------------------------------------------------------------------------


def git_show(clones: Path, repository: str, commit: str, path: str) -> bytes:
    owner, name = repository.split("/")
    for candidate in (clones / owner / name, clones / f"{owner}+{name}" / "repo"):
        if candidate.exists():
            return subprocess.run(
                ["git", "-C", str(candidate), "show", f"{commit}:{path}"], check=True, capture_output=True
            ).stdout
    raise FileNotFoundError(f"no clone of {repository} under {clones}: git clone https://github.com/{repository}")


def options(notes: str) -> dict:
    """The extraction options a manifest row records in its notes: 'extract: format=... every=...'."""
    m = re.search(r"extract: ([^;]*)", notes)
    if not m:
        raise ValueError(f"manifest notes lack 'extract: format=...': {notes[:80]!r}")
    return dict(part.split("=", 1) for part in m.group(1).split())


def select(rows: list[dict], columns: str | None) -> list[dict]:
    """Keep only the named metrics (comma-separated) and the steps that logged one of them."""
    if not columns:
        return rows
    names = columns.split(",")
    missing = set(names) - {k for r in rows for k in r}
    if missing:
        raise ValueError(f"columns not in this source: {sorted(missing)}")
    kept = [{k: v for k, v in r.items() if k == "step" or k in names} for r in rows]
    return [r for r in kept if len(r) > 1]


def rebuild(row: dict, clones: Path) -> str:
    opts = options(row["notes"])
    parts = []
    for spec in row["path"].split(";"):
        path, _, key = spec.partition("#")
        raw = git_show(clones, row["repository"], row["commit"], path)
        every = int(opts["every"]) if "every" in opts else None
        parts.append(parse(raw, opts["format"], key=key or None, every=every, step_key=opts.get("step_key")))
    return to_csv(select(merge(parts), opts.get("columns")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", help="a log file (one run), or nothing with --all")
    ap.add_argument(
        "--format",
        choices=[
            "trl-state", "trl-console", "verl-console", "jsonl", "tfevents", "json-series", "md-table",
            "xtuner-console", "csv",
        ],
    )  # fmt: skip
    ap.add_argument("--key", help="the run's key inside a JSON file holding several runs")
    ap.add_argument("--every", type=int, help="trl-console: the run's logging_steps")
    ap.add_argument("--step-key", help="jsonl: the field holding the step")
    ap.add_argument("--columns", help="keep only these metrics (comma-separated)")
    ap.add_argument("--out", type=Path, help="CSV to write (default: stdout)")
    ap.add_argument("--all", action="store_true", help="rebuild every run of manifest.csv from git clones")
    ap.add_argument("--check", action="store_true", help="with --all: compare with the committed CSVs, write nothing")
    ap.add_argument("--clones", type=Path, help="with --all: folder holding the clones")
    args = ap.parse_args(argv)

    if args.all:
        if not args.clones:
            ap.error("--all needs --clones DIR (clones as DIR/<owner>/<name>)")
        with open(HERE / "manifest.csv", newline="") as f:
            manifest = list(csv.DictReader(f))
        failed = 0
        for row in manifest:
            text = rebuild(row, args.clones)
            target = HERE / row["file"]
            if args.check:
                if not target.exists() or target.read_text() != text:
                    print(f"DIFFERS: {row['id']}", file=sys.stderr)
                    failed += 1
            else:
                target.write_text(text)
        print(
            f"{len(manifest) - failed} of {len(manifest)} runs {'match' if args.check else 'written'}", file=sys.stderr
        )
        return 1 if failed else 0

    if not args.source or not args.format:
        ap.error("give a source file and --format, or --all")
    rows = parse(Path(args.source).read_bytes(), args.format, key=args.key, every=args.every, step_key=args.step_key)
    text = to_csv(select(rows, args.columns))
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
