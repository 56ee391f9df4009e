"""Store benchmark: writer throughput, bytes per token row on disk, and DuckDB latency of the dashboard's two
typical queries, on a synthetic run whose values are distributed like real ones (tests/synthetic_records.py).

    .venv/bin/python benchmarks/store_bench.py --rows 20000000 [--out DIR] [--keep]
    .venv/bin/python benchmarks/store_bench.py --small-steps 10000 [--rows-per-step 100]
    .venv/bin/python benchmarks/store_bench.py --rows 20000000 --s3          # the same run to a local S3 server
    .venv/bin/python benchmarks/store_bench.py --rows 20000000 --out s3://bucket/prefix   # any S3 (AWS_* env)

`--s3` starts SeaweedFS on 127.0.0.1 (benchmarks/local_s3.py; `weed` from the `test` extra), writes the run there,
measures as on disk, and stops it. On S3 the log dir is a fresh prefix and is not removed (`--out`).

`--small-steps N` measures instead what the writer thread costs per small training step (the tiny CPU runs: ~100
token rows a step): N steps of tokens, forks, completions and a steps row, put as the plugin puts them, then
`close()`; it reports the writer thread's CPU time per step (from /proc, Linux) and the wall time per step.

Targets: >= 2M token rows/s (one writer thread), <= 12 bytes per token row, per-step aggregates of one
run <= 0.5 s, every token of one completion at one step <= 0.1 s, at 20M rows.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from forkwatch.store import RunWriter, connect, queries, run_folder

# The synthetic records live with the tests, their other user: a fixture, not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic_records import VOCAB_SIZE, step_batches, vocab_columns  # noqa: E402


def token_step_aggregates(con, run_id: str):
    """Per-step aggregates computed from every recorded token row of one run (entropy mean/p90, forks, tokens): the
    full-scan workload this benchmark times against reading the precomputed steps rows. Not a product query."""
    return con.execute(
        """
        SELECT step, count(*) AS n_tokens, avg(entropy) AS entropy_mean,
               quantile_cont(entropy, 0.9) AS entropy_p90, avg(renyi2) AS renyi2_mean,
               avg(group_js) AS group_js_mean, avg(is_fork::INTEGER) AS fork_fraction,
               avg(selected) AS selected_mean
        FROM tokens WHERE run_id = ? GROUP BY step ORDER BY step
        """,
        [run_id],
    ).df()


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


def _thread_cpu_s(native_id: int) -> float:
    """CPU time (s) a thread of this process has used, from /proc/self/task/<tid>/schedstat (Linux)."""
    return int(Path(f"/proc/self/task/{native_id}/schedstat").read_text().split()[0]) / 1e9


def small_steps(n_steps: int, rows_per_step: int, out: Path) -> None:
    """Writer-thread cost per small step: N steps of ~rows_per_step token rows, as fast as the queue takes them."""
    per_completion = 25
    pool = list(
        step_batches(
            steps=16,
            completions_per_step=max(1, rows_per_step // per_completion),
            group_size=2,
            min_len=per_completion,
            max_len=per_completion,
        )
    )
    w = RunWriter(out, "small", meta={"model": "synthetic"})
    tid = w._thread.native_id
    assert tid is not None
    cpu0, t0 = _thread_cpu_s(tid), time.perf_counter()
    for step in range(n_steps):
        src = pool[step % len(pool)]
        for table in ("completions", "tokens", "forks", "steps"):
            w.put(table, dict(src[table], step=[step] if table == "steps" else step))
        if step % 500 == 499:  # bound the queue without waiting on every step (the plugin never waits)
            while w._q.qsize() > 40:  # ten steps of puts still queued
                time.sleep(0.001)
    w.flush()  # writes everything buffered, as close() would, while the thread (and its CPU counter) still lives
    cpu, wall = _thread_cpu_s(tid), time.perf_counter() - t0
    w.close()
    assert sum(w.dropped.values()) == 0, w.dropped
    files = {t: len(list((out / "small" / t).rglob("*.parquet"))) for t in ("tokens", "forks", "steps", "completions")}
    rows = connect(out).execute("SELECT count(*) FROM tokens").fetchone()[0]
    print(f"{n_steps} steps, {rows:,} token rows ({rows / n_steps:.0f} a step), parts: {files}")
    print(f"wall from first put to close(): {wall:.2f} s = {wall / n_steps * 1000:.3f} ms per step")
    print(f"writer thread CPU: {cpu - cpu0:.2f} s = {(cpu - cpu0) / n_steps * 1000:.3f} ms per step")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000, help="token rows to write (the issue's figure: 20M)")
    p.add_argument("--completions-per-step", type=int, default=64)
    p.add_argument("--pool", type=int, default=24, help="distinct synthetic steps generated, then reused")
    p.add_argument("--out", default=None, help="log dir, a folder or s3://bucket/prefix (default: a temp dir, "
                                                "removed at the end)")
    p.add_argument("--s3", action="store_true", help="write to a local SeaweedFS S3 server started for the run")
    p.add_argument("--keep", action="store_true", help="keep the log dir")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--small-steps", type=int, default=0, help="measure the writer's cost per small step instead")
    p.add_argument("--rows-per-step", type=int, default=100, help="token rows per step of --small-steps")
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        if args.s3:
            from local_s3 import local_s3

            args.out = f"{stack.enter_context(local_s3('forkwatch-bench'))}/{uuid.uuid4().hex[:8]}"
        run(args)


def run(args: argparse.Namespace) -> None:
    on_s3 = str(args.out or "").startswith("s3://")
    out = args.out if on_s3 else Path(args.out or tempfile.mkdtemp(prefix="forkwatch-bench-"))
    if not on_s3 and out.exists():
        shutil.rmtree(out)
    if args.small_steps:
        small_steps(args.small_steps, args.rows_per_step, out)
        if not args.keep and args.out is None:
            shutil.rmtree(out)
        return

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

    token_files = run_folder.list_run(out, "bench").table_parts("tokens")
    token_bytes = sum(f.size for f in token_files)
    print(f"steps: {step}, token parts: {len(token_files)}")
    print(
        f"writer throughput: {total / write_s / 1e6:.2f} M token rows/s ({total:,} rows in {write_s:.1f} s, one thread)"
    )
    print(f"bytes per token row {'in object storage' if on_s3 else 'on disk'}: {token_bytes / total:.2f} "
          f"({token_bytes / 2**20:.0f} MiB) in {out}")

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
            lambda: token_step_aggregates(con, "bench"), args.repeat
        ),
        "(b) completion_tokens (one completion at one step, with text)": _timed(
            lambda: queries.completion_tokens(con, "bench", mid, cid), args.repeat
        ),
    }
    assert len(queries.completion_tokens(con, "bench", mid, cid)) > 0
    for name, (first, med) in results.items():
        print(f"{name}: first {first * 1000:.0f} ms, median {med * 1000:.0f} ms")
    print(f"python {platform.python_version()}, {platform.machine()}")
    if not args.keep and args.out is None and not on_s3:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
