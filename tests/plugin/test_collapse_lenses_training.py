"""The collapse lenses on real GRPOTrainer steps: entropy spectrum, effective rank, fork roles and probes, as stored."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from forkwatch.demo.tiny import char_tokenizer, tiny_model
from forkwatch.plugin.token_math import effective_ranks
from forkwatch.plugin.token_math import teacher_forced as probe_scores
from forkwatch.store import connect, queries
from forkwatch.store.roles import role_of
from forkwatch.store.spectrum import spectrum_counts

import forkwatch


def _run_id(con) -> str:
    return con.execute("SELECT run_id FROM runs").fetchone()[0]


def test_spectrum_counts_every_response_token_of_each_step(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=3)
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), record_completions_per_step=None,
                     stat_mantissa_bits=None)
    trainer.train()
    con = connect(str(tmp_path / "runs"))
    steps = con.execute("SELECT step, n_tokens, entropy_spectrum FROM steps ORDER BY step").fetchall()
    assert [s for s, _, _ in steps] == [1, 2, 3]
    for step, n_tokens, spectrum in steps:
        assert sum(spectrum) == n_tokens
        # every completion is recorded once per step here: the stored tokens give the same histogram
        ent = con.execute("SELECT entropy FROM tokens WHERE step = ?", [step]).fetchnumpy()["entropy"]
        assert list(spectrum) == spectrum_counts(ent)


def test_effective_rank_is_measured_every_k_steps_from_the_loss_pass_states(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=4)
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), effective_rank_every=2, effective_rank_completions=8,
                     record_completions_per_step=None)
    # observe the loss passes' backbone output and masks from outside forkwatch (a second, independent hook)
    seen: dict[int, list[float]] = {}
    state: dict[str, torch.Tensor] = {}
    backbone = trainer.model.model
    backbone.register_forward_hook(
        lambda m, a, out: state.__setitem__("h", out.last_hidden_state.detach()) if torch.is_grad_enabled() else None)
    original = trainer._compute_loss

    def spy(model, inputs):
        loss = original(model, inputs)
        step = trainer.state.global_step + 1
        seen.setdefault(step, []).extend(effective_ranks(state["h"][:, -inputs["completion_mask"].size(1):],
                                                         inputs["completion_mask"]))
        return loss

    trainer._compute_loss = spy
    trainer.train()
    series = queries.effective_rank_series(connect(str(tmp_path / "runs")), _run_id(connect(str(tmp_path / "runs"))))
    assert series["step"].tolist() == [2, 4]
    for step, value in zip(series["step"], series["effective_rank_mean"], strict=True):
        assert value == pytest.approx(float(np.mean(seen[step])), rel=1e-3)
        assert 1.0 <= value <= 8.0


def test_effective_rank_off_leaves_the_column_null(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=2)
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), effective_rank_every=0)
    trainer.train()
    con = connect(str(tmp_path / "runs"))
    assert con.execute("SELECT count(effective_rank_mean) FROM steps").fetchone()[0] == 0


def test_vocab_carries_each_token_role_and_fork_roles_cover_every_fork(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=2)
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), record_completions_per_step=None)
    trainer.train()
    con = connect(str(tmp_path / "runs"))
    vocab = con.execute("SELECT text, role FROM vocab").fetchall()
    assert vocab and all(role == role_of(text) for text, role in vocab)
    roles = queries.fork_roles_by_step(con, _run_id(con))
    forks = dict(con.execute("SELECT step, count(*) FROM tokens WHERE is_fork GROUP BY step").fetchall())
    assert roles.groupby("step")["n_forks"].sum().to_dict() == forks
    assert roles.groupby("step")["share"].sum().to_numpy() == pytest.approx(1.0)


def test_given_probes_are_scored_before_training_and_every_k_steps(make_trainer, tmp_path):
    tok = char_tokenizer()
    # a twin of the trained model (a deep copy would share TRL's patched forward, bound to the original)
    trainer = make_trainer(max_steps=4, model=tiny_model(len(tok), seed=5))
    initial = tiny_model(len(tok), seed=5).eval()
    pairs = [("2+3=", "5"), ("1+1=", "2.")]
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), probes=pairs, probe_every=2)
    trainer.train()
    con = connect(str(tmp_path / "runs"))
    run = _run_id(con)
    assert queries.probe_list(con, run)[["probe_id", "n_tokens", "first_step", "last_step", "n_steps"]].values.tolist(
    ) == [[0, 1, 0, 4, 3], [1, 2, 0, 4, 3]]
    # step 0 is the policy before training: the scores are the initial model's, teacher-forced
    for probe_id, (prompt, completion) in enumerate(pairs):
        got = queries.probe_tokens(con, run, probe_id)
        got0 = got[got["step"] == 0]
        ids = torch.tensor([tok(prompt + completion, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = initial(input_ids=ids).logits[0, -len(completion) - 1 : -1]
        want = probe_scores(logits, ids[0, -len(completion):], temperature=trainer.temperature)
        np.testing.assert_allclose(got0["entropy"], want.entropy.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got0["renyi2"], want.renyi2.numpy(), rtol=1e-5, atol=1e-6)
        assert got0["text"].tolist() == list(completion)
        # training moved the policy: the same tokens score differently at the last step
        assert not np.allclose(got[got["step"] == 4]["entropy"], got0["entropy"])
    meta = json.loads(con.execute("SELECT meta FROM runs").fetchone()[0])
    assert [p["completion"] for p in meta["probes"]] == ["5", "2."]
    overlap = queries.probe_top_overlap(con, run)
    assert overlap["step"].tolist() == [0, 2, 4] and overlap["overlap"].iloc[0] == 1.0


def test_default_probes_are_the_first_recorded_completions(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=2)
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), probe_every=2, probe_count=3)
    trainer.train()
    con = connect(str(tmp_path / "runs"))
    run = _run_id(con)
    probes = queries.probe_list(con, run)
    assert probes["probe_id"].tolist() == [0, 1, 2]
    assert probes["first_step"].tolist() == [1, 1, 1] and probes["last_step"].tolist() == [2, 2, 2]
    # each probe is one of the completions recorded at step 1: the same token ids, EOS included
    recorded = {tuple(ids) for (ids,) in con.execute(
        "SELECT list(token_id ORDER BY position) FROM tokens WHERE step = 1 GROUP BY completion_id").fetchall()}
    for probe_id in range(3):
        ids = tuple(queries.probe_tokens(con, run, probe_id).query("step == 1")["token_id"])
        assert ids in recorded
    meta = json.loads(con.execute("SELECT meta FROM runs").fetchone()[0])
    assert [p["probe_id"] for p in meta["probes"]] == [0, 1, 2]


@pytest.mark.parametrize(("option", "match"), [
    (dict(effective_rank_every=-1), "effective_rank_every"),
    (dict(effective_rank_completions=0), "effective_rank_completions"),
    (dict(probe_every=-2), "probe_every"),
    (dict(probe_count=0), "probe_count"),
    (dict(probes=["2+2="]), "probes"),
])
def test_lens_options_are_refused_at_attach_naming_the_fix(make_trainer, tmp_path, option, match):
    trainer = make_trainer(max_steps=1)
    with pytest.raises(ValueError, match=match):
        forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), **option)
