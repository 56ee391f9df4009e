"""Where things live under a log directory, and how part files are named. Shared by the writer and the readers.

    LOG_DIR/<run_id>/run.json                      run metadata, written by rank 0 (tmp + rename)
    LOG_DIR/<run_id>/rank-001.json                 what ranks > 0 report (dropped counts, status)
    LOG_DIR/<run_id>/tokens/step=000123/part-r000-<attempt>-000007.parquet
    LOG_DIR/<run_id>/forks/step=000123/part-r000-<attempt>-000008.parquet
    LOG_DIR/<run_id>/steps/part-r000-s000100-000149-<attempt>-000009.parquet
    LOG_DIR/<run_id>/completions/part-r000-s000100-000149-<attempt>-000010.parquet
    LOG_DIR/<run_id>/vocab/part-r000-<attempt>-000001.parquet
    LOG_DIR/<run_id>/superseded/<attempt>/...      parts moved aside when a run resumed from an earlier step

Parts are written under a hidden temp name (`.part-...tmp`) and renamed, so a finished name is always a whole file.
The step range in the small tables' names lets a resume find the parts holding steps after the checkpoint without
opening them; the rank and the writer's attempt id keep names unique across ranks and restarts.
"""

from __future__ import annotations

import re
from pathlib import Path

RUN_JSON = "run.json"
SUPERSEDED = "superseded"
STEP_DIR = re.compile(r"^step=(\d+)$")
PART = re.compile(
    r"^part-r(?P<rank>\d+)(?:-s(?P<first>\d+)-(?P<last>\d+))?-(?P<attempt>[0-9a-f]+)-(?P<seq>\d+)\.parquet$"
)
RANK_JSON = re.compile(r"^rank-(\d+)\.json$")


def step_dir(step: int) -> str:
    return f"step={step:06d}"


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


def table_parts(run_dir: Path, table: str, partitioned: bool) -> list[Path]:
    """Finished part files of one table of one run (temp files and superseded parts excluded), sorted."""
    tdir = run_dir / table
    if not tdir.is_dir():
        return []
    if partitioned:
        files = [f for d in tdir.iterdir() if d.is_dir() and STEP_DIR.match(d.name) for f in d.iterdir()]
    else:
        files = list(tdir.iterdir())
    return sorted(f for f in files if PART.match(f.name))
