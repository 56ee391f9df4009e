"""Where things live under a log directory, and how part files are named. Shared by the writer and the readers
(what run.json holds, and its one reader, are in store/run_meta.py).
The log directory is a Location (store/location.py): a local folder or an S3 prefix, listed and read the same way.

    LOG_DIR/<run_id>/run.json                      run metadata, written whole by rank 0's writer thread
    LOG_DIR/<run_id>/rank-001.json                 what ranks > 0 report (dropped counts, status)
    LOG_DIR/<run_id>/tokens/part-r000-s000100-000149-<attempt>-000007.parquet
    LOG_DIR/<run_id>/forks/part-r000-s000100-000149-<attempt>-000008.parquet
    LOG_DIR/<run_id>/steps/part-r000-s000100-000149-<attempt>-000009.parquet
    LOG_DIR/<run_id>/completions/part-r000-s000100-000149-<attempt>-000010.parquet
    LOG_DIR/<run_id>/vocab/part-r000-<attempt>-000001.parquet
    LOG_DIR/<run_id>/superseded/<attempt>/...      parts moved aside when a run resumed from an earlier step

A part is written whole or not at all (Location.put_whole: temp name and rename on disk, one upload on S3), so a
finished name is always a whole file.
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

import os
import re
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from .location import Location, resolve

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


def check_layout(meta: dict, where: str) -> None:
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


@dataclass
class RunListing:
    """Every file of one run folder, from one listing: path relative to the run folder -> its FileInfo."""

    location: Location
    run_id: str
    files: dict[str, pafs.FileInfo] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return self.location.path(self.run_id)

    def holds_run(self) -> bool:
        """A run is a folder with a run.json or any record table's parts."""
        return RUN_JSON in self.files or any(rel.split("/", 1)[0] in _RECORD_DIRS for rel in self.files)

    def rank_files(self) -> list[tuple[int, str]]:
        """(rank, path) of each rank-NNN.json, by rank."""
        return sorted((int(m[1]), self.files[rel].path) for rel in self.files if (m := RANK_JSON.match(rel)))

    def table_parts(self, table: str) -> list[pafs.FileInfo]:
        """Finished part files of one table (temp files and superseded parts excluded), sorted by path.

        Reads layout 2 (flat) and layout 1 (`step=NNNNNN/` folders); raises LayoutError on any other sub-folder."""
        out = []
        for rel, info in self.files.items():
            head, _, rest = rel.partition("/")
            if head != table or not rest:
                continue
            sub, _, name = rest.rpartition("/")
            if info.type != pafs.FileType.File:
                sub, name = rest, ""
            if sub and (STEP_DIR.match(sub) is None or "/" in sub):
                raise LayoutError(
                    f"{self.location.display(self.path)}/{table}: unknown store layout (sub-folder {sub!r}); this "
                    "forkwatch reads part files directly in the table folder (layout 2) or in step=NNNNNN/ folders "
                    "(layout 1)"
                )
            if info.type == pafs.FileType.File and PART.match(name):
                out.append(info)
        return sorted(out, key=lambda i: i.path)


_RECORD_DIRS = ("steps", "completions", "tokens", "forks")


def list_run(where: Location | str | os.PathLike[str], run_id: str) -> RunListing:
    """One run folder's files (one recursive listing; superseded/ left out)."""
    loc = resolve(where)
    listing = RunListing(loc, run_id)
    base = loc.path(run_id)
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=True))
    except (FileNotFoundError, NotADirectoryError):
        return listing
    for info in infos:
        rel = info.path[len(base) + 1:]
        if rel.split("/", 1)[0] != SUPERSEDED and (info.type == pafs.FileType.File or rel.count("/") <= 1):
            listing.files[rel] = info  # files, and folders two deep (a table's sub-folders tell its layout)
    return listing


def list_run_folders(where: Location | str | os.PathLike[str]) -> list[RunListing]:
    """The run folders of a log directory, each with its files, sorted by run id: one recursive listing in all
    (on S3 a paginated list of the prefix, the cheapest way to see every part).

    The file level of "which runs are there": the views (store/views.py) build the `runs` view from these listings,
    and `queries.run_overview` is the one query that lists runs with what their tables hold."""
    loc = resolve(where)
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.root, allow_not_found=True, recursive=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    runs: dict[str, RunListing] = {}
    prefix = len(loc.root.rstrip("/")) + 1
    for info in infos:
        rel = info.path[prefix:]
        run_id, _, inner = rel.partition("/")
        if not inner or run_id.startswith("."):
            continue
        if inner.split("/", 1)[0] == SUPERSEDED or (info.type != pafs.FileType.File and inner.count("/") > 1):
            continue
        runs.setdefault(run_id, RunListing(loc, run_id)).files[inner] = info
    return [runs[r] for r in sorted(runs) if runs[r].holds_run()]


def run_dirs(where: Location | str | os.PathLike[str]) -> list[str]:
    """Ids of the runs under a log directory (folders with a run.json or a record table), sorted."""
    return [r.run_id for r in list_run_folders(where)]


def step_range(part: str) -> tuple[int, int] | None:
    """The first and last step a part holds, from its name (layout 2) or its step=NNNNNN folder (layout 1);
    None for a part not tied to steps (vocab written without steps)."""
    folder, _, name = part.rpartition("/")
    m = PART.match(name)
    if m is not None and m["first"] is not None:
        return int(m["first"]), int(m["last"])
    d = STEP_DIR.match(folder.rpartition("/")[2])
    return (int(d[1]),) * 2 if d else None  # type: ignore[return-value]
