"""Real GRPOTrainer steps with forkwatch attached: the recorded numbers are TRL's numbers, on the right rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from forkwatch.store import connect

import forkwatch

EXACT = dict(stat_mantissa_bits=None, record_completions_per_step=None)  # every completion, exact float32


def train(make_trainer, tmp_path, *, fw: dict | None = None, **grpo):
    trainer = make_trainer(**grpo)
    cb = forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", **(fw or {}))
    trainer.train()
    return trainer, cb, connect(str(tmp_path / "runs"))


def rows(con, sql: str) -> list[dict]:
    res = con.sql(sql)
    return [dict(zip(res.columns, r, strict=True)) for r in res.fetchall()]


def test_step_mean_entropy_equals_trls_logged_entropy(make_trainer, tmp_path):
    trainer, cb, con = train(make_trainer, tmp_path, max_steps=3)
    logged = {h["step"]: h for h in trainer.state.log_history if "entropy" in h}
    steps = rows(con, "SELECT step, entropy_mean, n_tokens FROM steps ORDER BY step")
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        assert s["entropy_mean"] == pytest.approx(logged[s["step"]]["entropy"], abs=1e-5)
        assert logged[s["step"]]["forkwatch/entropy_mean"] == pytest.approx(s["entropy_mean"], abs=1e-6)
    assert not cb.capture.faults.faults


def test_per_token_entropy_renyi2_and_group_js_equal_float64_full_logits(make_trainer, tmp_path, tokenizer):
    # lr=0: the weights after training are the ones every loss pass saw
    trainer, cb, con = train(make_trainer, tmp_path, fw=dict(group_js=True, **EXACT), max_steps=1,
                             learning_rate=0.0, temperature=0.7)
    assert not cb.capture.evidence.group_js_fallbacks  # group_js below was scored during generation
    model = trainer.model.double().eval()
    comps = rows(con, "SELECT completion_id, group_id, prompt FROM completions")
    toks = rows(con, "SELECT * FROM tokens ORDER BY completion_id, position")
    assert len(comps) == 8 and toks
    probs: dict[int, torch.Tensor] = {}
    for c in comps:
        mine = [t for t in toks if t["completion_id"] == c["completion_id"]]
        p_ids = tokenizer(c["prompt"])["input_ids"]
        ids = torch.tensor([p_ids + [t["token_id"] for t in mine]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(p_ids) - 1 : -1].double() / 0.7  # (T, V)
        p = torch.softmax(logits, -1)
        probs[c["completion_id"]] = p
        ent = -(p * p.log()).sum(-1)
        h2 = -(p * p).sum(-1).log()
        lp = p.log().gather(1, ids[0, len(p_ids) :, None]).squeeze(1)
        np.testing.assert_allclose([t["entropy"] for t in mine], ent.numpy(), atol=1e-4)
        np.testing.assert_allclose([t["renyi2"] for t in mine], h2.numpy(), atol=1e-4)
        np.testing.assert_allclose([t["logprob"] for t in mine], lp.numpy(), atol=1e-4)
        assert all(r <= e + 1e-6 for r, e in zip(h2, ent, strict=True))
    # group_js from the full distributions of the group's rollouts
    for c in comps:
        sibs = [d["completion_id"] for d in comps if d["group_id"] == c["group_id"]]
        mine = [t for t in toks if t["completion_id"] == c["completion_id"]]
        for t in mine:
            pos = t["position"]
            act = [probs[s][pos] for s in sibs if probs[s].size(0) > pos]
            if len(act) < 2:
                assert t["group_js"] == 0.0
                continue
            pbar = torch.stack(act).mean(0)
            pi = probs[c["completion_id"]][pos]
            m = 0.5 * (pi + pbar)
            js = 0.5 * (pi * (pi / m).log()).sum() + 0.5 * (pbar * (pbar / m).log()).sum()
            assert t["group_js"] == pytest.approx(float(js), abs=1e-4)
            assert 0.0 <= t["group_js"] <= math.log(2)


def test_recorded_tokens_rewards_and_advantages_are_those_the_loss_saw(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=2, steps_per_generation=2)  # shuffled, split generation batch
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", **EXACT)
    seen: dict[int, dict] = {}
    fw_loss = trainer._compute_loss

    def spy(model, inputs):  # outermost: sees exactly what TRL's loss receives
        step = trainer.state.global_step + 1
        for i, cid in enumerate(inputs["forkwatch_row_id"].tolist()):
            n = int(inputs["completion_mask"][i].sum())
            seen[cid] = dict(step=step, ids=inputs["completion_ids"][i, :n].tolist(),
                             adv=float(inputs["advantages"][i]))
        return fw_loss(model, inputs)

    trainer._compute_loss = spy
    trainer.train()
    con = connect(str(tmp_path / "runs"))
    comps = rows(con, "SELECT * FROM completions")
    assert len(comps) == len(seen) == 16
    tok = trainer.processing_class
    by_group: dict[int, list] = {}
    for c in comps:
        s = seen[c["completion_id"]]
        ids = [r[0] for r in con.sql(
            f"SELECT token_id FROM tokens WHERE completion_id = {c['completion_id']} ORDER BY position").fetchall()]
        assert ids == s["ids"] and c["step"] == s["step"]
        assert c["completion"] == tok.decode(s["ids"], skip_special_tokens=True)
        assert c["advantage"] == pytest.approx(s["adv"], abs=1e-6)
        text = c["completion"]
        expect = {"digit_reward": sum(ch.isdigit() for ch in text) / max(len(text), 1), "length_reward": -0.1 * len(text)}
        got = dict(c["rewards"]) if not isinstance(c["rewards"], dict) else c["rewards"]
        assert got == pytest.approx(expect, abs=1e-6)
        assert c["reward"] == pytest.approx(sum(expect.values()), abs=1e-5)
        by_group.setdefault(c["group_id"], []).append(c)
    for group in by_group.values():  # advantages are the group-normalised rewards of these very rows
        r = np.array([c["reward"] for c in group])
        adv = (r - r.mean()) / (r.std(ddof=1) + 1e-4)
        np.testing.assert_allclose(sorted(c["advantage"] for c in group), sorted(adv), atol=1e-4)


def test_forks_store_topk_alternatives_at_the_top_entropy_fraction(make_trainer, tmp_path):
    _, _, con = train(make_trainer, tmp_path, fw=dict(fork_top_k=3, **EXACT), max_steps=1)
    n_tok, n_fork = con.sql("SELECT count(*), sum(is_fork::INT) FROM tokens").fetchall()[0]
    assert n_fork == math.ceil(0.2 * n_tok)
    forks = rows(con, "SELECT * FROM forks")
    assert len(forks) == n_fork
    for f in forks:
        assert len(f["alt_token_ids"]) == 3 and list(f["alt_probs"]) == sorted(f["alt_probs"], reverse=True)


def test_fork_sampled_rank_is_the_sampled_tokens_place_among_the_alternatives(make_trainer, tmp_path):
    _, _, con = train(make_trainer, tmp_path, fw=dict(fork_top_k=3, **EXACT), max_steps=1)
    forks = rows(con, "SELECT f.sampled_rank, f.alt_token_ids, t.token_id FROM forks f JOIN tokens t "
                      "ON t.completion_id = f.completion_id AND t.position = f.position")
    assert forks
    for f in forks:
        alts = list(f["alt_token_ids"])
        # among the top 3: its index there; below them: a rank of 3 or more
        assert f["sampled_rank"] == alts.index(f["token_id"]) if f["token_id"] in alts else f["sampled_rank"] >= 3


def test_volume_options_sample_completions_and_steps(make_trainer, tmp_path):
    _, _, con = train(make_trainer, tmp_path, fw=dict(record_completions_per_step=2, record_every_steps=2),
                      max_steps=3)
    per_step = dict(con.sql("SELECT step, count(*) FROM completions GROUP BY step").fetchall())
    assert per_step == {1: 2, 3: 2}
    assert con.sql("SELECT count(*) FROM steps").fetchall()[0][0] == 3  # aggregates still cover every step
    assert con.sql("SELECT min(n_completions) FROM steps").fetchall()[0][0] == 8


def test_trainer_logs_carry_forkwatch_scalars(make_trainer, tmp_path):
    trainer, _, _ = train(make_trainer, tmp_path, max_steps=1)
    logged = next(h for h in trainer.state.log_history if "entropy" in h)
    for key in ("entropy_p90", "renyi2_mean", "fork_fraction", "selected_fraction", "reward_mean",
                "forkwatch_seconds", "dropped_records"):
        assert f"forkwatch/{key}" in logged
    assert logged["forkwatch/selected_fraction"] == 1.0


def test_vocab_and_token_text_name_every_recorded_token(make_trainer, tmp_path, tokenizer):
    _, cb, con = train(make_trainer, tmp_path, fw=EXACT, max_steps=1)
    assert con.sql("SELECT count(*) FROM vocab").fetchall()[0][0] == len(tokenizer)
    texts = rows(con, "SELECT token_id, text FROM token_text")
    assert texts and all(t["text"] == tokenizer.decode([t["token_id"]]) for t in texts)
    assert not cb.capture.faults.faults


def test_completion_text_decoding_equals_batch_decode(tokenizer, monkeypatch):
    from forkwatch.plugin.records import decode

    seqs = [[5, 6, tokenizer.eos_token_id, 7], [8], []]
    expected = tokenizer.batch_decode(seqs, skip_special_tokens=True)
    with monkeypatch.context() as m:  # the backend path: transformers' decode is not called
        m.setattr(tokenizer, "decode", lambda *a, **k: pytest.fail("decode called"))
        assert decode(tokenizer, seqs) == expected
    tokenizer.clean_up_tokenization_spaces = True  # transformers would post-process: its own path is taken
    calls = []
    monkeypatch.setattr(tokenizer, "decode", lambda s, **k: calls.append(s) or "x")
    assert decode(tokenizer, seqs) == ["x"] * 3 and calls == seqs


def _token_batch(b: int, t: int, seed: int, take_rows: list[int]):
    from forkwatch.plugin.step_data import TokenBatch

    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, t, generator=g) > 0.2).long()
    take = torch.zeros(b, t, dtype=torch.bool)
    take[take_rows] = True
    return TokenBatch(
        take=take & mask.bool(), logprob=-torch.rand(b, t, generator=g), entropy=torch.rand(b, t, generator=g),
        renyi2=torch.rand(b, t, generator=g), group_js=None, selected=None,
        is_fork=torch.rand(b, t, generator=g) > 0.7, advantages=torch.randn(b, generator=g), mask=mask,
        completion_id=torch.arange(b) + 100 * seed, token_id=torch.randint(0, 50, (b, t), generator=g),
    )


def test_token_columns_of_stacked_micro_batches_equal_one_at_a_time():
    """A hand-off stacks same-shaped micro-batches; covariance must stay per micro-batch, rows must not mix."""
    from forkwatch.plugin.records import token_columns
    from forkwatch.plugin.token_math import covariance

    steps = [(1, [_token_batch(4, 3, 1, [0, 2]), _token_batch(4, 5, 2, [1])]), (2, [_token_batch(4, 3, 3, [3])])]
    together = token_columns(steps)
    alone = [token_columns([(s, [b])]) for s, bs in steps for b in bs]

    def ordered(cols: dict) -> dict:  # rows by (step, completion, position): the order parts are written in
        order = np.lexsort((cols["position"], cols["completion_id"], cols["step"]))
        return {k: None if v is None else v[order] for k, v in cols.items()}

    together = ordered(together)
    joined = ordered({k: None if alone[0][k] is None else np.concatenate([a[k] for a in alone]) for k in alone[0]})
    for name, col in together.items():
        if col is None:
            assert joined[name] is None, name
        else:
            np.testing.assert_array_equal(col, joined[name], err_msg=name)
    b = steps[0][1][0]  # covariance against the formula over that micro-batch alone
    ref = covariance(b.logprob, b.advantages, b.mask)[b.take].numpy()
    np.testing.assert_allclose(alone[0]["covariance"], ref, rtol=1e-6)
    assert sorted(set(together["step"].tolist())) == [1, 2]
    assert np.all(together["selected"] == 1.0)
