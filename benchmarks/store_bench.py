"""Store benchmark: writer throughput, bytes per token row on disk, and DuckDB latency of the dashboard's two
typical queries, on a synthetic run whose values are distributed like real ones (store/synthetic.py).

    .venv/bin/python benchmarks/store_bench.py --rows 20000000 [--out DIR] [--keep]

Targets (issue #2): >= 2M token rows/s (one writer thread), <= 12 bytes per token row, per-step aggregates of one
run <= 0.5 s, every token of one completion at one step <= 0.1 s, at 20M rows.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from forkwatch.store import RunWriter, connect, queries
from forkwatch.store.synthetic import VOCAB_SIZE, step_batches, vocab_columns


def _timed(fn, repeat: int) -> tuple[float, float]:
    """(first call, median of the next `repeat` calls) in seconds."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000, help="token rows to write (the issue's figure: 20M)")
    p.add_argument("--completions-per-step", type=int, default=64)
    p.add_argument("--pool", type=int, default=24, help="distinct synthetic steps generated, then reused")
    p.add_argument("--out", type=Path, default=None, help="log dir (default: a temp dir, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the log dir")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="forkwatch-bench-"))
    if out.exists():
        shutil.rmtree(out)

    # Generating data is not what we measure: build a pool of realistic steps first, then replay it with fresh
    # step numbers and completion ids (each part is compressed on its own, so repeats across parts do not help).
    t0 = time.perf_counter()
    pool = [b["tokens"] for b in step_batches(steps=args.pool, completions_per_step=args.completions_per_step)]
    print(
        f"generated a pool of {sum(len(t['entropy']) for t in pool):,} token rows in {time.perf_counter() - t0:.1f} s"
    )

    batches, total, step = [], 0, 0
    while total < args.rows:
        src = pool[step % len(pool)]
        n = min(len(src["entropy"]), args.rows - total)
        cols = {k: (v[:n] if isinstance(v, np.ndarray) else v) for k, v in src.items()}
        cols["step"] = step
        cols["completion_id"] = src["completion_id"][:n] + (step - step % len(pool)) * args.completions_per_step
        batches.append(cols)
        total += n
        step += 1

    w = RunWriter(out, "bench", meta={"model": "synthetic"}, max_queue_rows=total + 1, flush_interval_s=3600)
    w.put("vocab", vocab_columns(VOCAB_SIZE))
    w.flush()
    t0 = time.perf_counter()
    for cols in batches:
        w.put("tokens", cols)
    w.close()
    write_s = time.perf_counter() - t0
    assert sum(w.dropped.values()) == 0, w.dropped
    # The small tables, so the views and named queries have what the dashboard reads.
    w2 = RunWriter(out, "bench", max_queue_rows=10**9, flush_interval_s=3600)
    for b in step_batches(steps=step, completions_per_step=1, min_len=1, max_len=1, seed=1):
        w2.put("steps", b["steps"])
    w2.close()

    token_files = list((out / "bench" / "tokens").rglob("*.parquet"))
    token_bytes = sum(f.stat().st_size for f in token_files)
    print(f"steps: {step}, token parts: {len(token_files)}")
    print(
        f"writer throughput: {total / write_s / 1e6:.2f} M token rows/s ({total:,} rows in {write_s:.1f} s, one thread)"
    )
    print(f"bytes per token row on disk: {token_bytes / total:.2f} ({token_bytes / 2**20:.0f} MiB)")

    t0 = time.perf_counter()
    con = connect(out)
    print(f"connect (footer scan of {len(token_files)} token parts): {time.perf_counter() - t0:.2f} s")
    n = con.execute("SELECT count(*) FROM tokens").fetchone()[0]
    assert n == total, (n, total)
    mid = step // 2
    cid = int(batches[mid]["completion_id"][0])

    results = {
        "(a) step_series (steps view, one run)": _timed(lambda: queries.step_series(con, "bench"), args.repeat),
        "(a') per-step aggregates over all token rows (mean, p90 ...)": _timed(
            lambda: queries.token_step_aggregates(con, "bench"), args.repeat
        ),
        "(b) completion_tokens (one completion at one step, with text)": _timed(
            lambda: queries.completion_tokens(con, "bench", mid, cid), args.repeat
        ),
    }
    assert len(queries.completion_tokens(con, "bench", mid, cid)) > 0
    for name, (first, med) in results.items():
        print(f"{name}: first {first * 1000:.0f} ms, median {med * 1000:.0f} ms")
    print(f"python {platform.python_version()}, {platform.machine()}")
    if not args.keep and args.out is None:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
