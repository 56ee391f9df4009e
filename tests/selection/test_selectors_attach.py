"""`attach(trainer, select=...)` end to end: every method trains under TRL's configuration matrix, records what it
selected, equals its reference where one exists, and is refused where it cannot work."""

from __future__ import annotations

import pytest
import torch
from conftest import TRL_MATRIX
from forkwatch.plugin.selection.registry import get_selector
from forkwatch.store import connect
from test_selectors_grad import Seam

import forkwatch

METHODS = ["ict", "high_entropy", "random", "clip_cov", "kl_cov", "stapo", "gppo"]
# Options that make each method act on a tiny model within two steps (defaults drop ~1 token in 10^4).
BITE = {
    "ict": {"warmup_steps": 1},
    "random": {"warmup_steps": 0},
    "clip_cov": {"fraction": 0.1, "select_options": {"cov_low": -10.0, "cov_high": 10.0}},
    "kl_cov": {"fraction": 0.1},
    "stapo": {"select_options": {"prob_threshold": 0.5, "entropy_quantile": 0.9}},
}


def _attach(trainer, tmp_path, name, **options):
    return forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", select=name,
                            record_completions_per_step=None, **{**BITE.get(name, {}), **options})


def _params(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_and_records_each_selection(make_trainer, tmp_path, name):
    trainer = make_trainer(max_steps=2, loss_type="grpo")
    cb = _attach(trainer, tmp_path, name)
    trainer.train()
    assert not cb.capture.faults.faults
    con = connect(str(tmp_path / "runs"))
    steps = con.sql("SELECT step, select_method, select_warmup FROM steps ORDER BY step").fetchall()
    assert [(s, m) for s, m, _ in steps] == [(1, name), (2, name)]
    if name == "ict":  # warm-up of one optimizer step: dense at step 1, selective at step 2
        assert [w for *_, w in steps] == [True, False]
    selected = con.sql("SELECT step, min(selected), max(selected), avg((selected > 0)::DOUBLE) FROM tokens "
                       "GROUP BY step ORDER BY step").fetchall()
    assert len(selected) == 2 and all(lo >= 0 for _, lo, _, _ in selected)
    if name in ("ict", "high_entropy", "random"):
        _, lo, hi, kept = selected[1]
        assert lo == 0 and hi > 1 and kept < 0.6  # sparse, kept tokens renormalised (Sparse-GRPO / kept)
    if name in ("clip_cov", "stapo"):
        assert any(lo == 0 for _, lo, _, _ in selected)
    logged = [h for h in trainer.state.log_history if "forkwatch/select/grad_share" in h]
    assert len(logged) == 2  # the selection diagnostics, every step
    for h in logged:
        assert 0.0 <= h["forkwatch/select/grad_share"] <= 1.0
        assert 0.0 < h["forkwatch/select/kept_p_mean"] < 1.0
        assert h["forkwatch/select/kept_entropy_mean"] > 0.0
        assert 0.0 <= h["forkwatch/select/entropy_overlap"] <= 1.0
    if name == "high_entropy":  # the kept set IS the top-entropy set of its size
        assert all(h["forkwatch/select/entropy_overlap"] == 1.0 for h in logged)
    if name in ("kl_cov", "gppo"):  # every response token keeps its gradient
        assert all(h["forkwatch/select/grad_share"] == pytest.approx(1.0) for h in logged)
    # The steps table counts the tokens that got any gradient (every token is recorded here), not the mean weight,
    # which kept-token renormalisation pushes back towards 1.
    fractions = con.sql("SELECT step, selected_fraction FROM steps ORDER BY step").fetchall()
    for (step, fraction), (tstep, _, _, kept) in zip(fractions, selected, strict=True):
        assert step == tstep and fraction == pytest.approx(kept, abs=1e-6)


CONFIGS = {**TRL_MATRIX, "grpo": dict(loss_type="grpo")}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", ["ict", "kl_cov", "gppo", "stapo"])
def test_methods_train_under_the_configuration_matrix(make_trainer, tmp_path, name, config):
    trainer = make_trainer(max_steps=2, **CONFIGS[config])
    cb = _attach(trainer, tmp_path, name)
    trainer.train()
    assert trainer.state.global_step == 2
    assert not cb.capture.faults.faults
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("name", METHODS)
def test_methods_train_with_peft(make_trainer, tmp_path, name):
    trainer = make_trainer(max_steps=2, peft=True)
    cb = _attach(trainer, tmp_path, name)
    trainer.train()
    assert not cb.capture.faults.faults


def test_ict_with_fraction_one_trains_on_exactly_the_tokens_with_a_positive_score(make_trainer, tmp_path):
    # The percentile rule at fraction 1 keeps every token, except that a zero score (the first position, whose
    # context every rollout of the prompt shares) is never kept.
    ict = make_trainer(max_steps=2, loss_type="grpo")
    cb = _attach(ict, tmp_path, "ict", fraction=1.0, warmup_steps=0)
    ict.train()
    assert not cb.capture.faults.faults
    rows = connect(str(tmp_path / "runs")).sql("SELECT group_js, selected FROM tokens").fetchall()
    assert rows and any(js <= 1e-5 for js, _ in rows) and any(js > 1e-5 for js, _ in rows)
    assert all((selected > 0) == (js > 1e-5) for js, selected in rows)


def test_high_entropy_all_equals_trls_top_entropy_quantile_over_a_run(make_trainer, tmp_path):
    trl = make_trainer(max_steps=2, top_entropy_quantile=0.2, gradient_accumulation_steps=2,
                       per_device_train_batch_size=4)
    trl.train()
    ours = make_trainer(max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    _attach(ours, tmp_path, "high_entropy", fraction=0.2, select_options={"normalize": "all"})
    ours.train()
    for p, q in zip(_params(trl), _params(ours), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["kl_cov", "gppo"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_loss_changing_methods_through_attach_equal_the_reference_seam(make_trainer, tmp_path, name, loss_type):
    # num_iterations=2: the second pass is off-policy (r != 1), where KL-Cov's penalty and GPPO's gradient act;
    # gradient accumulation 2 exercises aggregate_like_trl's division.
    config = dict(max_steps=2, num_iterations=2, gradient_accumulation_steps=2, per_device_train_batch_size=4,
                  loss_type=loss_type)
    reference = make_trainer(**config)
    seam = Seam(reference, get_selector(name, **({"fraction": 0.1} if name == "kl_cov" else {})))
    reference.train()
    assert any(s.metrics["affected_tokens"] > 0 for s in seam.selections)
    attached = make_trainer(**config)
    cb = _attach(attached, tmp_path, name)
    attached.train()
    assert not cb.capture.faults.faults
    for p, q in zip(_params(reference), _params(attached), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    plain = make_trainer(**config)
    plain.train()  # the method must have changed the update, or the comparison above proves nothing
    assert max((p - q).abs().max() for p, q in zip(_params(plain), _params(attached), strict=True)) > 1e-5


def test_random_selection_is_reproducible_and_seeded(make_trainer, tmp_path):
    def run(seed: int, folder: str):
        trainer = make_trainer(max_steps=2)
        forkwatch.attach(trainer, log_dir=str(tmp_path / folder), run_name="r", select="random", seed=seed,
                         warmup_steps=0, record_completions_per_step=None)
        trainer.train()
        con = connect(str(tmp_path / folder))
        rows = con.sql("SELECT step, completion_id, position, selected FROM tokens ORDER BY ALL").fetchall()
        return rows, _params(trainer)

    rows_a, params_a = run(5, "a")
    rows_b, params_b = run(5, "b")
    rows_c, _ = run(6, "c")
    assert rows_a == rows_b
    assert all(torch.equal(p, q) for p, q in zip(params_a, params_b, strict=True))
    assert [r[3] for r in rows_a] != [r[3] for r in rows_c]


@pytest.mark.parametrize(
    ("name", "overrides", "match"),
    [
        ("ict", {"top_entropy_quantile": 0.2}, "top_entropy_quantile=1.0"),
        ("gppo", {"loss_type": "cispo"}, "loss_type"),
        ("kl_cov", {"loss_type": "grpo", "importance_sampling_level": "sequence"}, "importance_sampling_level"),
        ("kl_cov", {"entropy_coef": 0.01}, "entropy_coef=0.0"),
        ("gppo", {"off_policy_mask_threshold": 0.5}, "off_policy_mask_threshold=None"),
    ],
)
def test_attach_refuses_combinations_that_cannot_work(make_trainer, tmp_path, name, overrides, match):
    trainer = make_trainer(max_steps=1, **overrides)
    with pytest.raises(ValueError, match=match):
        forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), select=name)
    assert getattr(trainer, "_forkwatch", None) is None


@pytest.mark.parametrize("name", ["kl_cov", "gppo"])
def test_attach_warns_that_a_ratio_method_on_policy_is_plain_grpo(make_trainer, tmp_path, name):
    trainer = make_trainer(max_steps=1)
    with pytest.warns(UserWarning, match=f"select='{name}'.*steps_per_generation.*num_iterations > 1"):
        forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), select=name)
