"""Health benchmark: what judging a run costs, on a long corpus-shaped series (corpus/shapes.py, stretched).

    .venv/bin/python benchmarks/health_bench.py [--steps 1000 5000 20000] [--repeat 5]

Two figures per length: `judge` on the whole series (what `forkwatch check`, `runs` and the dashboard pay per run),
and one live hand-off of 10 new steps at that length (what the training thread pays per hand-off: the live monitor
judges the whole series again). Both are the median of --repeat calls.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "corpus"))
import shapes  # noqa: E402
from forkwatch.store.health import LiveMonitor, judge  # noqa: E402


def stretched(n: int) -> dict[str, np.ndarray]:
    """The corpus's slow-collapse series repeated to n steps (values repeat; the cost depends on n only)."""
    base = shapes.series("mechanism_collapse_slow")
    reps = -(-n // base["step"].size)
    out = {k: np.tile(v, reps)[:n] for k, v in base.items()}
    out["step"] = np.arange(1, n + 1)
    return out


def _median_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[1000, 5000, 20000])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    print(f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
    for n in args.steps:
        data = stretched(n)
        whole = _median_s(lambda d=data: judge(d), args.repeat)
        rows = [{k: float(v[i]) for k, v in data.items()} for i in range(n)]

        def hand_off(rows=rows) -> None:
            monitor = LiveMonitor()
            monitor.update_many(rows[:-10])
            t0 = time.perf_counter()
            monitor.update_many(rows[-10:])
            hand_off.last = time.perf_counter() - t0

        live = []
        for _ in range(args.repeat):
            hand_off()
            live.append(hand_off.last)
        print(f"{n:>6} steps: judge {whole * 1e3:7.1f} ms; one live hand-off of 10 steps {statistics.median(live) * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
