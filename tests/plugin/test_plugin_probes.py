"""plugin/lenses.py's probes on a tiny causal LM: teacher-forced scores line up with a direct full forward."""

from __future__ import annotations

import math

import pytest
import torch
from forkwatch.demo.tiny import char_tokenizer, tiny_model
from forkwatch.plugin.lenses import Probe, encode_probes, probe_from_row, score_probes
from forkwatch.plugin.token_math import teacher_forced as probe_scores


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok), hidden=32, layers=1, seed=3)


def test_scores_are_the_next_token_distributions_of_the_completion(tok, model):
    probes = encode_probes([("2+3=", "5."), ("7*6=", "42")], tok)
    cols = score_probes(model, probes, step=4, temperature=0.8, k=3, device="cpu")
    assert cols["probe_id"] == [0, 0, 1, 1] and cols["position"] == [0, 1, 0, 1] and set(cols["step"]) == {4}
    for i, probe in enumerate(probes):
        ids = torch.tensor([probe.prompt_ids + probe.completion_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double() / 0.8  # (L, V)
        p_len = len(probe.prompt_ids)
        for t, y in enumerate(probe.completion_ids):
            p = torch.softmax(logits[p_len - 1 + t], -1)
            row = 2 * i + t
            assert cols["token_id"][row] == y
            assert cols["logprob"][row] == pytest.approx(float(p[y].log()), abs=1e-5)
            assert cols["entropy"][row] == pytest.approx(float(-(p * p.log()).sum()), abs=1e-5)
            assert cols["renyi2"][row] == pytest.approx(float(-(p**2).sum().log()), abs=1e-5)
            assert cols["top_ids"][row] == torch.topk(p, 3).indices.tolist()


def test_training_mode_is_restored_and_no_gradient_is_built(tok, model):
    model.train()
    probes = encode_probes([("1+1=", "2")], tok)
    cols = score_probes(model, probes, step=0, temperature=1.0, k=2, device="cpu")
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(math.isfinite(x) for x in cols["entropy"])


def test_empty_probe_text_is_refused_naming_the_fix(tok):
    with pytest.raises(ValueError, match="non-empty"):
        encode_probes([("2+2=", "")], tok)


def test_probe_from_row_drops_left_padding_and_tokens_after_the_length():
    probe = probe_from_row(3, torch.tensor([0, 0, 7, 8]), torch.tensor([0, 0, 1, 1]), torch.tensor([5, 6, 2, 0]), 3)
    assert probe == Probe(3, (7, 8), (5, 6, 2))
    assert probe_from_row(0, torch.tensor([7]), torch.tensor([1]), torch.tensor([0]), 0) is None


def test_meta_names_the_probe_text(tok):
    probe = encode_probes([("2+3=", "5")], tok)[0]
    assert probe.to_meta(tok) == {"probe_id": 0, "prompt_tokens": 4, "completion_tokens": 1, "prompt": "2+3=",
                                  "completion": "5"}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("groups", [[4], [2, 2]], ids=["one_forward", "bounded"])
def test_padded_forwards_score_what_one_forward_per_probe_does(tok, arch, groups, monkeypatch):
    # probes of different prompt and completion lengths share padded forwards (one, or as many as the bound on their
    # logits needs): each gets the scores of its own unpadded forward (the padding is masked, the positions count
    # from its first token), up to float32 rounding of the batched matmuls (about one ulp), far inside the tolerance
    # the float64 checks above use
    from forkwatch.plugin import lenses as probes_module

    model = tiny_model(len(tok), seed=7, arch=arch)
    probes = encode_probes([("2+3=", "5."), ("17*6=", "102"), ("1=", "1"), ("9-4=", "5.")], tok)
    if groups != [4]:
        monkeypatch.setattr(probes_module, "BATCH_LOGITS", 8 * len(tok))  # logits widths 3, 4, 2, 3: 2 x 4, 2 x 3
    assert [len(g) for g in probes_module._groups(probes, len(tok))] == groups
    cols = score_probes(model, probes, step=1, temperature=0.7, k=4, device="cpu")
    assert cols["probe_id"] == [0, 0, 1, 1, 1, 2, 3, 3] and cols["position"] == [0, 1, 0, 1, 2, 0, 0, 1]
    for i, probe in enumerate(probes):
        ids = torch.tensor([probe.prompt_ids + probe.completion_ids])
        t = len(probe.completion_ids)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=t + 1).logits[0, :-1]
        want = probe_scores(logits, ids[0, -t:], temperature=0.7, k=4)
        rows = [r for r, pid in enumerate(cols["probe_id"]) if pid == i]
        assert [cols["token_id"][r] for r in rows] == list(probe.completion_ids)
        assert [cols["top_ids"][r] for r in rows] == want.top_ids.tolist()
        for name in ("logprob", "entropy", "renyi2", "top_probs"):
            got = torch.tensor([cols[name][r] for r in rows])
            torch.testing.assert_close(got, getattr(want, name), rtol=1e-6, atol=1e-6)
