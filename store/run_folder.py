"""Where things live under a log directory, and how part files are named. Shared by the writer and the readers.

    LOG_DIR/<run_id>/run.json                      run metadata, written by rank 0 (tmp + rename)
    LOG_DIR/<run_id>/rank-001.json                 what ranks > 0 report (dropped counts, status)
    LOG_DIR/<run_id>/tokens/part-r000-s000100-000149-<attempt>-000007.parquet
    LOG_DIR/<run_id>/forks/part-r000-s000100-000149-<attempt>-000008.parquet
    LOG_DIR/<run_id>/steps/part-r000-s000100-000149-<attempt>-000009.parquet
    LOG_DIR/<run_id>/completions/part-r000-s000100-000149-<attempt>-000010.parquet
    LOG_DIR/<run_id>/vocab/part-r000-<attempt>-000001.parquet
    LOG_DIR/<run_id>/superseded/<attempt>/...      parts moved aside when a run resumed from an earlier step

Parts are written under a hidden temp name (`.part-...tmp`) and renamed, so a finished name is always a whole file.
The step range in the names lets a resume find the parts holding steps after the checkpoint without opening them;
the rank and the writer's attempt id keep names unique across ranks and restarts. Inside a part, rows are sorted by
step with row groups aligned to steps (store/part_file.py), so a reader finds one step by row-group statistics.

Layout versions (run.json `layout_version`; a run.json without it is layout 1):
- 1: tokens/ and forks/ had one part per step in hive folders `step=NNNNNN/`, named without a step range. Still
  read (each part also holds `step` as a column) and superseded on resume; never written any more.
- 2 (now): every table is flat, parts named by rank and step range, one part per many small steps.
A table folder holding any other sub-folder, or a run.json naming a layout this forkwatch does not know, raises
LayoutError: readers skip that run's table with a warning saying so, a resuming writer reports it and moves nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

LAYOUT_VERSION = 2
READABLE_LAYOUTS = (1, 2)
LAYOUT_KEY = "layout_version"  # in run.json
RUN_JSON = "run.json"
SUPERSEDED = "superseded"
STEP_DIR = re.compile(r"^step=(\d+)$")
PART = re.compile(
    r"^part-r(?P<rank>\d+)(?:-s(?P<first>\d+)-(?P<last>\d+))?-(?P<attempt>[0-9a-f]+)-(?P<seq>\d+)\.parquet$"
)
RANK_JSON = re.compile(r"^rank-(\d+)\.json$")


def check_run_id(run_id: object, option: str = "run_id") -> None:
    """Raise ValueError unless `run_id` can name a run folder: a plain name, no path separator, not hidden."""
    if not isinstance(run_id, str) or not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
        raise ValueError(f"{option}={run_id!r}: use a plain folder name (no '/' or '\\', not starting with '.')")


class LayoutError(ValueError):
    """A run folder laid out in a way this forkwatch does not know (written by a newer or foreign tool)."""


def check_layout(meta: dict, where: Path) -> None:
    """Raise LayoutError when run.json's `layout_version` is not one this forkwatch reads."""
    found = meta.get(LAYOUT_KEY, 1)
    if found not in READABLE_LAYOUTS:
        raise LayoutError(
            f"{where}: store layout {found!r}; this forkwatch reads layouts "
            f"{', '.join(map(str, READABLE_LAYOUTS))} (upgrade forkwatch to read this run)"
        )


def part_name(rank: int, attempt: str, seq: int, step_range: tuple[int, int] | None = None) -> str:
    span = f"-s{step_range[0]:06d}-{step_range[1]:06d}" if step_range is not None else ""
    return f"part-r{rank:03d}{span}-{attempt}-{seq:06d}.parquet"


def rank_json(rank: int) -> str:
    return f"rank-{rank:03d}.json"


def run_dirs(log_dir: Path) -> list[Path]:
    """Folders of log_dir that hold a run (a run.json or any table folder), sorted by name."""
    if not log_dir.is_dir():
        return []
    out = []
    for d in sorted(log_dir.iterdir()):
        if (
            d.is_dir()
            and not d.name.startswith(".")
            and ((d / RUN_JSON).is_file() or any((d / t).is_dir() for t in ("steps", "completions", "tokens", "forks")))
        ):
            out.append(d)
    return out


def table_parts(run_dir: Path, table: str) -> list[Path]:
    """Finished part files of one table of one run (temp files and superseded parts excluded), sorted.

    Reads layout 2 (flat) and layout 1 (`step=NNNNNN/` folders); raises LayoutError on any other sub-folder."""
    tdir = run_dir / table
    if not tdir.is_dir():
        return []
    files = []
    for entry in tdir.iterdir():
        if not entry.is_dir():
            files.append(entry)
        elif STEP_DIR.match(entry.name):  # layout 1
            files.extend(entry.iterdir())
        else:
            raise LayoutError(
                f"{tdir}: unknown store layout (sub-folder {entry.name!r}); this forkwatch reads part files "
                f"directly in the table folder (layout 2) or in step=NNNNNN/ folders (layout 1)"
            )
    return sorted(f for f in files if PART.match(f.name))


def step_range(part: Path) -> tuple[int, int] | None:
    """The first and last step a part holds, from its name (layout 2) or its step=NNNNNN folder (layout 1);
    None for a part not tied to steps (vocab written without steps)."""
    m = PART.match(part.name)
    if m is not None and m["first"] is not None:
        return int(m["first"]), int(m["last"])
    d = STEP_DIR.match(part.parent.name)
    return (int(d[1]),) * 2 if d else None  # type: ignore[return-value]
