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
    # no lens budget: the cadence itself (the budget's own tests: tests/plugin/test_lens_budget*.py)
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), effective_rank_every=2, effective_rank_completions=8,
                     record_completions_per_step=None, lens_budget=None)
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


def test_the_vocabulary_is_decoded_on_the_writer_thread_not_the_training_thread(make_trainer, tmp_path):
    import threading

    trainer = make_trainer(max_steps=1)
    proc = trainer.processing_class
    tok = getattr(proc, "tokenizer", proc)
    on_training_thread: list[int] = []
    elsewhere: list[int] = []
    decode = tok.decode

    def watched(*a, **k):  # the tokenizer's own decode, with the thread it ran on noted
        ids = a[0] if a else k["token_ids"]
        (on_training_thread if threading.current_thread() is threading.main_thread() else elsewhere).append(len(ids))
        return decode(*a, **k)

    tok.decode = watched
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), probe_every=0)
    trainer.train()
    con = connect(str(tmp_path / "runs"))
    texts = [t for (t,) in con.execute("SELECT text FROM vocab ORDER BY token_id").fetchall()]
    assert texts == [decode([i], skip_special_tokens=False) for i in range(len(tok))]
    assert elsewhere.count(1) >= len(tok) and on_training_thread.count(1) < len(tok)


def test_given_probes_are_scored_before_training_and_every_k_steps(make_trainer, tmp_path):
    tok = char_tokenizer()
    # a twin of the trained model (a deep copy would share TRL's patched forward, bound to the original)
    trainer = make_trainer(max_steps=4, model=tiny_model(len(tok), seed=5))
    initial = tiny_model(len(tok), seed=5).eval()
    pairs = [("2+3=", "5"), ("1+1=", "2.")]
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), probes=pairs, probe_every=2, lens_budget=None)
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
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), probe_every=2, probe_count=3, lens_budget=None)
    trainer.train()
    con = connect(str(tmp_path / "runs"))
    run = _run_id(con)
    probes = queries.probe_list(con, run)
    assert probes["probe_id"].tolist() == [0, 1, 2]
    # first scored as the initial policy (step 0, from the first step's own loss pass), then at step 2
    assert probes["first_step"].tolist() == [0, 0, 0] and probes["last_step"].tolist() == [2, 2, 2]
    # each probe is one of the completions recorded at step 1: the same token ids, EOS included
    recorded = {tuple(ids) for (ids,) in con.execute(
        "SELECT list(token_id ORDER BY position) FROM tokens WHERE step = 1 GROUP BY completion_id").fetchall()}
    for probe_id in range(3):
        ids = tuple(queries.probe_tokens(con, run, probe_id).query("step == 0")["token_id"])
        assert ids in recorded
    meta = json.loads(con.execute("SELECT meta FROM runs").fetchone()[0])
    assert [p["probe_id"] for p in meta["probes"]] == [0, 1, 2]
    assert meta["lenses"]["probes"]["first"] == {"step": 0, "source": "loss pass"}


def test_default_probes_first_scoring_from_the_loss_pass_is_the_initial_policys_teacher_forced_scoring(
        make_trainer, tmp_path):
    # the loss pass's log-prob, entropy and Rényi-2 and generation's top-k of the first step's completions are what a
    # teacher-forced forward of the initial policy gives (here against a twin of the model, at temperature 0.7)
    tok = char_tokenizer()
    trainer = make_trainer(max_steps=1, model=tiny_model(len(tok), seed=5), temperature=0.7)
    initial = tiny_model(len(tok), seed=5).eval()
    callback = forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), probe_count=4, fork_top_k=4)
    trainer.train()
    con = connect(str(tmp_path / "runs"))
    run = _run_id(con)
    probes = callback.probes.probes
    assert len(probes) == 4
    for probe in probes:
        got = queries.probe_tokens(con, run, probe.probe_id)
        assert got["step"].tolist() == [0] * len(probe.completion_ids)  # no forward at step 1: step 0 only
        ids = torch.tensor([probe.prompt_ids + probe.completion_ids])
        t = len(probe.completion_ids)
        with torch.no_grad():
            logits = initial(input_ids=ids).logits[0, -t - 1 : -1]
        want = probe_scores(logits, ids[0, -t:], temperature=0.7, k=4)
        for name in ("logprob", "entropy", "renyi2"):
            np.testing.assert_allclose(got[name], getattr(want, name).numpy(), rtol=1e-4, atol=1e-5)
    top = con.execute("SELECT probe_id, position, top_ids, top_probs FROM probes WHERE step = 0 "
                      "ORDER BY probe_id, position").fetchall()
    for probe in probes:
        ids = torch.tensor([probe.prompt_ids + probe.completion_ids])
        t = len(probe.completion_ids)
        with torch.no_grad():
            want = probe_scores(initial(input_ids=ids).logits[0, -t - 1 : -1], ids[0, -t:], temperature=0.7, k=4)
        rows = [r for r in top if r[0] == probe.probe_id]
        assert [list(r[2]) for r in rows] == want.top_ids.tolist()
        np.testing.assert_allclose([list(r[3]) for r in rows], want.top_probs.numpy(), rtol=1e-4, atol=1e-5)
    meta = json.loads(con.execute("SELECT meta FROM runs").fetchone()[0])
    assert meta["lenses"]["probes"]["first"] == {"step": 0, "source": "loss pass"}


def test_default_probes_are_scored_with_a_forward_when_generation_kept_no_alternatives(make_trainer, tmp_path):
    # without forks, generation keeps no top-k: the first scoring is a forward at the step that chose the probes
    trainer = make_trainer(max_steps=2)
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), probe_every=2, probe_count=2, record_forks=False,
                     lens_budget=None)
    trainer.train()
    con = connect(str(tmp_path / "runs"))
    probes = queries.probe_list(con, _run_id(con))
    assert probes["first_step"].tolist() == [1, 1] and probes["last_step"].tolist() == [2, 2]
    meta = json.loads(con.execute("SELECT meta FROM runs").fetchone()[0])
    assert meta["lenses"]["probes"]["first"] == {"step": 1, "source": "forward"}
    assert meta["lenses"]["probes"]["ran"] == [1, 2]


def test_under_a_small_lens_budget_the_lenses_are_skipped_and_run_json_and_the_notes_say_where(make_trainer, tmp_path):
    # a budget of a millionth of training time: the probes' first scoring (given probes, before training) and the
    # first scoring and measurement on the grid (their costs not yet measured) run; every later due step is skipped
    trainer = make_trainer(max_steps=5)
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), probes=[("2+3=", "5"), ("1+1=", "2.")], probe_every=1,
                     effective_rank_every=1, lens_budget=1e-6, lens_max_every=None)
    trainer.train()
    con = connect(str(tmp_path / "runs"))
    run = _run_id(con)
    lenses = json.loads(con.execute("SELECT meta FROM runs").fetchone()[0])["lenses"]
    assert lenses["budget"] == 1e-6 and lenses["train_seconds"] > 0
    assert lenses["probes"]["ran"] == [0, 1] and lenses["probes"]["skipped"] == [2, 3, 4, 5]
    assert lenses["effective_rank"]["ran"] == [1] and lenses["effective_rank"]["skipped"] == [2, 3, 4, 5]
    assert lenses["probes"]["cost_s"] > 0 and lenses["effective_rank"]["cost_s"] > 0
    # what was skipped is absent from the tables, not written as empty
    assert sorted(s for (s,) in con.execute("SELECT DISTINCT step FROM probes").fetchall()) == [0, 1]
    rank = con.execute("SELECT step FROM steps WHERE effective_rank_mean IS NOT NULL ORDER BY step").fetchall()
    assert [s for (s,) in rank] == [1]
    notes = queries.lens_schedule(con, run)
    assert "skipped at 2–5 (4 of 6)" in notes["probes"] and "skipped at 2–5 (4 of 5)" in notes["effective_rank"]


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
