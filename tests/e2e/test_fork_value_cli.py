"""`forkwatch forkvalue LOG_DIR/RUN --model CHECKPOINT --reward module:function`: on a real tiny GRPO run recorded by
forkwatch and its saved checkpoint, the fork_values table is written into the run (and nothing else of it changes);
input it cannot use is refused with one line naming the fix."""

from __future__ import annotations

import json

import pytest
from forkwatch.store import connect
from forkwatch.store.fork_values import fork_value_positions

import forkwatch
from forkwatch.cli import main

REWARDS = ["--reward", "conftest:digit_reward", "--reward", "conftest:length_reward"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two GRPO steps recorded by forkwatch ("r"), one run without token records ("bare"), and the checkpoint."""
    from conftest import PROMPTS, digit_reward, length_reward, tiny_grpo_config
    from datasets import Dataset
    from forkwatch.demo.tiny import char_tokenizer, tiny_model
    from trl import GRPOTrainer

    root = tmp_path_factory.mktemp("forkvalue")
    for name, options in (("r", {}), ("bare", {"record_tokens": False})):
        tok = char_tokenizer()
        trainer = GRPOTrainer(model=tiny_model(len(tok), seed=0), args=tiny_grpo_config(str(root / f"out-{name}")),
                              reward_funcs=[digit_reward, length_reward],
                              train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tok)
        forkwatch.attach(trainer, log_dir=str(root / "runs"), run_name=name, **options)
        trainer.train()
    trainer.model.save_pretrained(root / "ckpt")
    tok.save_pretrained(root / "ckpt")
    return root


def test_forkvalue_writes_the_fork_values_table_into_the_run(run, capsys):
    log_dir = run / "runs"
    before = json.loads((log_dir / "r" / "run.json").read_text())
    code = main(["forkvalue", str(log_dir / "r"), "--model", str(run / "ckpt"), *REWARDS, "--steps", "1", "2",
                 "--positions", "6", "--branches", "2", "--rollouts", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "step 1: 6 of" in out and "step 2: 6 of" in out and "wrote" in out
    assert "temperature 1.0 (run.json)" in out and "top_p 1.0 (run.json)" in out and "min_p None (default)" in out
    con = connect(log_dir)
    positions = fork_value_positions(con, "r")
    assert sorted(positions.groupby("step").size().to_dict().items()) == [(1, 6), (2, 6)]
    assert positions["inclusion_prob"].between(0, 1, inclusive="right").all()
    assert set(positions["stratum"]) <= {"fork", "other"}
    assert (positions["source"] == str(run / "ckpt")).all() and positions["measurement"].nunique() == 1
    rows = con.execute("SELECT branch, count(*) FROM fork_values WHERE run_id = 'r' GROUP BY ALL").fetchall()
    assert dict(rows)["sampled"] == 12
    assert con.execute("SELECT count(*) FROM fork_values WHERE branch = 'sampled' AND n <> 2").fetchone()[0] == 0
    after = json.loads((log_dir / "r" / "run.json").read_text())
    assert after == before  # run.json is training's: the offline writer keeps to its own rank's file


def test_forkvalue_refuses_a_missing_checkpoint(run, capsys):
    assert main(["forkvalue", str(run / "runs" / "r"), "--model", str(run / "nowhere"), *REWARDS]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err


def test_forkvalue_refuses_a_reward_that_does_not_import(run, capsys):
    code = main(["forkvalue", str(run / "runs" / "r"), "--model", str(run / "ckpt"), "--reward", "no_such_mod:f"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot import no_such_mod" in err and err[-1] == "\n" and err.count("\n") == 1


def test_forkvalue_refuses_a_run_without_recorded_tokens(run, capsys):
    assert main(["forkvalue", str(run / "runs" / "bare"), "--model", str(run / "ckpt"), *REWARDS]) == 2
    assert "has no recorded tokens" in capsys.readouterr().err


def test_a_chat_prompt_is_rebuilt_from_its_stored_text_through_the_template():
    from forkwatch.demo.tiny import char_tokenizer
    from forkwatch.plugin.fork_value_offline import ForkValueRunError, rebuild_prompt

    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}:{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    messages = [{"role": "user", "content": "Is 3+2=5?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    stored = tok.decode(ids, skip_special_tokens=True)  # what the run recorded: the special tokens are gone
    assert stored == "user:Is 3+2=5?assistant:"
    rebuilt_ids, prompt = rebuild_prompt(stored, tok)
    assert list(rebuilt_ids) == list(ids) and prompt == messages
    plain_ids, plain = rebuild_prompt("1+2=", char_tokenizer())  # a plain prompt: the tokenizer's own tokens
    assert plain == "1+2=" and list(plain_ids) == char_tokenizer()("1+2=")["input_ids"]
    with pytest.raises(ForkValueRunError, match="cannot rebuild"):
        rebuild_prompt("1+2=é", char_tokenizer())  # a character the tokenizer does not know
