"""Do the demo's designed verdicts hold at every seed and thread count? Runs `forkwatch demo` (without the dashboard)
for seeds × torch thread counts and prints one Markdown table row per combination (docs/experiments.md has it).

    python scripts/seeds_threads.py --out seeds_threads                 # seeds 0-4 x threads 1, 2
    python scripts/seeds_threads.py --out seeds_threads --seeds 0 --threads 1 2
    python scripts/seeds_threads.py --table A/rows.json B/rows.json      # one table from several sweeps' rows
    python scripts/seeds_threads.py --table A/rows.json --times          # with each demo's wall and CPU seconds

Each combination runs in its own process (torch's thread count is set once per process, before any work) and writes
under OUT/t<threads>/s<seed>/; the warm-up model is trained once per thread count (OUT/t<threads>/warmup/), since
its floats, too, depend on how the kernels split their sums. Exit status 1 when any run's verdict differs from the
one it was designed to get, or when `forkwatch check` did not exit 1 on a demo's logs. The table leaves out each
demo's wall and CPU seconds unless `--times` asks for them: a sweep is a correctness check, and its times mean
something only on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger("seeds_threads")


def one(out: Path, seed: int, threads: int, steps: int | None) -> dict:
    """Run the demo for one (seed, threads) in this process; returns what the table needs."""
    import torch

    torch.set_num_threads(threads)
    from forkwatch.demo import pipeline

    settings = pipeline.settings_for(seed=seed, steps=steps)
    result = pipeline.run_demo(settings, out / f"t{threads}" / f"s{seed}", cache_dir=out / f"t{threads}",
                               progress=False)
    check = subprocess.run([sys.executable, "-m", "forkwatch.cli", "check", str(result.log_dir)],
                           capture_output=True, text=True)
    from forkwatch.store.check import check_runs

    fired = {}
    for r in check_runs(result.log_dir):
        rep = r["report"]
        alarms = [f.fired_at for f in rep.flags if f.is_alarm and f.kind == rep.verdict]
        fired[r["name"]] = alarms[-1] if alarms else None
    return {
        "seed": seed, "threads": threads, "seconds": round(result.seconds, 1), "cpu_seconds": round(result.cpu_seconds, 1),
        "verdicts": result.verdicts, "expected": {s.name: s.expect for s in result.specs}, "fired_at": fired,
        "check_exit": check.returncode,
        "recall": result.forks.recall if result.forks else None,
        "precision": result.forks.precision if result.forks else None,
        # what the demo prints, kept for docs/experiments.md (the verdicts, the forks, the detector metrics)
        "printed": [*result.verdict_lines, *(result.forks.lines() if result.forks else []), *result.detector_lines],
    }  # fmt: skip


def table(rows: list[dict], *, times: bool = False) -> tuple[list[str], bool]:
    """Markdown lines, and whether every designed verdict held and every check exited 1."""
    names = list(rows[0]["expected"])
    head = ["seed", "threads", *[f"{n} ({rows[0]['expected'][n]})" for n in names], "check exit", "fork recall / precision",
            *(["wall / CPU s"] if times else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ok = True
    for r in rows:
        cells = [str(r["seed"]), str(r["threads"])]
        for n in names:
            got, step = r["verdicts"].get(n, "missing"), r["fired_at"].get(n)
            ok &= got == r["expected"][n]
            mark = "" if got == r["expected"][n] else " **≠**"
            cells.append(f"{got}{f' @{step}' if step is not None else ''}{mark}")
        ok &= r["check_exit"] == 1
        cells += [str(r["check_exit"]), f"{r['recall']:.3f} / {r['precision']:.3f}"]
        if times:
            cells.append(f"{r['seconds']:.0f} / {r['cpu_seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines, ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("seeds_threads"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=None, help="GRPO steps per run (default: the demo's)")
    p.add_argument("--table", type=Path, nargs="+", metavar="ROWS_JSON", help="print the table of earlier sweeps")
    p.add_argument("--times", action="store_true", help="add each demo's wall and CPU seconds to the table")
    p.add_argument("--one", nargs=2, type=int, metavar=("SEED", "THREADS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.table:
        rows = sorted((r for f in args.table for r in json.loads(f.read_text())), key=lambda r: (r["threads"], r["seed"]))
        lines, ok = table(rows, times=args.times)
        print("\n".join(lines))
        print("every designed verdict held" if ok else "SOME VERDICT DIFFERED FROM ITS DESIGN")
        return 0 if ok else 1
    if args.one:
        print(json.dumps(one(args.out, *args.one, args.steps)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for threads in args.threads:
        for seed in args.seeds:
            cmd = [sys.executable, __file__, "--out", str(args.out), "--one", str(seed), str(threads)]
            if args.steps is not None:
                cmd += ["--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                return 2
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            logger.info("seed %d, %d thread(s): %s", seed, threads, rows[-1]["verdicts"])
            (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    lines, ok = table(rows, times=args.times)
    print("\n".join(lines))
    print("every designed verdict held" if ok else "SOME VERDICT DIFFERED FROM ITS DESIGN")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
