"""Dashboard benchmark: the named queries (and health rules) each page runs, timed on a 20M-token synthetic run.

    .venv/bin/python benchmarks/dashboard_bench.py [--rows 20000000] [--log-dir DIR] [--repeat 5]
    .venv/bin/python benchmarks/dashboard_bench.py --rows 20000000 --s3    # the run in a local S3 server

`--s3` starts SeaweedFS on 127.0.0.1 (benchmarks/local_s3.py), writes the run there, measures the pages reading it
from object storage, and stops the server; `--log-dir s3://bucket/prefix` measures a run already in any S3 store.

The run (tokens, completions, forks, steps, vocab, values distributed like real ones: tests/synthetic_records.py) is
written once to benchmarks/out/dashboard/ and reused by later invocations; `--log-dir` measures an existing log directory
instead (e.g. one kept by `store_bench.py --out DIR --keep`; pages whose tables it lacks are measured on no rows).
Each page's figure is the sum of its queries on one connection, as the app holds it: the first call ("cold": first
visit after the connection was built) and the median of `--repeat` further calls ("warm"); Streamlit's own result
cache is not used, so every figure is what a visitor waits for when the cache misses. Building the connection is
timed on its own (the app rebuilds it every 15 s). Target: every page <= 1 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from forkwatch.dashboard.page_sql import EXAMPLES
from forkwatch.store import RunWriter, connect, queries, run_folder
from forkwatch.store.sandbox import open_sandboxed

# The synthetic records live with the tests, their other user: a fixture, not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic_records import VOCAB_SIZE, step_batches, vocab_columns  # noqa: E402

DEFAULT_DIR = Path(__file__).parent / "out" / "dashboard"
RUN = "bench"


def write_run(log_dir: Path | str, rows: int, completions_per_step: int = 64, pool: int = 16) -> None:
    """Replay a pool of realistic steps with fresh step numbers and completion ids until `rows` token rows."""
    batches = list(step_batches(steps=pool, completions_per_step=completions_per_step))
    w = RunWriter(log_dir, RUN, meta={"model": "synthetic", "vocab_size": VOCAB_SIZE}, max_queue_rows=10**9)
    w.put("vocab", vocab_columns(VOCAB_SIZE))
    total, step = 0, 0
    while total < rows:
        src = batches[step % pool]
        shift = (step - step % pool) * completions_per_step
        for table in ("tokens", "completions", "forks", "steps"):
            cols = dict(src[table], step=[step] if table == "steps" else step)
            if "completion_id" in cols:
                cols["completion_id"] = cols["completion_id"] + shift
            if table == "completions":
                cols["group_id"] = cols["group_id"] + shift // 8
                cols["prompt"] = [f"prompt {g}" for g in cols["group_id"] % 500]  # prompts recur across steps
            w.put(table, cols)
        total += len(src["tokens"]["entropy"])
        step += 1
        if step % pool == 0:
            w.flush()  # keep the queue (memory) bounded
    w.close()


def _timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    fn()
    cold = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return cold, statistics.median(times)


def pages(log_dir: Path | str) -> dict[str, Callable[[], object]]:
    """Each page's queries, as the page runs them for one run (one step, one completion on Forks)."""
    con = connect(log_dir)
    steps = queries.step_series(con, RUN)
    tsteps = queries.token_steps(con, RUN)["step"].tolist()
    mid = tsteps[len(tsteps) // 2] if tsteps else 0
    comps = queries.completions_at_step(con, RUN, mid)
    cid = int(comps["completion_id"].iloc[0]) if len(comps) else 0
    prompt = str(comps["prompt"].iloc[0]) if len(comps) else ""
    meta = queries.run_overview(con).set_index("run_id").loc[RUN, "meta"]
    sample = list(queries.sample_steps(tsteps))  # the steps the page reads for its fork-text figures

    def runs_page(c):
        overview = queries.run_overview(c)
        queries.run_curves(c)
        for r in overview.itertuples(index=False):
            queries.run_health(c, r.run_id, r.meta)

    def entropy_page(c):
        queries.step_series(c, RUN)
        queries.run_health(c, RUN, meta)

    def forks_page(c):
        queries.token_steps(c, RUN)
        queries.completions_at_step(c, RUN, mid)
        queries.completion_view(c, RUN, mid, cid)
        queries.prompt_history(c, RUN, prompt)
        top = queries.top_fork_tokens(c, RUN, sample, 10)
        queries.fork_tokens_by_step(c, RUN, sample, top["text"].head(6).tolist())

    def forks_prompt_search(c):
        queries.find_prompts(c, RUN, "prompt 12")

    def law_page(c):
        queries.step_series(c, RUN)
        queries.law_fit(c, RUN, meta, 1.0)

    sandbox = open_sandboxed(log_dir)

    def sql_example():
        sandbox.query("SELECT run_id, step, entropy_mean, entropy_p90, reward_mean FROM steps ORDER BY run_id, step")

    def sql_heavy_example():  # the heaviest example: it scans the token rows of 50 steps
        sandbox.query(EXAMPLES["Fork tokens, first 50 steps"])

    def on(fn):  # the app's cached connection, one cursor per call (what dashboard/cache.py does)
        return lambda: fn(con.cursor())

    print(f"run: {len(steps)} steps, token steps {len(tsteps)}, forks page at step {mid}, completion {cid}")
    return {
        "connect (views over the parts; the app rebuilds it every 15 s)": lambda: connect(log_dir),
        "Runs (run_overview + run_curves + run_health per run)": on(runs_page),
        "Entropy (step_series + run_health, one run)": on(entropy_page),
        "Forks (steps, completions, tokens with forks, prompt, top forks + trend)": on(forks_page),
        "Forks: prompt search": on(forks_prompt_search),
        "Law (step_series + law_fit)": on(law_page),
        "SQL: open_sandboxed": lambda: open_sandboxed(log_dir).close(),
        "SQL: example 'Entropy per step'": sql_example,
        "SQL: example 'Fork tokens, first 50 steps'": sql_heavy_example,
    }


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name"))
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        mem_kb = next(int(ln.split()[1]) for ln in meminfo if ln.startswith("MemTotal"))
        mem = f"{mem_kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        mem = "RAM unknown"
    return f"{os.cpu_count()} CPU ({cpu}), {mem}, python {platform.python_version()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000_000, help="token rows of the synthetic run")
    p.add_argument("--log-dir", default=None, help="measure this log dir (run 'bench') instead: a folder or "
                                                   "s3://bucket/prefix")
    p.add_argument("--s3", action="store_true", help="write the run to a local SeaweedFS S3 server and read it there")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    if args.s3:
        from local_s3 import local_s3

        with local_s3("forkwatch-bench") as url:
            measure(f"{url}/dashboard", args)
    else:
        measure(args.log_dir or DEFAULT_DIR, args)


def measure(log_dir: Path | str, args: argparse.Namespace) -> None:
    if RUN not in run_folder.run_dirs(log_dir):
        t0 = time.perf_counter()
        write_run(log_dir, args.rows)
        print(f"wrote {args.rows:,} token rows to {log_dir} in {time.perf_counter() - t0:.0f} s")
    n = connect(log_dir).execute("SELECT count(*) FROM tokens WHERE run_id = ?", [RUN]).fetchone()[0]
    print(f"log dir {log_dir}: {n:,} token rows in run {RUN!r}")
    print(machine())
    for name, fn in pages(log_dir).items():
        cold, warm = _timed(fn, args.repeat)
        flag = "" if cold <= 1.0 else "   <-- over 1 s"
        print(f"{name}: cold {cold * 1000:.0f} ms, warm {warm * 1000:.0f} ms{flag}")


if __name__ == "__main__":
    main()
