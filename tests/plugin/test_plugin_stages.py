"""Each stage of the plugin on its own, from plain inputs, without a trainer: the row ids, the evidence agreement over
ranks (two gloo processes), the selection seam, and the hand-off into a real writer (read back through the store).
The whole-trainer tests (test_plugin_training.py, test_plugin_records.py) show the stages together."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from forkwatch.plugin import token_math
from forkwatch.plugin.gen_evidence import EVIDENCE, FALLBACK, UNRECORDED, agreed_path
from forkwatch.plugin.handoff import HandOff
from forkwatch.plugin.selection.registry import get_selector
from forkwatch.plugin.selection.seam import (
    check_inputs,
    record_metrics,
    selection_input,
    selection_totals,
)
from forkwatch.plugin.step_data import CompletionBatch, ForkBatch, GenBatch, StepAccumulator, TokenBatch
from forkwatch.plugin.trl_seams import (
    GROUP_ID,
    GROUP_JS,
    ROWS_PER_GENERATION,
    completion_and_group_ids,
    group_of,
    rows_in_generation,
)
from forkwatch.store import RunWriter, connect
from forkwatch.store.ledger import Ledger

# ------------------------------------------------------------------------------------------------ row ids


def test_row_ids_are_unique_over_ranks_and_generations_and_name_their_group():
    b, g = 6, 3  # rows per rank, rollouts per prompt
    seen = set()
    for key in (0, 1, 7):
        for rank in (0, 1, 2):
            cid, gid = completion_and_group_ids(key, rank, b, g, "cpu")
            rows = rank * b + torch.arange(b)
            assert torch.equal(cid, key * ROWS_PER_GENERATION + rows)
            assert torch.equal(gid, key * ROWS_PER_GENERATION + group_of(rows, g))
            seen.update(cid.tolist())
    assert len(seen) == 3 * 3 * b  # no two rows of any generation on any rank share an id


def test_a_shuffled_micro_batch_finds_its_generation_rows_and_refuses_another_generations():
    b = 8
    cid, _ = completion_and_group_ids(5, 1, b, 4, "cpu")  # rank 1: global rows 8..15
    order = torch.tensor([3, 7, 0, 5])
    local, ok = rows_in_generation(cid[order], 5, 1 * b, b)
    assert ok.all() and torch.equal(local, order)
    other, _ = completion_and_group_ids(6, 1, b, 4, "cpu")  # the next generation's rows
    local, ok = rows_in_generation(torch.cat([other[:2], cid[:1]]), 5, b, b)
    assert ok.tolist() == [False, False, True] and local.min() >= 0 and local.max() < b  # clamped into range


# ------------------------------------------------------------------------------------------------ evidence agreement


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agree(rank: int, port: int, cases: list[tuple[tuple[bool, bool], tuple[bool, bool]]], out) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out.put((rank, [agreed_path(*case[rank], world=2) for case in cases]))
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_agree_on_the_weakest_evidence_path():
    # per case, per rank: (has generation's own evidence, took the batch's facts without a fault)
    cases = [
        ((True, True), (True, True)),  # both have evidence: generation's own
        ((True, True), (False, True)),  # rank 1 needs the fallback: both take it (its gathers are collectives)
        ((True, True), (False, False)),  # rank 1 failed: no rank records the batch
        ((False, True), (False, False)),
    ]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_agree, args=(_free_port(), cases, out), nprocs=2, join=True, start_method="spawn")
    got = dict(out.get() for _ in range(2))
    assert got[0] == got[1] == [EVIDENCE, FALLBACK, UNRECORDED, UNRECORDED]
    assert agreed_path(True, True, world=1) == EVIDENCE and agreed_path(False, True, world=1) == FALLBACK  # alone


# ------------------------------------------------------------------------------------------------ the selection seam


def _micro_batch(seed: int = 0, b: int = 4, t: int = 6):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t)
    mask[1, 4:] = 0
    inputs = {
        "advantages": torch.tensor([1.0, -0.5, 0.0, 2.0]),
        GROUP_ID: torch.tensor([0, 0, 1, 1]),
        GROUP_JS: torch.rand(b, t, generator=g) * mask,
        "prompt_ids": torch.zeros(b, 2, dtype=torch.long),
        "completion_ids": torch.randint(0, 9, (b, t), generator=g),
    }
    logprob = -torch.rand(b, t, generator=g).requires_grad_(True)
    return inputs, logprob, torch.rand(b, t, generator=g) * 3, mask


def test_the_seam_builds_the_selectors_input_from_trls_micro_batch():
    inputs, logprob, entropy, mask = _micro_batch()
    gen = torch.Generator().manual_seed(0)
    inp = selection_input(inputs, logprob, entropy, mask, step=12, generator=gen, epsilon_low=0.2, epsilon_high=0.28,
                          loss_type="grpo")
    assert inp.logprob is logprob and inp.old_logprob.requires_grad is False  # on-policy: TRL's own old log-probs
    assert torch.equal(inp.old_logprob, logprob.detach()) and inp.step == 12 and inp.group_js is inputs[GROUP_JS]
    inputs["old_per_token_logps"] = logprob.detach() - 0.1  # off-policy: TRL's old-logprob pass is used
    inp = selection_input(inputs, logprob, entropy, mask, step=12, generator=gen, epsilon_low=0.2, epsilon_high=0.28,
                          loss_type="grpo")
    assert torch.equal(inp.old_logprob, inputs["old_per_token_logps"])
    chosen = get_selector("ict", warmup_steps=0, fraction=0.5)(inp)
    # ICT keeps ceil(0.5 n_i) tokens of each completion (all scores are positive here), weights n_i / k_i
    n = mask.sum(1)
    assert ((chosen.weights != 0).sum(1).float() == torch.ceil(0.5 * n)).all()
    torch.testing.assert_close(chosen.weights.sum(1), n)


def test_the_seam_stops_training_when_the_selection_cannot_be_computed():
    inputs, logprob, _, _ = _micro_batch()
    ict = get_selector("ict", warmup_steps=0)
    with pytest.raises(RuntimeError, match="loss pass was not captured"):
        check_inputs(ict, "ict", inputs, None, {})
    del inputs[GROUP_JS]
    with pytest.raises(RuntimeError, match="group_js, which is missing.*not computed"):
        check_inputs(ict, "ict", inputs, logprob, {})
    check_inputs(get_selector("high_entropy"), "high_entropy", inputs, logprob, {})  # needs no group_js


def test_selection_totals_count_kept_tokens_and_the_gradient_they_carry():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([0.0, -2.0])
    weights = torch.tensor([[3.0, 0.0, 5.0], [0.0, 0.5, 0.0]])  # (0, 2) is off the mask: not kept
    assert selection_totals(weights, mask, adv).tolist() == [2.0, 0.5 * 2.0, 3 * 2.0]
    # kept only where the advantage is 0: tokens kept, no gradient, while the dense step has some
    assert selection_totals(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), mask, adv).tolist() == [2.0, 0.0, 6.0]


def test_the_seams_metrics_are_the_selectors_and_the_diagnostics_of_its_weights():
    inputs, logprob, entropy, mask = _micro_batch()
    inp = selection_input(inputs, logprob, entropy, mask, step=0, generator=torch.Generator(), epsilon_low=0.2,
                          epsilon_high=0.28, loss_type="grpo")
    renyi2 = entropy * 0.7
    weights = (mask > 0) & (entropy > 1.5)
    sink: dict[str, list[float]] = {}
    record_metrics(sink, {"threshold": torch.tensor(1.5), "warmup": 0.0}, weights.float(), inp, renyi2)
    record_metrics(sink, {"threshold": 2.0}, weights.float(), inp, renyi2)
    want = token_math.selection_diagnostics(weights.float(), mask, logprob.detach(), entropy, renyi2,
                                            inputs["advantages"]).tolist()
    assert sink["threshold"] == [1.5, 2.0] and sink["warmup"] == [0.0]
    for name, value in zip(token_math.DIAGNOSTICS, want, strict=True):
        assert sink[name] == [pytest.approx(value)] * 2


# ------------------------------------------------------------------------------------------------ the hand-off


def _step(step: int, tokenizer, seed: int) -> StepAccumulator:
    """One step's captures as the loss pass leaves them: one micro-batch of 4 completions, 2 recorded."""
    g = torch.Generator().manual_seed(seed)
    b, t = 4, 5
    ids = torch.randint(5, 20, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[2, 3:] = False
    cid, gid = completion_and_group_ids(step, 0, b, 2, "cpu")
    gen = GenBatch(key=step, offset=0, completion_id=cid, group_id=gid, reward=torch.tensor([1.0, 0.0, 0.5, 0.5]),
                   rewards=torch.tensor([[1.0], [0.0], [0.5], [0.5]]), advantage=torch.tensor([0.7, -0.7, 0.0, 0.0]),
                   length=torch.tensor([5, 5, 3, 5]), truncated=torch.tensor([True, True, False, True]),
                   sampled=torch.tensor([True, False, True, False]), recorded=torch.zeros(b, dtype=torch.bool),
                   prompt_ids=torch.tensor([[tokenizer.convert_tokens_to_ids("1")] * 2] * b),
                   prompt_mask=torch.ones(b, 2, dtype=torch.long), completion_ids=ids)
    entropy = torch.rand(b, t, generator=g) * 2
    take = torch.tensor([True, False, True, False]).unsqueeze(1) & mask
    tokens = TokenBatch(take=take, logprob=-torch.rand(b, t, generator=g), entropy=entropy, renyi2=entropy * 0.8,
                        group_js=None, selected=None, is_fork=entropy > 1.5, advantages=gen.advantage, mask=mask,
                        completion_id=cid, token_id=ids)
    acc = StepAccumulator()
    acc.add(entropy=entropy[mask], renyi2=(entropy * 0.8)[mask], rewards=gen.reward, lengths=gen.length,
            truncated=gen.truncated, n_forks=tokens.is_fork.sum().view(1), n_selected=mask.sum().view(1))
    rows = torch.tensor([0, 2])
    acc.completions.append(CompletionBatch(gen=gen, gen_rows=rows, idx=rows, entropy=entropy, mask=mask,
                                           reward_names=("r",)))
    acc.tokens.append(tokens)
    row, pos = (tokens.is_fork & take).nonzero().unbind(1)
    acc.forks.append(ForkBatch(completion_id=cid[row], position=pos, sampled_rank=torch.zeros_like(pos),
                               alt_token_ids=ids[row, pos].unsqueeze(1).repeat(1, 2),
                               alt_probs=torch.full((len(pos), 2), 0.4)))
    return acc


def test_the_hand_off_writes_the_steps_rows_and_every_recorded_row_at_once(tmp_path, tokenizer):
    writer = RunWriter(str(tmp_path), "r", stat_mantissa_bits=None, ledger=Ledger())
    handoff = HandOff(writer, ledger=writer.ledger, rank=0, tokenizer=tokenizer, interval_s=3600.0, max_rows=10**6,
                      select_method=None)
    accs = [_step(s, tokenizer, seed=s) for s in (1, 2)]
    for s, acc in zip((1, 2), accs, strict=True):
        scalars = handoff.add(s, acc, [acc.collect()])
        assert scalars["n_completions"] == 4 and 0 < scalars["entropy_mean"] < 2
        assert not handoff.due()  # an hour between hand-offs: both steps wait
    assert handoff.run() == []  # no health flag on two healthy rows
    writer.close()
    con = connect(str(tmp_path))
    assert con.sql("SELECT step, n_tokens FROM steps ORDER BY step").fetchall() == [(1, 18), (2, 18)]
    toks = con.sql("SELECT step, completion_id, position, token_id, entropy, renyi2, covariance, selected, group_js "
                   "FROM tokens ORDER BY step, completion_id, position").df()
    assert len(toks) == 2 * (5 + 3)  # the recorded rows' response tokens
    assert toks["selected"].eq(1.0).all() and toks["group_js"].isna().all()  # nothing selects; group_js not computed
    for s, acc in zip((1, 2), accs, strict=True):
        tb = acc.tokens[0]
        want = token_math.covariance(tb.logprob, tb.advantages, tb.mask)[tb.take].numpy()
        np.testing.assert_allclose(toks[toks.step == s]["covariance"].to_numpy(), want, rtol=1e-6)
    comps = con.sql("SELECT step, completion, length, reward FROM completions ORDER BY step, completion_id").fetchall()
    assert [c[0] for c in comps] == [1, 1, 2, 2] and [c[2] for c in comps] == [5, 3] * 2
    gen = accs[0].completions[0].gen
    assert comps[0][1] == tokenizer.decode(gen.completion_ids[0].tolist(), skip_special_tokens=True)
    n_forks = sum(len(a.forks[0].position) for a in accs)
    assert con.sql("SELECT count(*) FROM forks").fetchall()[0][0] == n_forks


def test_a_hand_off_is_due_at_once_with_no_interval_and_at_the_row_budget(tmp_path, tokenizer):
    writer = RunWriter(str(tmp_path), "r", ledger=Ledger())
    now = HandOff(writer, ledger=writer.ledger, rank=0, tokenizer=tokenizer, interval_s=0.0, max_rows=10**6,
                  select_method=None)
    now.add(1, _step(1, tokenizer, 1))
    assert now.due()
    full = HandOff(writer, ledger=writer.ledger, rank=0, tokenizer=tokenizer, interval_s=3600.0, max_rows=20,
                   select_method=None)
    full.add(1, _step(1, tokenizer, 1))  # 20 token slots waiting (4 x 5): the writer's queue budget is reached
    assert full.due()
    writer.close()
