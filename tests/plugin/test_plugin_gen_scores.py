"""Evidence taken during generation (plugin/gen_evidence.py): group_js equals the extra-pass scores, fork alternatives
equal a projection of the same batch; what generation cannot serve falls back (extra pass, gathered head), counted
by reason."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from forkwatch.plugin import token_math
from forkwatch.plugin.gen_evidence import extra_pass
from forkwatch.store import connect

import forkwatch

logger = logging.getLogger(__name__)


def _capture(trainer) -> list[dict]:
    """Outermost spy on the generation batch: sees `forkwatch_group_js` as the loss will, with the weights that
    generated it (no optimizer step has run yet)."""
    seen: list[dict] = []
    inner = trainer._generate_and_score_completions

    def spy(inputs):
        out = inner(inputs)
        capture = trainer._forkwatch.capture
        mask = out["completion_mask"]
        groups = torch.unique(out["forkwatch_group_id"], return_inverse=True)[1]
        hidden = extra_pass(trainer, capture.project.model, capture.backbone, out)
        with capture.project.materialised() as project:
            ref = token_math.group_js(hidden, mask, groups, project, chunk=3)
        seen.append(dict(gen=out["forkwatch_group_js"].clone(), ref=ref, mask=mask.bool(), out=dict(out)))
        return out

    trainer._generate_and_score_completions = spy
    return seen


@pytest.mark.parametrize("overrides", [
    dict(temperature=0.7),
    dict(steps_per_generation=2, max_completion_length=12),  # 16-row generation batch, longer completions
    dict(pad_to_multiple_of=16),  # TRL pads completion columns past the last decode step
    dict(peft=True),  # generate calls the base causal LM, not the PeftModel
])
def test_generation_time_group_js_equals_the_extra_pass_on_the_same_batch(make_trainer, tmp_path, overrides):
    trainer = make_trainer(max_steps=2, **overrides)
    cb = forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", group_js=True)
    seen = _capture(trainer)
    trainer.train()
    assert seen and not cb.capture.evidence.group_js_fallbacks and not cb.capture.faults.faults
    diff = max(float((s["gen"] - s["ref"]).abs().max()) for s in seen)
    logger.info("generation-time vs extra-pass group_js: max |diff| = %.3g", diff)
    assert diff < 1e-4
    assert all(bool((s["gen"][~s["mask"]] == 0).all()) for s in seen)
    assert any(float(s["gen"].max()) > 1e-3 for s in seen)  # not trivially zero


def _rollout(tokenizer):
    """A custom rollout_func: completions made without the policy's generate, so no logits reach the hook."""
    def rollout(prompts, trainer):
        prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
        completions = [tokenizer(str(i % 4) * (1 + i % 3))["input_ids"] for i in range(len(prompts))]
        return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": None}

    return rollout


def test_generation_the_hook_never_sees_falls_back_to_the_extra_pass(make_trainer, tmp_path, tokenizer):
    # steps_per_generation=2: a loss micro-batch holds half a generation batch, so the loss pass cannot score it
    trainer = make_trainer(max_steps=2, steps_per_generation=2)
    trainer.rollout_func = _rollout(tokenizer)
    cb = forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", group_js=True)
    seen = _capture(trainer)
    trainer.train()
    assert dict(cb.capture.evidence.group_js_fallbacks) == {"no_logits": 1} and not cb.capture.faults.faults
    assert dict(cb.capture.evidence.fork_fallbacks) == {"no_logits": 1}  # fork alternatives from the gathered head
    meta = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    assert meta["group_js_fallbacks"] == {"no_logits": 1}  # the counts reach run.json
    assert meta["fork_fallbacks"] == {"no_logits": 1}
    for s in seen:
        torch.testing.assert_close(s["gen"], s["ref"], atol=0, rtol=0)
    assert any(float(s["gen"].max()) > 0 for s in seen)  # siblings differ: the pass really scored them


def test_without_generation_logits_the_loss_pass_scores_group_js_from_its_own_states(make_trainer, tmp_path,
                                                                                      tokenizer):
    # one micro-batch per generation batch (the default): no extra pass, the same scores as one would give
    trainer = make_trainer(max_steps=2)
    trainer.rollout_func = _rollout(tokenizer)
    cb = forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", group_js=True,
                          record_completions_per_step=None, stat_mantissa_bits=None)
    refs = []
    inner = trainer._generate_and_score_completions

    def spy(inputs):
        out = inner(inputs)
        assert "forkwatch_group_js" not in out  # left to the loss pass
        hidden = extra_pass(trainer, cb.capture.project.model, cb.capture.backbone, out)
        groups = torch.unique(out["forkwatch_group_id"], return_inverse=True)[1]
        with cb.capture.project.materialised() as project:
            refs.append((out["forkwatch_row_id"], token_math.group_js(hidden, out["completion_mask"], groups, project)))
        return out

    trainer._generate_and_score_completions = spy
    trainer.train()
    assert dict(cb.capture.evidence.group_js_fallbacks) == {"no_logits": 2} and not cb.capture.faults.faults
    con = connect(str(tmp_path / "runs"))
    for step, (row_ids, ref) in enumerate(refs, start=1):
        got = con.execute("SELECT completion_id, position, group_js FROM tokens WHERE step = ?", [step]).fetchall()
        assert got
        index = {int(c): i for i, c in enumerate(row_ids)}
        for cid, pos, value in got:
            assert abs(value - float(ref[index[cid], pos])) < 1e-5
        assert max(v for *_, v in got) > 0


def _reference_alternatives(trainer, out: dict, k: int):
    """Top-k probabilities and sampled-token logits from one full forward of the same batch (float64 softmax)."""
    model = trainer._forkwatch.capture.project.model
    p, t = out["prompt_ids"].size(1), out["completion_ids"].size(1)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([out["prompt_ids"], out["completion_ids"]], 1),
                       attention_mask=torch.cat([out["prompt_mask"], out["completion_mask"]], 1)).logits
    z = logits[:, p - 1 : p - 1 + t].double() / trainer.temperature  # (B, T, V)
    probs = torch.softmax(z, -1)
    return probs, z, torch.topk(probs, k, -1).values


@pytest.mark.parametrize("overrides", [dict(temperature=0.7), dict(pad_to_multiple_of=16),
                                       dict(temperature=0.7, softcap=True)])
def test_generation_time_fork_alternatives_equal_a_projection_of_the_same_batch(make_trainer, tmp_path, tokenizer,
                                                                                overrides):
    overrides = dict(overrides)
    if overrides.pop("softcap", False):  # the model's own capped logits, as TRL's fused head caps them
        overrides["model"] = _softcapped_model(len(tokenizer))
    trainer = make_trainer(max_steps=1, **overrides)
    cb = forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", fork_top_k=4,
                          record_completions_per_step=None, stat_mantissa_bits=None)
    seen = _capture_alternatives(trainer)
    trainer.train()
    assert seen and not cb.capture.evidence.fork_fallbacks and not cb.capture.faults.faults
    out, (probs, z, top) = seen[0]  # the reference was projected before the first optimizer step
    mask = out["completion_mask"].bool()
    ids, alt_p, rank = out["forkwatch_alt_ids"], out["forkwatch_alt_probs"], out["forkwatch_alt_rank"]
    assert ids.shape == (*mask.shape, 4)
    torch.testing.assert_close(alt_p[mask].double(), top[mask], atol=1e-5, rtol=1e-4)
    assert bool((alt_p.sum(-1) <= 1 + 1e-5).all())
    zs = z.gather(-1, out["completion_ids"].unsqueeze(-1))  # (B, T, 1)
    # each id is among the top k (ids may swap only between near-equal probabilities)
    torch.testing.assert_close(probs.gather(-1, ids)[mask], top[mask], atol=1e-5, rtol=1e-4)
    # the sampled token's rank, up to ties within float rounding
    lo, hi = (z > zs + 1e-4).sum(-1), (z > zs - 1e-4).sum(-1)
    assert bool(((rank >= lo) & (rank <= hi))[mask].all())
    assert int(rank[mask].max()) > 0  # sampled, not argmax: ranks really vary
    assert bool((alt_p[~mask] == 0).all()) and bool((rank[~mask] == 0).all())
    # the recorded forks carry exactly these, most likely first
    forks = connect(str(tmp_path / "runs")).sql(
        "SELECT completion_id, position, sampled_rank, alt_token_ids, alt_probs FROM forks").fetchall()
    assert forks
    row_of = {int(c): i for i, c in enumerate(out["forkwatch_row_id"])}
    for cid, pos, sampled_rank, alt_ids, alt_probs in forks:
        r = row_of[cid]
        assert list(alt_ids) == ids[r, pos].tolist() and sampled_rank == int(rank[r, pos])
        want = probs[r, pos][torch.tensor(alt_ids)]
        torch.testing.assert_close(torch.tensor(alt_probs, dtype=torch.float64), want, atol=1e-5, rtol=1e-4)
        assert list(alt_probs) == sorted(alt_probs, reverse=True)


def _capture_alternatives(trainer) -> list[dict]:
    seen: list[dict] = []
    inner = trainer._generate_and_score_completions

    def spy(inputs):
        out = inner(inputs)
        copy = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        seen.append((copy, _reference_alternatives(trainer, copy, 4)))
        return out

    trainer._generate_and_score_completions = spy
    return seen


def _softcapped_model(vocab: int):
    """A tiny Gemma-2 with a small final-logit softcap, so the cap changes every distribution visibly."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=0.5,
                          pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return Gemma2ForCausalLM(config)


@pytest.mark.parametrize("arch", ["qwen2", "gemma2_softcap"])
def test_the_head_projector_gives_the_models_own_logits_over_temperature(make_trainer, tmp_path, tokenizer, arch):
    model = _softcapped_model(len(tokenizer)) if arch == "gemma2_softcap" else None
    trainer = make_trainer(max_steps=1, temperature=0.7, model=model)
    cb = forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r")
    project, backbone = cb.capture.project, cb.capture.backbone
    ids = torch.tensor([tokenizer("1+2=3")["input_ids"]])
    with torch.no_grad():
        want = project.model(input_ids=ids).logits[0].double() / 0.7  # (T, V)
        hidden = backbone(input_ids=ids).last_hidden_state[0]
    with pytest.raises(RuntimeError, match="materialised"):
        project(hidden)  # never through a weight that may be sharded
    with project.materialised():
        got = project(hidden).double()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if arch == "gemma2_softcap":
        assert float(want.abs().max()) < 0.5 / 0.7 + 1e-6  # the cap is really applied


def _scripted_generation(scorer, steps: int = 5, b: int = 4, v: int = 11, eos: int = 3):
    """Feed `scorer` a prefill and `steps - 1` decode forwards of random logits, one sampled token fed back per step
    (row 1 draws EOS at step 2); -> (completion_ids, completion_mask) as TRL would build them."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    scorer.eos = torch.tensor([eos])
    scorer.reset()
    scorer.arm()
    drawn = []
    for s in range(steps):
        z = torch.randn(b, 1 if s else 3, v, generator=g)
        kwargs = {"input_ids": drawn[-1].view(b, 1)} if s else {}
        scorer.on_forward(kwargs, SimpleNamespace(logits=z))
        tok = torch.randint(4, v, (b,), generator=g)
        if s == 2:
            tok[1] = eos
        drawn.append(tok)
    scorer.disarm()
    ids = torch.stack(drawn, 1)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0  # after its EOS
    return ids, mask


def test_scoring_steps_in_batches_equals_scoring_each_step(monkeypatch):
    from forkwatch.plugin.gen_evidence import GenScorer

    def evidence(pending_values: int):
        monkeypatch.setattr(GenScorer, "PENDING_VALUES", pending_values)
        scorer = GenScorer(temperature=0.7, num_generations=2, process_index=0, chunk=64, eos=[3], group_js=True,
                           top_k=3)
        ids, mask = _scripted_generation(scorer)
        out, reason = scorer.take(ids, mask)
        assert reason is None
        return out

    each, together, pairs = evidence(1), evidence(2**30), evidence(2 * 4 * 11)  # every step, once, every 2 steps
    for other in (together, pairs):
        for name in ("group_js", "alt_ids", "alt_probs", "sampled_rank"):
            torch.testing.assert_close(getattr(other, name), getattr(each, name), rtol=0, atol=0)
    assert each.group_js[1, 3:].abs().sum() == 0 and each.group_js[0].abs().sum() > 0  # finished row: 0 after EOS
