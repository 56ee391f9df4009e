"""Watching does not change training, survives its own faults, works across TRL configurations, and selects."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import TRL_MATRIX
from forkwatch.plugin.selection.registry import Selection, registered_selector
from forkwatch.store import connect

import forkwatch


def _test_half(inp, *, fraction: float = 0.5, warmup_steps: int = 0) -> Selection:
    """Every response token at weight `fraction` (deterministic, so the effect on the loss is known)."""
    return Selection(weights=inp.mask * fraction, metrics={"threshold": 0.25, "warmup": 0.0})


@pytest.fixture
def test_half():
    """`select="test_half"` for one test, unregistered afterwards."""
    with registered_selector("test_half", _test_half):
        yield "test_half"


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_watching_leaves_training_bit_identical(make_trainer, tmp_path):
    plain = make_trainer(max_steps=3)
    plain.train()
    watched = make_trainer(max_steps=3)
    forkwatch.attach(watched, log_dir=str(tmp_path / "runs"), group_js=True, record_completions_per_step=3)
    watched.train()
    a, b = _weights(plain), _weights(watched)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_fault_in_a_hook_is_counted_logged_once_and_survived(make_trainer, tmp_path, caplog):
    trainer = make_trainer(max_steps=3)
    cb = forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r")

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    cb.capture.end_micro_batch = boom
    cb.capture.on_loss_values = boom
    with caplog.at_level(logging.ERROR, logger="forkwatch"):
        trainer.train()
    assert trainer.state.global_step == 3
    counts = dict(cb.capture.faults.faults)
    assert counts["loss_end"] == 3 and counts["model_forward"] >= 3  # the model hook also sees generation calls
    hook_errors = [r for r in caplog.records if r.getMessage().startswith("forkwatch: error in")]
    assert len(hook_errors) == 2  # once per hook, however many times it failed
    meta = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    assert meta["faults"] == counts and meta["status"] == "finished"


def test_a_full_queue_drops_records_instead_of_blocking(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=2)
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", queue_rows=10,
                     record_completions_per_step=None)
    trainer.train()
    meta = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    assert meta["dropped"]["tokens"] > 0 and meta["status"] == "finished"


CONFIGS = {
    "defaults": {},
    **TRL_MATRIX,
    "llama_tied": dict(arch="llama", tie_embeddings=True),
    "peft_lora": dict(peft=True, beta=0.04),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_configuration_records_every_step(make_trainer, tmp_path, name):
    trainer = make_trainer(max_steps=2, **CONFIGS[name])
    cb = forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", group_js=True,
                          record_completions_per_step=None)
    trainer.train()
    assert not cb.capture.faults.faults
    assert not cb.capture.evidence.group_js_fallbacks  # every configuration is scored during generation
    con = connect(str(tmp_path / "runs"))
    steps = con.sql("SELECT step, n_tokens, entropy_mean, group_js_mean FROM steps ORDER BY step").fetchall()
    assert [s[0] for s in steps] == [1, 2]
    assert all(s[1] > 0 and s[2] > 0 and s[3] >= 0 for s in steps)
    logged = {h["step"]: h["entropy"] for h in trainer.state.log_history if "entropy" in h}
    if CONFIGS[name].get("gradient_accumulation_steps", 1) == 1:  # TRL averages micro-batch means otherwise
        assert all(abs(s[2] - logged[s[0]]) < 1e-5 for s in steps)
    n_tok = con.sql("SELECT count(*) FROM tokens").fetchall()[0][0]
    assert n_tok > 0 and con.sql("SELECT count(*) FROM completions").fetchall()[0][0] > 0


def test_selection_seam_weights_the_loss_and_records_selected(make_trainer, tmp_path, test_half):
    half = make_trainer(max_steps=1, loss_type="bnpo")
    cb = forkwatch.attach(half, log_dir=str(tmp_path / "runs"), run_name="r", select="test_half",
                          record_completions_per_step=None)
    assert half.top_entropy_quantile < 1.0
    half.train()
    dense = make_trainer(max_steps=1, loss_type="bnpo")
    dense.train()
    # same seed, same rollouts: weights of 0.5 on every token halve the policy gradient (beta=0)
    grad = lambda t: next(h["grad_norm"] for h in t.state.log_history if "grad_norm" in h)  # noqa: E731
    assert grad(half) == pytest.approx(0.5 * grad(dense), rel=1e-4)
    con = connect(str(tmp_path / "runs"))
    assert {r[0] for r in con.sql("SELECT DISTINCT selected FROM tokens").fetchall()} == {0.5}
    sel, method, thr = con.sql("SELECT selected_fraction, select_method, select_threshold FROM steps").fetchall()[0]
    # selected_fraction counts tokens that get any gradient: all of them here, each at half weight
    assert sel == pytest.approx(1.0) and method == "test_half" and thr == pytest.approx(0.25)
    logged = next(h for h in half.state.log_history if "loss" in h)
    assert logged["forkwatch/select/threshold"] == pytest.approx(0.25)
    assert not cb.capture.faults.faults


def test_worker_interval_s_is_still_accepted_with_a_warning_naming_handoff_interval_s(make_trainer, tmp_path):
    from forkwatch.plugin.config import ForkwatchConfig

    with pytest.warns(FutureWarning, match="`worker_interval_s` is now `handoff_interval_s`"):
        cb = forkwatch.attach(make_trainer(max_steps=1), log_dir=str(tmp_path / "runs"), worker_interval_s=0)
    assert cb.config.handoff_interval_s == 0 and "worker_interval_s" not in cb.config.to_dict()
    with pytest.warns(FutureWarning, match="pass handoff_interval_s instead"):
        assert ForkwatchConfig(log_dir=str(tmp_path), worker_interval_s=2.5).handoff_interval_s == 2.5
    with pytest.raises(ValueError, match="handoff_interval_s=-1"):
        ForkwatchConfig(log_dir=str(tmp_path), handoff_interval_s=-1)


def test_attach_refuses_an_out_of_range_option_naming_it(make_trainer):
    with pytest.raises(ValueError, match="fork_fraction=2.0"):
        forkwatch.attach(make_trainer(max_steps=1), fork_fraction=2.0)


def test_attach_refuses_an_unknown_option_listing_the_valid_ones(make_trainer):
    with pytest.raises(ValueError, match=r"unknown forkwatch option\(s\) \['colour'\]; valid options: .*'fork_fraction'"):
        forkwatch.attach(make_trainer(max_steps=1), colour="red")


def test_attach_refuses_a_health_rule_typo_listing_the_rule_names(make_trainer):
    with pytest.raises(ValueError, match=r"\['colapse_fraction'\]; valid names: .*'collapse_fraction'"):
        forkwatch.attach(make_trainer(max_steps=1), health_rules={"colapse_fraction": 0.1})


def test_attach_refuses_an_invalid_health_rule_value(make_trainer):
    with pytest.raises(ValueError, match="collapse_fraction"):
        forkwatch.attach(make_trainer(max_steps=1), health_rules={"collapse_fraction": 3.0})


def test_attach_takes_health_rules_as_a_dataclass(make_trainer, tmp_path):
    from forkwatch.store.health import HealthRules

    rules = HealthRules(min_steps=2)
    cb = forkwatch.attach(make_trainer(max_steps=1), log_dir=str(tmp_path / "runs"), health_rules=rules)
    assert cb.config.health_rules is rules


def test_attach_refuses_selector_options_without_a_selector(make_trainer):
    with pytest.raises(ValueError, match="select="):
        forkwatch.attach(make_trainer(max_steps=1), fraction=0.1)


def test_attach_refuses_a_selector_when_trl_already_selects_by_entropy(make_trainer, test_half):
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        forkwatch.attach(make_trainer(max_steps=1, top_entropy_quantile=0.2), select="test_half")


def test_attach_refuses_a_second_attach_on_one_trainer(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=1)
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"))
    with pytest.raises(ValueError, match="already attached"):
        forkwatch.attach(trainer)


def test_train_end_removes_every_seam_forkwatch_installed(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=1)
    forward = trainer.model.__dict__.get("forward")  # TRL's own fused-head forward, when it set one
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"))
    assert "_compute_loss" in trainer.__dict__
    trainer.train()
    wrapped = ("_compute_loss", "_generate_and_score_completions", "_calculate_rewards", "get_high_entropy_mask")
    assert not [name for name in wrapped if name in trainer.__dict__]
    assert trainer.model.__dict__.get("forward") is forward and not trainer.model._forward_hooks


def test_resume_from_checkpoint_continues_the_run_without_duplicated_steps(make_trainer, tmp_path):
    out = str(tmp_path / "out")
    first = make_trainer(max_steps=2, save_strategy="steps", save_steps=2, output_dir=out)
    forkwatch.attach(first, log_dir=str(tmp_path / "runs"))
    first.train()
    resumed = make_trainer(max_steps=4, save_strategy="steps", save_steps=2, output_dir=out)
    cb = forkwatch.attach(resumed, log_dir=str(tmp_path / "runs"))
    resumed.train(resume_from_checkpoint=True)
    con = connect(str(tmp_path / "runs"))
    assert con.sql("SELECT count(DISTINCT run_id) FROM steps").fetchall()[0][0] == 1
    assert [r[0] for r in con.sql("SELECT step FROM steps ORDER BY step").fetchall()] == [1, 2, 3, 4]
    dup = con.sql("SELECT count(*) FROM (SELECT completion_id, position, count(*) c FROM tokens "
                  "GROUP BY ALL HAVING c > 1)").fetchall()[0][0]
    assert dup == 0 and cb.run_id == first._forkwatch.run_id
