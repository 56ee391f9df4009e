"""Synthetic GRPO runs for tests and benchmarks: step series with a known fate, and whole runs written through the
store's real `RunWriter` (steps, completions, tokens, forks, vocab), so readers are tested on what the writer makes.

Kinds: "collapse" (entropy decays towards zero while reward follows the entropy–performance law), "healthy" (noisy,
slowly drifting entropy, no alarm), "explosion" (entropy climbs after a healthy start, completions grow and get
truncated, reward falls).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from forkwatch.store.roles import roles_of
from forkwatch.store.spectrum import spectrum_counts

KINDS = ("collapse", "healthy", "explosion")
# The law the collapsing run follows: R = −A·exp(H) + B, ceiling B − A.
LAW_A, LAW_B = 0.5, 1.2
VOCAB = [*"abcdefghijklmnopqrstuvwxyz0123456789", " ", "+", "=", "\n", "<eos>", "the", " answer", " is", "Let"]


def step_series(kind: str, n_steps: int = 60, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-step aggregates shaped like the `steps` table (only the columns the health rules and pages read)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_steps, dtype=np.float64)
    length = 40 + rng.normal(0, 2, n_steps)
    truncated = np.clip(0.02 + rng.normal(0, 0.01, n_steps), 0, 1)
    if kind == "collapse":
        ent = 1.2 * np.exp(-t / 8) + 0.005 + np.abs(rng.normal(0, 0.003, n_steps))
        reward = -LAW_A * np.exp(ent) + LAW_B + rng.normal(0, 0.01, n_steps)
    elif kind == "healthy":
        ent = 1.0 - 0.002 * t + rng.normal(0, 0.1, n_steps)
        reward = 0.3 + 0.003 * t + rng.normal(0, 0.08, n_steps)
    elif kind == "explosion":
        ramp = np.clip((t - n_steps / 3) / (n_steps / 3), 0, None)
        ent = 0.8 + 2.5 * ramp + rng.normal(0, 0.03, n_steps)
        reward = 0.5 - 0.3 * np.clip(ramp, 0, 1) + rng.normal(0, 0.02, n_steps)
        length = length * (1 + 2 * ramp)
        truncated = np.clip(truncated + 0.6 * np.clip(ramp, 0, 1), 0, 1)
    else:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    ent = np.clip(ent, 0.0, None)
    spread = np.stack([0.1, 0.5, 2.5, 4.0])[:, None] * ent  # p10, p50, p90, p99 around the mean
    return {
        "step": np.arange(n_steps, dtype=np.int32),
        "entropy_mean": ent.astype(np.float32),
        "entropy_p10": spread[0].astype(np.float32),
        "entropy_p50": spread[1].astype(np.float32),
        "entropy_p90": spread[2].astype(np.float32),
        "entropy_p99": spread[3].astype(np.float32),
        "reward_mean": reward.astype(np.float32),
        "completion_length_mean": length.astype(np.float32),
        "truncated_fraction": truncated.astype(np.float32),
    }


def _steps_columns(series: dict[str, np.ndarray], n_tokens: int, n_completions: int, method: str) -> dict:
    n = series["step"].size
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    cols: dict = {
        "step": series["step"],
        "time": [start + dt.timedelta(seconds=10 * int(s)) for s in series["step"]],
        "n_tokens": np.full(n, n_tokens, dtype=np.int64),
        "n_completions": np.full(n, n_completions, dtype=np.int32),
    }
    ent = series["entropy_mean"]
    for stat, scale in (("entropy", 1.0), ("renyi2", 0.6), ("group_js", 0.08)):
        cols[f"{stat}_mean"] = (ent * scale).astype(np.float32)
        for agg in ("p10", "p50", "p90", "p99"):
            cols[f"{stat}_{agg}"] = (series[f"entropy_{agg}"] * scale).astype(np.float32)
    cols |= {
        "fork_fraction": np.full(n, 0.1, dtype=np.float32),
        "selected_fraction": np.full(n, 0.1 if method == "ict" else 1.0, dtype=np.float32),
        "select_method": [method] * n,
        "select_threshold": np.full(n, 0.05, dtype=np.float32),
        "select_warmup": series["step"] < 10,
        "reward_mean": series["reward_mean"],
        "reward_std": np.full(n, 0.2, dtype=np.float32),
        "completion_length_mean": series["completion_length_mean"],
        "truncated_fraction": series["truncated_fraction"],
        "forkwatch_seconds": np.full(n, 0.05, dtype=np.float32),
        "dropped_records": np.zeros(n, dtype=np.int64),
    }
    return cols


def _token_step(step: int, mean_ent: float, n_groups: int, group_size: int, length: int, first_cid: int, rng):
    """One step's completions, tokens and forks. Tokens spell 'Let x+y=z' style text so the views have words."""
    n_comp = n_groups * group_size
    cids = np.arange(first_cid, first_cid + n_comp, dtype=np.int64)
    pos = np.tile(np.arange(length, dtype=np.int32), n_comp)
    # Entropy per token: a few forking positions carry most of it (as in real rollouts).
    ent = rng.exponential(max(mean_ent, 1e-4) * 0.5, n_comp * length)
    forks_at = rng.random(n_comp * length) < 0.1
    ent[forks_at] *= 6
    ent = ent.astype(np.float32)
    token_id = rng.integers(0, len(VOCAB), n_comp * length).astype(np.int32)
    token_id[forks_at] = rng.choice([41, 42, 43, 37], size=int(forks_at.sum()))  # forks land on a few words
    tokens = {
        "step": np.full(pos.size, step, dtype=np.int32),
        "completion_id": np.repeat(cids, length),
        "position": pos,
        "token_id": token_id,
        "logprob": (-ent * rng.uniform(0.5, 1.5, pos.size)).astype(np.float32),
        "entropy": ent,
        "renyi2": (0.6 * ent).astype(np.float32),
        "group_js": np.clip(0.05 * ent, 0, np.log(2)).astype(np.float32),
        "covariance": rng.normal(0, 0.1, pos.size).astype(np.float32),
        "selected": forks_at.astype(np.float32),
        "is_fork": forks_at,
    }
    k = 5
    n_forks = int(forks_at.sum())
    alt_ids = rng.integers(0, len(VOCAB), (n_forks, k)).astype(np.int32)
    alt_ids[:, 0] = token_id[forks_at]
    probs = np.sort(rng.dirichlet(np.ones(k), n_forks), axis=1)[:, ::-1].astype(np.float32)
    forks = {
        "step": np.full(n_forks, step, dtype=np.int32),
        "completion_id": tokens["completion_id"][forks_at],
        "position": pos[forks_at],
        "sampled_rank": np.zeros(n_forks, dtype=np.int16),
        "alt_token_ids": list(alt_ids),
        "alt_probs": list(probs),
    }
    reward = rng.random(n_comp).astype(np.float32)
    group = np.repeat(np.arange(n_groups, dtype=np.int64), group_size)
    completions = {
        "step": np.full(n_comp, step, dtype=np.int32),
        "rank": np.zeros(n_comp, dtype=np.int16),
        "completion_id": cids,
        "group_id": group,
        "prompt": [f"What is {g} + {g + 1}?" for g in group],
        "completion": ["".join(VOCAB[t] for t in token_id[i * length : (i + 1) * length]) for i in range(n_comp)],
        "rewards": [[("correct", float(r))] for r in reward],
        "reward": reward,
        "advantage": (reward - reward.mean()).astype(np.float32),
        "length": np.full(n_comp, length, dtype=np.int32),
        "truncated": np.zeros(n_comp, dtype=bool),
        "entropy_mean": ent.reshape(n_comp, length).mean(axis=1),
    }
    return completions, tokens, forks


def write_run(
    log_dir: str | Path,
    run_id: str,
    kind: str,
    *,
    n_steps: int = 40,
    n_groups: int = 2,
    group_size: int = 4,
    length: int = 24,
    token_steps: int | None = None,
    method: str = "ict",
    seed: int = 0,
    status: str | None = "finished",
    lenses: bool = True,
    group_js: bool = True,
    health_rules: dict | None = None,
    extra_meta: dict | None = None,
) -> None:
    """Write a whole run through the real RunWriter. `token_steps`: how many steps get per-token records (all by
    default). `status=None` leaves the run open (as if still being written). `lenses=False` writes no entropy spectrum,
effective rank, roles or probes (a run of a forkwatch without them); `group_js=False` no group JS. `health_rules`:
    the rules the run was "trained under", in run.json as the plugin writes them (config.health_rules). `extra_meta`:
    more run.json fields, as the plugin writes them."""
    from forkwatch.store import RunWriter

    rng = np.random.default_rng(seed)
    series = step_series(kind, n_steps, seed=seed)
    n_comp = n_groups * group_size
    meta = {"select": method, "model": "tiny", "vocab_size": len(VOCAB)}
    if health_rules is not None:
        meta["config"] = {"health_rules": health_rules}
    meta |= extra_meta or {}
    w = RunWriter(log_dir, run_id, meta=meta)
    w.put("vocab", {"step": 0, "token_id": np.arange(len(VOCAB), dtype=np.int32), "text": VOCAB,
                    **({"role": roles_of(VOCAB)} if lenses else {})})
    steps = _steps_columns(series, n_comp * length, n_comp, method)
    if not group_js:
        steps = {k: v for k, v in steps.items() if not k.startswith("group_js")}
    if lenses:
        steps |= _lens_columns(series, n_comp * length, rng)
        w.put("probes", _probe_columns(series, rng))
    w.put("steps", steps)
    for step in range(n_steps if token_steps is None else min(token_steps, n_steps)):
        completions, tokens, forks = _token_step(
            step, float(series["entropy_mean"][step]), n_groups, group_size, length, step * n_comp, rng
        )
        w.put("completions", completions)
        w.put("tokens", tokens)
        w.put("forks", forks)
    w.flush()
    if status is not None:
        w.close(status=status)


def _lens_columns(series: dict[str, np.ndarray], n_tokens: int, rng) -> dict:
    """The steps' entropy spectrum (a histogram of entropies drawn around each step's mean: a heavy tail that drains
    as the mean falls) and an effective rank measured every 5 steps that follows the entropy loosely."""
    ent = series["entropy_mean"].astype(np.float64)
    spectra = []
    for mean in ent:
        confident = rng.random(n_tokens) < np.clip(0.9 - 0.5 * mean, 0.3, 0.95)
        draws = np.where(confident, np.exp(rng.normal(np.log(1e-3), 1.5, n_tokens)),
                         rng.exponential(max(mean, 1e-3) * 2, n_tokens))
        spectra.append(spectrum_counts(draws))
    rank = np.where(series["step"] % 5 == 0, 20 + 30 * np.tanh(ent) + rng.normal(0, 1, ent.size), np.nan)
    return {"entropy_spectrum": spectra,
            "effective_rank_mean": [None if np.isnan(r) else float(r) for r in rank]}


PROBE_TOKENS = ((44, 36, 37, 27, 38, 28, 40), (41, 42, 43, 36, 29, 40))  # ids into VOCAB


def _probe_columns(series: dict[str, np.ndarray], rng) -> dict:
    """Two probes scored every 5 steps: per-position entropies that shrink with the run's mean entropy, the
    highest-entropy positions mostly staying where they were."""
    cols: dict = {k: [] for k in ("step", "probe_id", "position", "token_id", "logprob", "entropy", "renyi2",
                                  "top_ids", "top_probs")}
    base = [rng.exponential(0.5, len(t)) for t in PROBE_TOKENS]
    for step, mean in zip(series["step"], series["entropy_mean"], strict=True):
        if step % 5:
            continue
        for pid, ids in enumerate(PROBE_TOKENS):
            ent = base[pid] * float(mean) * rng.uniform(0.7, 1.3, len(ids))
            cols["step"] += [int(step)] * len(ids)
            cols["probe_id"] += [pid] * len(ids)
            cols["position"] += list(range(len(ids)))
            cols["token_id"] += list(ids)
            cols["entropy"] += ent.tolist()
            cols["renyi2"] += (0.6 * ent).tolist()
            cols["logprob"] += (-0.5 * ent).tolist()
            cols["top_ids"] += [[t, 0] for t in ids]
            cols["top_probs"] += [[0.9, 0.05]] * len(ids)
    return cols


def write_sample_runs(log_dir: str | Path, **kwargs) -> list[str]:
    """One run of each kind: 'collapse', 'healthy', 'explosion'."""
    for i, kind in enumerate(KINDS):
        write_run(log_dir, kind, kind, seed=i, **kwargs)
    return list(KINDS)


def simple_tokens(step: int, n: int) -> dict:
    """One `put` batch of `n` token rows (n a multiple of 10: n/10 completions of 10 positions) at `step`."""
    return {
        "step": step,
        "completion_id": np.repeat(np.arange(n // 10, dtype=np.int64) + 1000 * step, 10),
        "position": np.tile(np.arange(10, dtype=np.int32), n // 10),
        "token_id": np.arange(n, dtype=np.int32),
        "entropy": np.linspace(0, 1, n, dtype=np.float32) + step,
    }


def write_flushed_steps(log_dir: Path, n_steps: int = 3, rows: int = 100, run_id: str = "r") -> list[Path]:
    """`n_steps` token parts, one step each (flushed apart; unflushed small steps would share one part), sorted."""
    from forkwatch.store import RunWriter

    w = RunWriter(log_dir, run_id)
    for step in range(n_steps):
        w.put("tokens", simple_tokens(step, rows))
        w.flush()
    w.close()
    return sorted((log_dir / run_id / "tokens").glob("part-*.parquet"))


def write_fork_values(log_dir: str | Path, run_id: str, *, step: int, completion_id: int,
                      values: dict[int, float], rank: int = 900) -> None:
    """Measured positions of one recorded completion, as `forkwatch forkvalue` writes them (its own writer rank):
    `values` maps a position to its fork value; each position gets a sampled branch (Q 0.5) and one alternative
    (token 1, Q 0.5 + 2·value), SE 0.02, consequential when the value is above 0.1, inclusion probability 0.5."""
    from forkwatch.store import RunWriter

    rows: dict[str, list] = {}
    for position, value in values.items():
        for branch, token, q in (("sampled", 0, 0.5), ("alternative", 1, 0.5 + 2 * value)):
            row = {"step": step, "completion_id": completion_id, "position": position, "token_id": 0,
                   "branch": branch, "branch_token_id": token, "pi": 0.5, "q": q, "n": 8, "se": 0.1, "q_lo": q - 0.2,
                   "q_hi": q + 0.2, "v": 0.5 + value, "v_se": 0.07, "v_lo": 0.4, "v_hi": 0.6, "value": value,
                   "value_se": 0.02, "p_value": 0.01, "consequential": value > 0.1, "spread": 2 * value,
                   "sampled_advantage": -value, "mass": 1.0, "stratum": "fork", "inclusion_prob": 0.5,
                   "source": "ckpt", "measurement": "m1"}
            for k, v in row.items():
                rows.setdefault(k, []).append(v)
    w = RunWriter(log_dir, run_id, rank=rank, world_size=1)
    w.put("fork_values", {k: np.asarray(v, dtype=object) if k in ("branch", "stratum", "source", "measurement")
                          else (v if k == "branch_token_id" else np.asarray(v)) for k, v in rows.items()})
    w.close()
