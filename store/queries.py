"""The named queries the CLI and the dashboard run, in one place (pages never build SQL from widget values).

Each takes a connection from `connect` (or a sandboxed one's `.con`) and its inputs as arguments, binds them as
parameters (never formats user input into SQL) and returns a pandas DataFrame (the few that judge or fit a run's
steps return the store's report of it). Every value comes in as a parameter. Each reads the small tables whole, or
one run's one step (or one completion) of the large ones, so a page stays well under a second on a 20M-token run
(benchmarks/dashboard_bench.py). Connections are not thread-safe: callers that share one across threads should pass
`con.cursor()`. `__all__` is the list of named queries (the dashboard reaches them by name, dashboard/cache.py).
"""

from __future__ import annotations

import duckdb
import pandas as pd

from .check import judge_run
from .health import HealthReport, LawFit, fit_entropy_law
from .run_meta import lens_notes, rules_of_run

__all__ = [
    "completion_tokens", "completion_view", "completions_at_step", "effective_rank_series", "entropy_spectrum",
    "find_prompts", "fork_alternatives", "fork_roles_by_step", "fork_tokens_by_step", "law_fit", "lens_schedule",
    "probe_list",
    "probe_tokens", "probe_top_overlap", "prompt_history", "run_curves", "run_health", "run_overview",
    "step_series", "token_steps", "top_fork_tokens",
]  # fmt: skip

# "The last row written wins" for a step logged twice (a resumed run re-logs the steps after its checkpoint): the one
# rule every query over `steps` applies (health.last_row_per_step is the same rule over a series in memory).
LAST_ROW_PER_STEP = "QUALIFY row_number() OVER (PARTITION BY run_id, step ORDER BY time DESC) = 1"


def _defined(column: str) -> str:
    """A stored value as SQL NULL where it is NaN (parts written before forkwatch stored "undefined" as NULL): an
    aggregate then skips it instead of turning NaN (DuckDB orders NaN above every number, and avg() of one NaN is
    NaN). `column` is always a name written here, never user input."""
    return f"CASE WHEN isnan({column}) THEN NULL ELSE {column} END"


# --------------------------------------------------------------------------- runs and steps


def run_overview(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """THE list of runs (`forkwatch runs`, `forkwatch check`, the dashboard), one row per run by run id: identity,
    status, model, times, dropped records and faults (all ranks, and where), run.json (`meta`), and what its tables
    hold: n_steps (distinct steps), first_step, last_step (the last step in `steps`, or run.json's when later),
    trained_tokens (every response token trained on: the sum of steps.n_tokens), recorded_tokens (the token rows
    kept: the sample `record_tokens` records) and the selection method.

    The file level below it is store/run_folder.py's `list_run_folders` (which folders are runs, with their files),
    and store/run_meta.py's `runs_row` (a folder's row of the `runs` view)."""
    return con.execute(
        """
        WITH s AS (
            SELECT CAST(run_id AS VARCHAR) AS run_id, count(DISTINCT step) AS n_steps, min(step) AS first_step,
                   max(step) AS max_step, CAST(sum(n_tokens) AS BIGINT) AS trained_tokens,
                   CAST(arg_max(select_method, step) AS VARCHAR) AS select_method
            FROM steps GROUP BY ALL
        )
        SELECT r.run_id, r.name, r.status, r.model, r.created_at, r.updated_at, r.dropped, r.faults,
               r.faults_detail, r.meta,
               coalesce(s.n_steps, 0) AS n_steps, s.first_step,
               CAST(greatest(s.max_step, r.last_step) AS INTEGER) AS last_step,
               coalesce(s.trained_tokens, 0) AS trained_tokens, r.recorded_tokens, s.select_method
        FROM runs r LEFT JOIN s USING (run_id)
        ORDER BY r.run_id
        """
    ).df()


def run_curves(con: duckdb.DuckDBPyConnection, points: int = 120) -> pd.DataFrame:
    """Each run's entropy and reward curves for a picture per run: run_id, step, entropy_mean, reward_mean, at most
    about `points` evenly spaced steps per run (always its first and last)."""
    return con.execute(
        f"""
        WITH s AS (
            SELECT run_id, step, entropy_mean, reward_mean FROM steps
            {LAST_ROW_PER_STEP}
        ),
        n AS (
            SELECT *, row_number() OVER (PARTITION BY run_id ORDER BY step) - 1 AS i,
                   count(*) OVER (PARTITION BY run_id) AS total
            FROM s
        )
        SELECT run_id, step, entropy_mean, reward_mean FROM n
        WHERE i % greatest(1, ceil(total / $points)::BIGINT) = 0 OR i = total - 1
        ORDER BY run_id, step
        """,
        {"points": points},
    ).df()


def step_series(con: duckdb.DuckDBPyConnection, run_id: str) -> pd.DataFrame:
    """Every column of the steps table for one run, one row per step (LAST_ROW_PER_STEP). A diagnostic undefined at
    a step (NULL in the part) is NaN here, pandas' missing value; pages draw it as a gap with its reason."""
    return con.execute(
        f"SELECT * FROM steps WHERE run_id = ? {LAST_ROW_PER_STEP} ORDER BY step",
        [run_id],
    ).df()


def run_health(con: duckdb.DuckDBPyConnection, run_id: str, meta: str | None) -> HealthReport:
    """The run's verdict as `forkwatch check` gives it: its steps judged with the rules it was trained under (`meta`,
    its run.json), the defaults when it has none (the report's first note says which)."""
    return judge_run(step_series(con, run_id), meta)[0]


def law_fit(con: duckdb.DuckDBPyConnection, run_id: str, meta: str | None, fraction: float = 1.0) -> LawFit:
    """The entropy-reward law fitted on the first `fraction` of the run's steps, with the run's own validity
    thresholds (run.json's health rules, else the defaults)."""
    s = step_series(con, run_id)
    r = rules_of_run(meta).rules
    return fit_entropy_law(
        s["entropy_mean"], s["reward_mean"], min_points=r.law_min_points, min_r2=r.law_min_r2, fraction=fraction
    )


# --------------------------------------------------------------------------- completions and forks


def completions_at_step(con: duckdb.DuckDBPyConnection, run_id: str, step: int) -> pd.DataFrame:
    """The completions recorded at one step of one run, by group then completion id."""
    return con.execute(
        "SELECT * FROM completions WHERE run_id = ? AND step = ? ORDER BY group_id, completion_id",
        [run_id, step],
    ).df()


def completion_tokens(con: duckdb.DuckDBPyConnection, run_id: str, step: int, completion_id: int) -> pd.DataFrame:
    """Every token of one completion at one step, with its text, in position order."""
    return con.execute(
        "SELECT * FROM token_text WHERE run_id = ? AND step = ? AND completion_id = ? ORDER BY position",
        [run_id, step, completion_id],
    ).df()


def completion_view(con: duckdb.DuckDBPyConnection, run_id: str, step: int, completion_id: int) -> pd.DataFrame:
    """`completion_tokens` with, at forks, the top-k alternatives (sampled_rank, alt_texts, alt_probs; missing
    elsewhere): what the Forks page's token view shows."""
    tokens = completion_tokens(con, run_id, step, completion_id)
    forks = fork_alternatives(con, run_id, step, completion_id)
    return tokens.merge(forks[["position", "sampled_rank", "alt_texts", "alt_probs"]], on="position", how="left")


def token_steps(con: duckdb.DuckDBPyConnection, run_id: str) -> pd.DataFrame:
    """The steps of a run that have completion records (the Forks page's step choices)."""
    return con.execute(
        "SELECT step, count(*) AS n_completions FROM completions WHERE run_id = $run GROUP BY step ORDER BY step",
        {"run": run_id},
    ).df()


def fork_alternatives(con: duckdb.DuckDBPyConnection, run_id: str, step: int, completion_id: int) -> pd.DataFrame:
    """The fork positions of one completion with their top-k alternatives (ids, probabilities, decoded texts).

    The step's forks are filtered before the alternatives are unnested, so only that step's row groups are read
    (30-50 ms on a 20M-token run; unnesting first, through a lateral join, read every step: 0.7 s)."""
    return con.execute(
        """
        WITH f AS (
            SELECT position, sampled_rank, alt_token_ids, alt_probs
            FROM forks WHERE run_id = $run AND step = $step AND completion_id = $cid
        ),
        a AS (SELECT position, unnest(alt_token_ids) AS alt_id, generate_subscripts(alt_token_ids, 1) AS k FROM f),
        v AS (SELECT token_id, text FROM vocab WHERE run_id = $run AND token_id IN (SELECT alt_id FROM a)),
        texts AS (
            SELECT a.position, list(coalesce(v.text, '#' || a.alt_id) ORDER BY a.k) AS alt_texts
            FROM a LEFT JOIN v ON v.token_id = a.alt_id GROUP BY a.position
        )
        SELECT f.position, f.sampled_rank, f.alt_token_ids, f.alt_probs, texts.alt_texts
        FROM f LEFT JOIN texts USING (position) ORDER BY f.position
        """,
        {"run": run_id, "step": step, "cid": completion_id},
    ).df()


FORK_SAMPLE_STEPS = 40  # steps read at most for the fork-text figures: bounds their cost however long the run


def sample_steps(steps: list[int], k: int = FORK_SAMPLE_STEPS) -> tuple[int, ...]:
    """At most k of the given steps, evenly spaced, always the first and the last: the steps the Forks page passes to
    `top_fork_tokens` and `fork_tokens_by_step` on a long run (the dashboard benchmark reads the same ones)."""
    if len(steps) <= k:
        return tuple(steps)
    return tuple(steps[i] for i in sorted({round(i * (len(steps) - 1) / (k - 1)) for i in range(k)}))


def top_fork_tokens(con: duckdb.DuckDBPyConnection, run_id: str, steps: list[int], limit: int = 20) -> pd.DataFrame:
    """The token texts that are forks most often at the given steps of a run: count and share of those forks.

    The caller passes a sample of steps (row groups of other steps are skipped by their statistics), bounding the cost on a
    long run; pass every recorded step for the exact whole-run figure."""
    return con.execute(
        """
        WITH c AS (
            SELECT token_id, count(*) AS n_forks FROM tokens
            WHERE run_id = $run AND list_contains($steps, step) AND is_fork GROUP BY token_id
        ),
        v AS (SELECT token_id, text FROM vocab WHERE run_id = $run AND token_id IN (SELECT token_id FROM c)),
        by_text AS (
            SELECT coalesce(v.text, '#' || c.token_id) AS text, sum(c.n_forks) AS n_forks
            FROM c LEFT JOIN v USING (token_id) GROUP BY ALL
        )
        SELECT text, CAST(n_forks AS BIGINT) AS n_forks, n_forks / sum(n_forks) OVER () AS share
        FROM by_text ORDER BY n_forks DESC, text LIMIT $limit
        """,
        {"run": run_id, "steps": list(steps), "limit": limit},
    ).df()


def fork_tokens_by_step(
    con: duckdb.DuckDBPyConnection, run_id: str, steps: list[int], texts: list[str]
) -> pd.DataFrame:
    """For each of the given steps, the share of that step's forks that each of the given token texts takes."""
    return con.execute(
        """
        WITH c AS (
            SELECT step, token_id, count(*) AS n FROM tokens
            WHERE run_id = $run AND list_contains($steps, step) AND is_fork GROUP BY ALL
        ),
        total AS (SELECT step, sum(n) AS n_step FROM c GROUP BY step),
        v AS (SELECT token_id, text FROM vocab WHERE run_id = $run AND list_contains($texts, text))
        SELECT c.step, coalesce(v.text, '#' || c.token_id) AS text, CAST(sum(c.n) AS BIGINT) AS n_forks,
               sum(c.n) / any_value(total.n_step) AS share
        FROM c JOIN total USING (step) LEFT JOIN v USING (token_id)
        WHERE list_contains($texts, coalesce(v.text, '#' || c.token_id))
        GROUP BY ALL ORDER BY c.step, n_forks DESC
        """,
        {"run": run_id, "steps": list(steps), "texts": list(texts)},
    ).df()


def find_prompts(con: duckdb.DuckDBPyConnection, run_id: str, text: str, limit: int = 50) -> pd.DataFrame:
    """Distinct prompts of a run containing `text` (case-insensitive), with the steps they appear in."""
    return con.execute(
        """
        SELECT prompt, count(DISTINCT step) AS n_steps, min(step) AS first_step, max(step) AS last_step
        FROM completions WHERE run_id = $run AND contains(lower(prompt), lower($text))
        GROUP BY prompt ORDER BY n_steps DESC, prompt LIMIT $limit
        """,
        {"run": run_id, "text": text, "limit": limit},
    ).df()


def prompt_history(con: duckdb.DuckDBPyConnection, run_id: str, prompt: str) -> pd.DataFrame:
    """One prompt followed across steps: its completions' reward, entropy and length per step."""
    return con.execute(
        f"""
        SELECT step, count(*) AS n_completions, avg({_defined("reward")}) AS reward_mean,
               avg({_defined("entropy_mean")}) AS entropy_mean,
               avg(length) AS length_mean, avg(CAST(truncated AS DOUBLE)) AS truncated_fraction,
               min(completion_id) AS first_completion_id
        FROM completions WHERE run_id = $run AND prompt = $prompt GROUP BY step ORDER BY step
        """,
        {"run": run_id, "prompt": prompt},
    ).df()


# --------------------------------------------------------------------------- collapse lenses
# The entropy spectrum (steps.entropy_spectrum, bins of store/spectrum.py), the hidden states' effective rank
# (steps.effective_rank_mean), the roles of forking tokens (vocab.role, store/roles.py) and the probes (the same
# tokens scored teacher-forced across training, table `probes`).


def entropy_spectrum(con: duckdb.DuckDBPyConnection, run_id: str) -> pd.DataFrame:
    """One row per (step, bin): bin (0-based, store/spectrum.py), count, share of the step's tokens."""
    return con.execute(
        f"""
        WITH s AS (
            SELECT step, entropy_spectrum AS h FROM steps WHERE run_id = ? AND entropy_spectrum IS NOT NULL
            {LAST_ROW_PER_STEP}
        ),
        b AS (SELECT step, generate_subscripts(h, 1) - 1 AS bin, unnest(h) AS count FROM s)
        SELECT step, CAST(bin AS INTEGER) AS bin, CAST(count AS BIGINT) AS count,
               count / nullif(sum(count) OVER (PARTITION BY step), 0) AS share
        FROM b ORDER BY step, bin
        """,
        [run_id],
    ).df()


def effective_rank_series(con: duckdb.DuckDBPyConnection, run_id: str) -> pd.DataFrame:
    """The steps whose hidden-state effective rank was measured: step, effective_rank_mean, entropy_mean."""
    return con.execute(
        f"""
        SELECT step, effective_rank_mean, entropy_mean FROM steps
        WHERE run_id = ? AND effective_rank_mean IS NOT NULL
        {LAST_ROW_PER_STEP}
        ORDER BY step
        """,
        [run_id],
    ).df()


def lens_schedule(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, str]:
    """{lens: one sentence} for the run's periodic lenses (`probes`, `effective_rank`): the steps each ran and was
    skipped at under the lens budget, its cost and the lenses' share of training time (run.json `lenses`, read by
    store/run_meta.py `lens_notes`). {} for a run that does not record it."""
    row = con.execute("SELECT meta FROM runs WHERE run_id = ?", [run_id]).fetchone()
    return lens_notes(row[0]) if row else {}


def fork_roles_by_step(con: duckdb.DuckDBPyConnection, run_id: str) -> pd.DataFrame:
    """Share of each step's forks by functional role (store/roles.py): step, role, n_forks, share.

    The role comes from the vocab table's `role` column; a run written before that column existed has it NULL, and
    its roles are computed here from the token text by the same rules."""
    from .roles import role_of

    counts = con.execute(
        """
        WITH c AS (SELECT step, token_id, count(*) AS n FROM tokens WHERE run_id = $run AND is_fork GROUP BY ALL),
        v AS (
            SELECT token_id, any_value(text) AS text, any_value(role) AS role FROM vocab
            WHERE run_id = $run AND token_id IN (SELECT token_id FROM c) GROUP BY token_id
        )
        SELECT c.step, c.token_id, c.n, v.text, v.role FROM c LEFT JOIN v USING (token_id)
        """,
        {"run": run_id},
    ).df()
    if counts.empty:
        return pd.DataFrame({"step": pd.Series(dtype="int64"), "role": pd.Series(dtype="object"),
                             "n_forks": pd.Series(dtype="int64"), "share": pd.Series(dtype="float64")})
    missing = counts["role"].isna()
    counts.loc[missing, "role"] = [role_of(t) for t in counts.loc[missing, "text"]]
    out = counts.groupby(["step", "role"], as_index=False)["n"].sum().rename(columns={"n": "n_forks"})
    out["n_forks"] = out["n_forks"].astype("int64")
    out["share"] = out["n_forks"] / out.groupby("step")["n_forks"].transform("sum")
    return out.sort_values(["step", "role"], ignore_index=True)


def probe_list(con: duckdb.DuckDBPyConnection, run_id: str) -> pd.DataFrame:
    """The probes of a run: probe_id, n_tokens (per scoring), n_steps scored, first_step, last_step."""
    return con.execute(
        """
        SELECT probe_id, CAST(max(position) + 1 AS INTEGER) AS n_tokens, count(DISTINCT step) AS n_steps,
               min(step) AS first_step, max(step) AS last_step
        FROM probes WHERE run_id = ? GROUP BY probe_id ORDER BY probe_id
        """,
        [run_id],
    ).df()


def probe_tokens(con: duckdb.DuckDBPyConnection, run_id: str, probe_id: int) -> pd.DataFrame:
    """One probe's tokens at every step it was scored: step, position, token_id, text, entropy, renyi2, logprob,
    top_ids, top_probs."""
    return con.execute(
        """
        WITH p AS (SELECT * FROM probes WHERE run_id = $run AND probe_id = $probe),
        v AS (
            SELECT token_id, any_value(text) AS text FROM vocab
            WHERE run_id = $run AND token_id IN (SELECT token_id FROM p) GROUP BY token_id
        )
        SELECT p.step, p.position, p.token_id, coalesce(v.text, '#' || p.token_id) AS text, p.entropy, p.renyi2,
               p.logprob, p.top_ids, p.top_probs
        FROM p LEFT JOIN v USING (token_id) ORDER BY p.step, p.position
        """,
        {"run": run_id, "probe": probe_id},
    ).df()


def probe_top_overlap(con: duckdb.DuckDBPyConnection, run_id: str, fraction: float = 0.2) -> pd.DataFrame:
    """How many of each step's top-`fraction` entropy positions of the probes were top positions at the probes' first
    scoring (arXiv:2506.01939 reports 86 % before vs after RLVR): step, overlap (shared / top positions, over all
    probes), n_top, n_probes. A probe's top set has max(1, ceil(round(fraction × its tokens, 9)))
    positions, ties broken by position: the plugin's keep count (the rounding keeps 0.07 × 100 =
    7.000000000000001 at 7)."""
    return con.execute(
        """
        WITH r AS (
            SELECT probe_id, step, position,
                   row_number() OVER (PARTITION BY probe_id, step ORDER BY entropy DESC, position) AS rk,
                   count(*) OVER (PARTITION BY probe_id, step) AS n
            FROM probes WHERE run_id = $run
        ),
        top AS (SELECT probe_id, step, position FROM r WHERE rk <= greatest(1, ceil(round($fraction * n, 9)))),
        first AS (SELECT probe_id, min(step) AS step FROM top GROUP BY probe_id),
        ref AS (SELECT probe_id, position FROM top JOIN first USING (probe_id, step))
        SELECT t.step, count(ref.position) / count(*) AS overlap, count(*) AS n_top,
               count(DISTINCT t.probe_id) AS n_probes
        FROM top t LEFT JOIN ref ON ref.probe_id = t.probe_id AND ref.position = t.position
        GROUP BY t.step ORDER BY t.step
        """,
        {"run": run_id, "fraction": fraction},
    ).df()
