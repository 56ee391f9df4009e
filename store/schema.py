"""Versioned Arrow schemas of forkwatch's tables: the contract between the plugin (writer) and every reader.

Types are chosen for size: int32 ids, float32 statistics, dictionary-encoded strings; `run_id` and `step` are on
every row (run-length encoding makes them nearly free). Bump SCHEMA_VERSION when a field changes meaning or type,
and add the old version to READABLE_VERSIONS only if readers still handle it. Adding a nullable column is not a
version change: the views read it as NULL in parts written before it existed.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
READABLE_VERSIONS = (1,)

# Every Parquet part carries its schema version in the file's key-value metadata under this key, so a reader can
# refuse (or adapt to) a part written by another forkwatch before it misreads a column.
VERSION_KEY = b"forkwatch.schema_version"


class SchemaVersionError(ValueError):
    """A part or run.json was written by a schema version this forkwatch cannot read."""


def check_version(found: int | str | None, where: str) -> int:
    """Return `found` as an int when readable, else raise SchemaVersionError naming it and the readable versions."""
    try:
        version = int(found)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SchemaVersionError(
            f"{where}: no valid forkwatch schema version (found {found!r}); this forkwatch reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        ) from None
    if version not in READABLE_VERSIONS:
        raise SchemaVersionError(
            f"{where}: written by forkwatch schema version {version}; this forkwatch reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade forkwatch to read newer runs)"
        )
    return version

# The percentiles of a step's token statistics the `steps` table holds, as fractions: column <stat>_p<100·q>.
STEP_PERCENTILES = (0.10, 0.50, 0.90, 0.99)


def percentile_name(q: float) -> str:
    """The column suffix of percentile `q` (0.9 -> "p90")."""
    return f"p{round(q * 100)}"


def boolean_columns(schema: pa.Schema) -> frozenset[str]:
    """The names of `schema`'s boolean columns (so that a writer outside the store need not know Arrow types)."""
    return frozenset(f.name for f in schema if pa.types.is_boolean(f.type))


_RUN_ID = pa.field("run_id", pa.dictionary(pa.int32(), pa.string()), nullable=False)
_STEP = pa.field("step", pa.int32(), nullable=False)
_F32 = pa.float32()

STEPS = pa.schema(
    [
        _RUN_ID,
        _STEP,
        pa.field("time", pa.timestamp("ms", tz="UTC")),
        # Token statistics over ALL completion tokens of the step (every rank), not only the recorded sample.
        pa.field("n_tokens", pa.int64()),
        pa.field("n_completions", pa.int32()),
        *[
            pa.field(f"{stat}_{agg}", _F32)
            for stat in ("entropy", "renyi2", "group_js")
            for agg in ("mean", *map(percentile_name, STEP_PERCENTILES))
        ],
        pa.field("fork_fraction", _F32),
        pa.field("selected_fraction", _F32),  # response tokens with non-zero gradient weight (1.0 without selection)
        pa.field("select_method", pa.dictionary(pa.int32(), pa.string())),
        pa.field("select_threshold", _F32),  # the cut-off the selector used, when it has one
        pa.field("select_warmup", pa.bool_()),  # ICT: dense warm-up still on
        # The selector's diagnostics of the same names (docs/methods.md defines them): each `select_<m>` is the
        # mean of metric m over the step's micro-batches and ranks; null when no selector reports it.
        pa.field("select_grad_share", _F32),
        pa.field("select_kept_p_mean", _F32),
        pa.field("select_kept_entropy_mean", _F32),
        pa.field("select_entropy_overlap", _F32),
        pa.field("reward_mean", _F32),
        pa.field("reward_std", _F32),
        pa.field("completion_length_mean", _F32),
        pa.field("truncated_fraction", _F32),
        pa.field("forkwatch_seconds", _F32),  # wall time forkwatch itself spent in this step
        pa.field("dropped_records", pa.int64()),  # cumulative records dropped so far (queue full, disk errors)
        # Added (additive, still version 1): the collapse lenses (docs/collapse-lenses.md).
        # Counts of the step's response-token entropies per bin of store/spectrum.py (EDGES), every rank's tokens.
        pa.field("entropy_spectrum", pa.list_(pa.int32())),
        # Mean effective rank of recorded completions' final-layer hidden states; null on steps not measured.
        pa.field("effective_rank_mean", _F32),
        # Added (additive, still version 1): what the trainer itself logs at a logging step (TRL's `loss`,
        # `grad_norm`, `kl`, `clip_ratio/{low,high,region}_mean`; an imported run's mapped names), null on the steps
        # it did not log; `non_finite`: the loss or the gradient norm logged there was NaN or ±inf (a stored NaN and
        # a NULL read back alike, so the fact is kept apart). The health rules read them (store/health.py).
        *[pa.field(name, _F32) for name in ("loss", "grad_norm", "kl", "clip_ratio_low", "clip_ratio_high",
                                            "clip_ratio_region")],
        pa.field("non_finite", pa.bool_()),
    ]
)

COMPLETIONS = pa.schema(
    [
        _RUN_ID,
        _STEP,
        pa.field("rank", pa.int16()),
        pa.field("completion_id", pa.int64(), nullable=False),  # unique within a run; joins tokens and forks
        pa.field("group_id", pa.int64()),  # the prompt group (G rollouts of one prompt share it)
        pa.field("prompt", pa.string()),
        pa.field("completion", pa.string()),
        pa.field("rewards", pa.map_(pa.string(), _F32)),  # each reward function's value, by function name
        pa.field("reward", _F32),  # the weighted total
        pa.field("advantage", _F32),
        pa.field("length", pa.int32()),
        pa.field("truncated", pa.bool_()),
        pa.field("entropy_mean", _F32),
    ]
)

TOKENS = pa.schema(
    [
        _RUN_ID,
        _STEP,
        pa.field("completion_id", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),  # 0-based index in the completion
        pa.field("token_id", pa.int32(), nullable=False),
        pa.field("logprob", _F32),
        pa.field("entropy", _F32),
        pa.field("renyi2", _F32),
        pa.field("group_js", _F32),  # null when not computed
        pa.field("covariance", _F32),
        pa.field("selected", _F32),  # gradient weight the token had; 1.0 when nothing selects
        pa.field("is_fork", pa.bool_()),
    ]
)

FORKS = pa.schema(
    [
        _RUN_ID,
        _STEP,
        pa.field("completion_id", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("sampled_rank", pa.int16()),  # rank of the sampled token among the alternatives (0 = most likely)
        pa.field("alt_token_ids", pa.list_(pa.int32())),  # top-k alternatives, most likely first
        pa.field("alt_probs", pa.list_(_F32)),
    ]
)

VOCAB = pa.schema(
    [
        _RUN_ID,
        # Added (additive, still version 1): the step at which the entries were recorded, so every row carries a
        # step like the other tables. Vocab parts are never superseded on resume (earlier tokens need the text).
        pa.field("step", pa.int32()),
        pa.field("token_id", pa.int32(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("role", pa.dictionary(pa.int8(), pa.string())),  # added, still version 1: store/roles.py ROLES
    ]
)

# The same (prompt, completion) tokens scored teacher-forced every `probe_every` steps (plugin/lenses.py); the
# probes' texts are in run.json under `probes`.
PROBES = pa.schema(
    [
        _RUN_ID,
        _STEP,
        pa.field("probe_id", pa.int32(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),  # 0-based index in the probe's completion
        pa.field("token_id", pa.int32(), nullable=False),
        pa.field("logprob", _F32),
        pa.field("entropy", _F32),
        pa.field("renyi2", _F32),
        pa.field("top_ids", pa.list_(pa.int32())),  # the top-k next tokens, most likely first
        pa.field("top_probs", pa.list_(_F32)),
    ]
)

# Fork value (docs/methods.md, "Fork value"): one row per branch of a measured position, the position's own estimates
# repeated on each of its rows. Written by `forkwatch forkvalue` (plugin/fork_value_offline.py) and, in a later
# phase, during training; `measurement` names one call, so that a position measured twice keeps both.
FORK_VALUES = pa.schema(
    [
        _RUN_ID,
        _STEP,
        pa.field("completion_id", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("token_id", pa.int32()),  # the token sampled at the position
        pa.field("branch", pa.dictionary(pa.int8(), pa.string())),  # sampled | alternative | other
        pa.field("branch_token_id", pa.int32()),  # null for "other" (each rollout drew its own token from the rest)
        pa.field("pi", _F32),  # π(a|s) at the run's sampling settings; for "other", the remaining mass
        pa.field("q", _F32),  # mean reward of the branch's rollouts
        pa.field("n", pa.int16()),  # rollouts
        pa.field("se", _F32),
        pa.field("q_lo", _F32),  # 95 % interval of Q
        pa.field("q_hi", _F32),
        # the position's estimates (the same on each of its rows)
        pa.field("v", _F32),
        pa.field("v_se", _F32),
        pa.field("v_lo", _F32),  # 95 % interval of V
        pa.field("v_hi", _F32),
        pa.field("value", _F32),  # fork value, cross-fitted
        pa.field("value_se", _F32),
        pa.field("p_value", _F32),  # permutation test of "no branch changes the reward"
        pa.field("consequential", pa.bool_()),  # value above min_value at one-sided 95 %
        pa.field("spread", _F32),  # max Q − min Q
        pa.field("sampled_advantage", _F32),  # Q(sampled) − V
        pa.field("mass", _F32),  # Σ π over the measured branches
        pa.field("stratum", pa.dictionary(pa.int16(), pa.string())),
        pa.field("inclusion_prob", _F32),  # the position's chance of being in the sample (Horvitz-Thompson weight 1/p)
        pa.field("source", pa.dictionary(pa.int16(), pa.string())),  # the policy measured: "training" or a checkpoint
        pa.field("measurement", pa.dictionary(pa.int16(), pa.string())),  # "<UTC time>-<id>": one measuring call
    ]
)

# `runs` is not written as Parquet: it is read from each LOG_DIR/<run_id>/run.json (written by rank 0) and the
# per-rank rank-NNN.json files (store/run_meta.py). These are the columns the `runs` view exposes; the full run.json
# is in `meta`.
RUNS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("name", pa.string()),
        pa.field("status", pa.string()),  # running | finished | failed | stopped
        pa.field("created_at", pa.timestamp("ms", tz="UTC")),
        pa.field("updated_at", pa.timestamp("ms", tz="UTC")),
        pa.field("schema_version", pa.int32()),
        pa.field("forkwatch_version", pa.string()),
        pa.field("trl_version", pa.string()),
        pa.field("model", pa.string()),
        pa.field("world_size", pa.int32()),
        pa.field("last_step", pa.int32()),
        pa.field("resumed_from_step", pa.int32()),
        # token rows of the run's readable parts (from their footers): the sample `record_tokens` keeps, not every
        # token trained on (that is the sum of steps.n_tokens)
        pa.field("recorded_tokens", pa.int64()),
        pa.field("dropped", pa.int64()),  # records dropped by all ranks' writers (queue full, disk errors)
        pa.field("faults", pa.int64()),  # exceptions caught in forkwatch's hooks and jobs, all ranks
        pa.field("faults_detail", pa.string()),  # where they happened: "rank 0: step_end 2; rank 1: ..." ('' if none)
        pa.field("meta", pa.string()),  # the whole run.json as JSON text
    ]
)

# Float columns whose mantissa the writer may round (see writer.RunWriter's `stat_mantissa_bits`).
ROUNDED_STATS: dict[str, tuple[str, ...]] = {
    "tokens": ("logprob", "entropy", "renyi2", "group_js", "covariance"),
}

TABLES: dict[str, pa.Schema] = {
    "steps": STEPS,
    "completions": COMPLETIONS,
    "tokens": TOKENS,
    "forks": FORKS,
    "vocab": VOCAB,
    "probes": PROBES,
    "fork_values": FORK_VALUES,
}


def duckdb_type(t: pa.DataType) -> str:
    """The DuckDB type a column of Arrow type `t` reads as (for empty views and the columns a part lacks)."""
    if pa.types.is_dictionary(t):
        return duckdb_type(t.value_type)
    if pa.types.is_map(t):
        return f"MAP({duckdb_type(t.key_type)}, {duckdb_type(t.item_type)})"
    if pa.types.is_list(t):
        return f"{duckdb_type(t.value_type)}[]"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    simple = {
        pa.bool_(): "BOOLEAN",
        pa.int8(): "TINYINT",
        pa.int16(): "SMALLINT",
        pa.int32(): "INTEGER",
        pa.int64(): "BIGINT",
        pa.float32(): "FLOAT",
        pa.float64(): "DOUBLE",
        pa.string(): "VARCHAR",
        pa.large_string(): "VARCHAR",
    }
    if t in simple:
        return simple[t]
    raise TypeError(f"no DuckDB type for Arrow type {t}")
