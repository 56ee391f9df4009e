"""forkwatch on the installed TRL release. `make test-trl` runs this file, with the plugin's training tests, in one
venv per tested release (TRL 1.14.2, 1.15.0, 1.16.0; transformers 4.57 and 5.x); `make test` runs it on the release
pyproject's dev install gives. What it shows on each: which way the loss pass is read (plugin/trl_seams.py), the
recorded log-prob, entropy and Rényi-2 against a float64 recomputation from the same tiny model (so the releases'
records agree with each other to float tolerance), the refusals at attach that name what is missing, and a
2-process FSDP2 run. With FORKWATCH_TRL_REPORT set, the float64 comparison appends one JSON line to that file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import trl
from forkwatch.plugin import trl_seams
from forkwatch.store import connect
from trl import GRPOTrainer
from trl.trainer import utils

import forkwatch

LOSS_PATH = "fused" if hasattr(utils, "add_fused_lm_head") else "logits"
CANNOT_TRAIN = trl_seams.fused_head_problem("cpu")  # the tests train on the CPU
needs_training = pytest.mark.skipif(CANNOT_TRAIN is not None, reason=f"TRL cannot train here: {CANNOT_TRAIN}")


@needs_training
def test_records_equal_a_float64_recomputation_on_this_trl(make_trainer, tmp_path, tokenizer):
    # lr=0: the weights after training are the ones the loss pass saw
    trainer = make_trainer(max_steps=1, learning_rate=0.0, temperature=0.7)
    cb = forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", stat_mantissa_bits=None,
                          record_completions_per_step=None)
    trainer.train()
    assert cb.loss_path == LOSS_PATH and not cb.capture.faults.faults
    meta = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    assert meta["loss_pass"] == LOSS_PATH and meta["trl_version"] == trl.__version__
    con = connect(str(tmp_path / "runs"))
    model = trainer.model.double().eval()
    err = dict.fromkeys(("logprob", "entropy", "renyi2"), 0.0)
    n = 0
    for cid, prompt in con.sql("SELECT completion_id, prompt FROM completions").fetchall():
        rows = con.execute("SELECT token_id, logprob, entropy, renyi2 FROM tokens WHERE completion_id = ? "
                           "ORDER BY position", [cid]).fetchall()
        p_ids = tokenizer(prompt)["input_ids"]
        ids = torch.tensor([p_ids + [r[0] for r in rows]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p_ids) - 1 : -1].double() / 0.7, -1)  # (T, V)
        want = {"logprob": logp.gather(1, ids[0, len(p_ids) :, None]).squeeze(1),
                "entropy": -(logp.exp() * logp).sum(-1), "renyi2": -torch.logsumexp(2 * logp, -1)}
        for i, name in enumerate(("logprob", "entropy", "renyi2"), start=1):
            got = torch.tensor([r[i] for r in rows], dtype=torch.float64)
            err[name] = max(err[name], float((got - want[name]).abs().max()))
        n += len(rows)
    assert n > 0 and max(err.values()) < 1e-4, err
    report = os.environ.get("FORKWATCH_TRL_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(json.dumps({"trl": trl.__version__, "transformers": transformers.__version__,
                                "loss_pass": LOSS_PATH, "tokens": n, "max_abs_error": err}) + "\n")


def test_a_trl_without_an_internal_is_refused_naming_it_and_the_tested_range(make_trainer, tmp_path, monkeypatch):
    trainer = make_trainer(max_steps=1)
    monkeypatch.delattr(GRPOTrainer, "_generate_single_turn")  # as a TRL release that renamed it would be
    with pytest.raises(ValueError, match=r"lacks \['_generate_single_turn'\].*tested with trl>=1\.14\.2,<1\.17\.0"):
        forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"))
    assert getattr(trainer, "_forkwatch", None) is None and "_compute_loss" not in trainer.__dict__  # nothing installed


@needs_training
def test_a_newer_trl_with_every_internal_gets_a_warning_not_a_refusal(make_trainer, tmp_path, monkeypatch):
    trainer = make_trainer(max_steps=1)
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.warns(UserWarning, match=r"tested with trl>=1\.14\.2,<1\.17\.0; trl 1\.17\.0 has every internal"):
        forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r")
    trainer.train()
    assert connect(str(tmp_path / "runs")).sql("SELECT count(*) FROM tokens").fetchall()[0][0] > 0


@pytest.mark.skipif(LOSS_PATH != "fused" or CANNOT_TRAIN is not None, reason="a TRL whose fused head runs here")
def test_a_fused_head_without_its_kernel_is_refused_at_attach(make_trainer, tmp_path, monkeypatch):
    trainer = make_trainer(max_steps=1)
    monkeypatch.setattr(utils, "_ChunkedLogProbFunction", None, raising=False)  # TRL 1.15 without Triton
    with pytest.raises(ValueError, match=r"fused LM head .* cannot run here: its kernel module trl\.kernels needs "
                                         r"Triton.*GRPOTrainer itself would fail"):
        forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"))


@pytest.mark.skipif(CANNOT_TRAIN is None, reason="this TRL's own loss pass runs here")
def test_a_trl_that_cannot_compute_its_own_loss_here_is_refused_and_fails_without_forkwatch(make_trainer, tmp_path):
    """TRL 1.15 without Triton: GRPOTrainer itself fails at its first loss pass; forkwatch says so at attach."""
    with pytest.raises(ValueError, match=r"cannot run here.*with or without forkwatch"):
        forkwatch.attach(make_trainer(max_steps=1), log_dir=str(tmp_path / "runs"))
    plain = make_trainer(max_steps=1)
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'apply'"):
        plain.train()


@needs_training
@pytest.mark.skipif(not os.environ.get("FORKWATCH_TRL_REPORT"), reason="make test-trl's sharded configuration; in "
                    "make test, tests/plugin/test_sharded_training.py runs FSDP2 beside DDP and ZeRO-3")
@pytest.mark.timeout(600)
def test_two_fsdp2_processes_record_one_run_on_this_trl(tmp_path):
    """The sharded configuration of the matrix: FSDP2 (accelerate 1.15's wrap) on 2 gloo processes, monitoring and
    ICT, as tests/plugin/test_sharded_training.py runs it beside DDP and ZeRO-3."""
    script = Path(__file__).parents[1] / "sharded_run.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29631", str(script), str(tmp_path), "fsdp2", "monitor,ict"],
                          capture_output=True, text=True, timeout=560, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    con = connect(str(tmp_path / "runs"))
    for config in ("monitor", "ict"):
        for rank in (0, 1):
            r = json.loads((tmp_path / f"fsdp2-{config}-rank{rank}.json").read_text())
            assert r["faults"] == {} and r["head_sharded"] and len(r["curve"]) == 2, (config, rank, r)
        (steps, ranks) = con.execute("SELECT count(DISTINCT step), count(DISTINCT rank) FROM completions "
                                     "WHERE run_id = ?", [f"fsdp2-{config}"]).fetchone()
        assert steps == 2 and ranks == 2
    selected = con.execute("SELECT min(selected_fraction) FROM steps WHERE run_id = 'fsdp2-ict'").fetchone()[0]
    assert 0 < selected < 1  # ICT trained on a selection under FSDP2
