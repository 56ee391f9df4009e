"""Sharded training on CPU processes (torchrun, 2 ranks, gloo): DeepSpeed ZeRO-3 with the head really partitioned,
FSDP2 with accelerate 1.15's wrap (a unit per decoder layer) and with an older accelerate's
`fully_shard(root, reshard_after_forward=True)`, each against the same runs under DDP. Each backend is launched once
(module fixture) and trains its configurations in turn (sharded_run.py): monitor-only, `ict` (warm-up 0), `kl_cov`
with steps_per_generation=2, `ict` on completions generate never saw (the fallbacks: the gathered head, group_js
from the loss pass's states or, with steps_per_generation=2, from the extra pass), the collapse lenses, ICT against
the reference, and monitor-only with fork value measured at every step end (training bit-identical to monitor-only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from forkwatch.store import connect
from forkwatch.store.fork_values import fork_value_positions

BACKENDS = ("ddp", "zero3", "fsdp2", "fsdp2_root")
SHARDED = BACKENDS[1:]
CONFIGS = ("monitor", "ict", "kl_cov", "ict_fallback", "ict_extra_pass", "lenses", "ict_reference", "fork_value")
# generation batches served by the fallbacks (group_js, forks) in each configuration's 2 steps
FALLBACKS = {"ict_fallback": ({"no_logits": 2}, {"no_logits": 2}), "ict_extra_pass": ({"no_logits": 1}, {"no_logits": 1})}
PORTS = dict(zip(BACKENDS, (29621, 29623, 29625, 29627), strict=True))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    pytest.importorskip("deepspeed", reason="DeepSpeed is in the test extra: `make setup` installs it")
    out = tmp_path_factory.mktemp("sharded")
    script = Path(__file__).parents[1] / "sharded_run.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
           "HF_HUB_OFFLINE": "1"}
    for backend in BACKENDS:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             str(PORTS[backend]), str(script), str(out), backend, ",".join(CONFIGS)],
            capture_output=True, text=True, timeout=400, env=env,
        )
        assert proc.returncode == 0, f"{backend}:\n{proc.stderr[-4000:]}"
    return out


def _result(runs: Path, backend: str, config: str, rank: int = 0) -> dict:
    return json.loads((runs / f"{backend}-{config}-rank{rank}.json").read_text())


def _table(runs: Path, sql: str, backend: str, config: str):
    con = connect(str(runs / "runs"))
    return con.execute(sql, [f"{backend}-{config}"]).df()


TOKENS = ("SELECT step, completion_id, position, logprob, entropy, renyi2, group_js, selected, is_fork FROM tokens "
          "WHERE run_id = ? ORDER BY step, completion_id, position")
FORKS = ("SELECT step, completion_id, position, sampled_rank, alt_token_ids, alt_probs FROM forks WHERE run_id = ? "
         "ORDER BY step, completion_id, position")


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("backend", SHARDED)
def test_sharded_runs_have_no_fault_on_any_rank_and_a_really_sharded_head(runs, backend):
    for config in CONFIGS:
        for rank in (0, 1):
            r = _result(runs, backend, config, rank)
            assert r["faults"] == {}, (config, rank, r["faults"])
            assert r["head_sharded"], (config, rank)  # ZeRO-3: an empty placeholder; FSDP2: a DTensor shard
            group_js, forks = FALLBACKS.get(config, ({}, {}))
            assert r["group_js_fallbacks"] == group_js, (config, rank)
            assert r["fork_fallbacks"] == forks, (config, rank)


@pytest.mark.parametrize("backend", SHARDED)
def test_kl_cov_and_monitor_losses_equal_ddp(runs, backend):
    for config in ("monitor", "kl_cov", "ict_fallback", "ict_extra_pass"):
        ref, got = _result(runs, "ddp", config)["curve"], _result(runs, backend, config)["curve"]
        assert len(ref) == len(got) == 2
        np.testing.assert_allclose(np.array(got), np.array(ref), rtol=2e-5, atol=1e-7, err_msg=config)
    # KL-Cov's extra term is really in play on the off-policy second step (not a trivially equal loss)
    assert abs(_result(runs, "ddp", "kl_cov")["curve"][1][0]) > 1e-3


@pytest.mark.parametrize("backend", SHARDED)
@pytest.mark.parametrize("config", CONFIGS)
def test_token_records_and_forks_with_alternatives_equal_ddp(runs, backend, config):
    ref, got = _table(runs, TOKENS, "ddp", config), _table(runs, TOKENS, backend, config)
    assert len(ref) == len(got) > 0
    keys = ["step", "completion_id", "position"]
    assert (ref[keys].to_numpy() == got[keys].to_numpy()).all()
    cols = ["logprob", "entropy", "renyi2"] + (["group_js"] if config != "kl_cov" else [])
    np.testing.assert_allclose(got[cols].to_numpy(float), ref[cols].to_numpy(float), atol=2e-5, rtol=1e-4)

    fref, fgot = _table(runs, FORKS, "ddp", config), _table(runs, FORKS, backend, config)
    assert len(fgot) == int(got["is_fork"].sum()) > 0  # every recorded fork carries its alternatives
    assert (fref[keys].to_numpy() == fgot[keys].to_numpy()).all()
    assert (fref["sampled_rank"].to_numpy() == fgot["sampled_rank"].to_numpy()).all()
    p_ref, p_got = np.stack(fref["alt_probs"].to_numpy()), np.stack(fgot["alt_probs"].to_numpy())
    assert p_got.shape[1] == 5 and (np.diff(p_got, axis=1) <= 0).all()
    np.testing.assert_allclose(p_got, p_ref, atol=1e-5)
    ids_ref, ids_got = np.stack(fref["alt_token_ids"].to_numpy()), np.stack(fgot["alt_token_ids"].to_numpy())
    distinct = np.abs(np.diff(p_ref, axis=1, append=-1.0)) > 1e-5  # ids may swap only between equal probabilities
    distinct[:, 1:] &= distinct[:, :-1]
    assert (ids_ref[distinct] == ids_got[distinct]).all()


@pytest.mark.parametrize("backend", SHARDED)
@pytest.mark.parametrize("config", ["ict", "ict_fallback", "ict_extra_pass"])
def test_ict_keeps_the_same_tokens_as_ddp(runs, backend, config):
    ref, got = _table(runs, TOKENS, "ddp", config), _table(runs, TOKENS, backend, config)
    kept_ref, kept_got = ref["selected"].to_numpy() > 0, got["selected"].to_numpy() > 0
    assert 0 < kept_ref.mean() < 0.6  # warm-up 0: the selection is in force from step 1
    assert (kept_ref != kept_got).mean() < 0.05
    # tokens may differ only where their score ties the completion's cut-off to float rounding (ICT keeps every
    # token at or above the completion's percentile, so a tie in one run and not the other moves a token)
    for (step, cid), rows in ref.groupby(["step", "completion_id"]).groups.items():
        scores = ref.loc[rows, "group_js"].to_numpy()
        differs = kept_ref[rows] != kept_got[rows]
        if not differs.any():
            continue
        cutoff = scores[kept_ref[rows]].min()
        np.testing.assert_allclose(scores[differs], cutoff, atol=1e-5, err_msg=str((step, cid)))


@pytest.mark.parametrize("backend", SHARDED)
def test_ict_against_the_reference_keeps_the_same_tokens_as_ddp(runs, backend):
    """The reference's own forward under each backend (TRL's ref_model, prepared for it) gives the same selection."""
    ref, got = _table(runs, TOKENS, "ddp", "ict_reference"), _table(runs, TOKENS, backend, "ict_reference")
    kept_ref, kept_got = ref["selected"].to_numpy() > 0, got["selected"].to_numpy() > 0
    # step 1: the dense warm-up step (the policy IS the reference: every score 0); step 2: it has moved, ICT selects
    assert kept_ref[ref["step"].to_numpy() == ref["step"].min()].all()
    assert 0 < kept_ref[ref["step"].to_numpy() == ref["step"].max()].mean() < 0.6
    assert (kept_ref != kept_got).mean() < 0.05
    assert not _result(runs, backend, "ict_reference")["faults"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fork_value_during_training_leaves_training_bit_identical(runs, backend):
    """Fork value at every step end (every forward a collective under ZeRO-3 / FSDP2, each rank measuring its own
    positions in lockstep): losses and grad norms exactly those of the same run without it, on every rank; each rank
    measured its budget (8 positions over 2 ranks: 4 a step) at both steps, the same positions as under DDP."""
    for rank in (0, 1):
        on, off = _result(runs, backend, "fork_value", rank), _result(runs, backend, "monitor", rank)
        assert on["curve"] == off["curve"] and len(on["curve"]) == 2
        assert on["faults"] == {} and on["fork_value"] == 2 * 4
    got = fork_value_positions(connect(str(runs / "runs")), f"{backend}-fork_value")
    assert sorted(set(got["step"])) == [1, 2] and len(got) == 2 * 8
    assert set(got["stratum"].str[:3]) == {"r0/", "r1/"} and got["inclusion_prob"].between(0, 1, "right").all()
    ref = fork_value_positions(connect(str(runs / "runs")), "ddp-fork_value")
    keys = ["step", "completion_id", "position", "stratum"]
    assert (ref[keys].to_numpy() == got[keys].to_numpy()).all()


PROBES = ("SELECT step, probe_id, position, token_id, logprob, entropy, renyi2, top_ids FROM probes WHERE run_id = ? "
          "ORDER BY step, probe_id, position")
LENS_STEPS = "SELECT step, n_tokens, entropy_spectrum, effective_rank_mean FROM steps WHERE run_id = ? ORDER BY step"


@pytest.mark.parametrize("backend", SHARDED)
def test_probes_spectrum_and_effective_rank_equal_ddp(runs, backend):
    ref, got = _table(runs, PROBES, "ddp", "lenses"), _table(runs, PROBES, backend, "lenses")
    assert sorted(set(ref["step"])) == [0, 1, 2] and len(got) == len(ref) == 3 * 3  # 3 scorings x (1 + 2 tokens)
    keys = ["step", "probe_id", "position", "token_id"]
    assert (ref[keys].to_numpy() == got[keys].to_numpy()).all()
    cols = ["logprob", "entropy", "renyi2"]
    np.testing.assert_allclose(got[cols].to_numpy(float), ref[cols].to_numpy(float), atol=2e-5, rtol=1e-4)
    s_ref, s_got = _table(runs, LENS_STEPS, "ddp", "lenses"), _table(runs, LENS_STEPS, backend, "lenses")
    assert s_ref["step"].tolist() == s_got["step"].tolist() == [1, 2]
    for a, b, n in zip(s_ref["entropy_spectrum"], s_got["entropy_spectrum"], s_got["n_tokens"], strict=True):
        assert sum(b) == n and np.abs(np.array(a) - np.array(b)).sum() <= 2  # a token on a bin edge may move
    rank_ref, rank_got = s_ref["effective_rank_mean"].to_numpy(float), s_got["effective_rank_mean"].to_numpy(float)
    assert np.isfinite(rank_ref).all() and (rank_ref >= 1).all()
    np.testing.assert_allclose(rank_got, rank_ref, rtol=1e-3)
