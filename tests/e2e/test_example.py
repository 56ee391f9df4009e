"""examples/attach_to_trl.py: the README's TRL script runs unchanged on a local tiny model folder (no network)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from forkwatch.store import connect

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "attach_to_trl.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("attach_to_trl", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A tiny Qwen2-style model and char tokenizer saved like a Hub checkpoint."""
    from forkwatch.demo.tiny import char_tokenizer, tiny_model

    path = tmp_path / "tiny-model"
    tok = char_tokenizer()
    tiny_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_load_tokenizer_keeps_a_saved_char_tokenizer(example, model_dir):
    tok = example.load_tokenizer(str(model_dir))
    text = "What is 12 + 30?"
    assert tok.decode(tok(text)["input_ids"]) == text  # AutoTokenizer would have dropped the spaces


def test_arithmetic_reward_checks_the_last_number(example):
    completions = ["12 + 30 = 42, so 42", "it is 41", [{"role": "assistant", "content": "answer: 42."}], "none"]
    assert example.arithmetic_reward(completions, answer=["42"] * 4) == [1.0, 0.0, 1.0, 0.0]


def test_example_script_trains_and_records_with_a_local_model(example, model_dir, tmp_path):
    log_dir = tmp_path / "runs"
    trainer = example.main([
        "--model", str(model_dir), "--log-dir", str(log_dir), "--run-name", "example", "--select", "ict",
        "--max-steps", "2", "--batch-size", "8", "--num-generations", "4", "--max-completion-length", "8",
        "--learning-rate", "1e-3", "--output-dir", str(tmp_path / "trl"),
    ])  # fmt: skip
    assert trainer.state.global_step == 2
    meta = json.loads((log_dir / "example" / "run.json").read_text())
    assert meta["status"] == "finished" and meta["config"]["select"] == "ict"
    con = connect(log_dir)
    steps = con.sql("SELECT step, select_method FROM steps ORDER BY step").fetchall()
    assert steps == [(1, "ict"), (2, "ict")]
    assert con.sql("SELECT count(*) FROM completions").fetchall()[0][0] > 0
