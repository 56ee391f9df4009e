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

# `runs` is not written as Parquet: it is read from each LOG_DIR/<run_id>/run.json (written by rank 0) and the
# per-rank rank-NNN.json files. These are the columns the `runs` view exposes; the full run.json is in `meta`.
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
}
