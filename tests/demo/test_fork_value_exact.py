"""The Monte Carlo fork value against the exact one, on the demo task (demo/task.py, demo/exact_q.py).

The model: the demo's Qwen2-style tiny model (demo/tiny.py), warmed up here in ~150 supervised steps on three fixed
prompts (the demo's own warm-up learns every prompt in 1,500 steps, minutes on a CPU: too slow for the suite). It
writes the items of those prompts in any order, both spellings, and the habit; it is near-certain at forced tokens and
uncertain at decisions and cosmetic forks, like the demo's. Positions: every on-path position after the second name
of 18 sampled completions (decisions, cosmetic forks, confident-consequential and forced tokens, mistakes), where the
correct continuations are few enough to enumerate (demo/exact_q.py, eps = 1e-4, paths that left every correct
completion closed at reward 0).

One measurement rolls out 32 continuations per branch; its rewards are cut into independent estimates of m = 4, 8
and 16 rollouts, each estimated exactly as `measure` does (plugin/fork_value_stats.py). Checked for each m: Q is
unbiased and V within its SE of the exact value on average; the fork value's bias is within its standard error; and
the stated 95 % intervals of Q, V and the fork value cover the exact values at least at their nominal rate.
`pytest tests/demo/test_fork_value_exact.py -s` prints the measured bias and coverage (docs/methods.md quotes them).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from forkwatch.demo import task
from forkwatch.demo.exact_q import exact_q
from forkwatch.demo.tiny import char_tokenizer, tiny_model
from forkwatch.demo.warmup import _batch as supervised_batch
from forkwatch.plugin.fork_value import ForkValueSettings, Position, RewardFunctions, Sampling, measure
from forkwatch.plugin.fork_value_stats import Z95, estimate_position, fork_value, weights

KEYS = ("crhtb", "tkcfo", "rhobf")  # two-name items (c, t) and the habit's raven + heron
ROLLOUTS = 32


def _warm_up(steps: int = 150, seed: int = 0):
    """Supervised steps on written-out solutions of the KEYS prompts (any order, either spelling, the habit)."""
    tok = char_tokenizer(task.CHARS)
    model = tiny_model(len(tok), hidden=64, layers=2, heads=4, kv_heads=2, max_positions=64, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed)
    problems = [task.problem(k) for k in KEYS]
    before, name, habit, rate = task.HABIT
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            pairs = []
            for _ in range(32):
                p = rng.choice(problems)
                names = [rng.choice(task.NAMES[k]) for k in rng.sample(p.keys, len(p.keys))]
                names = [habit if w == name and i and names[i - 1] == before and rng.random() < rate else w
                         for i, w in enumerate(names)]
                pairs.append((p.prompt, task.SEP.join(names)))
            loss = model(**supervised_batch(pairs, tok)).loss  # the demo's own batching (prompt masked, EOS added)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval(), tok


@pytest.fixture(scope="module")
def case():
    model, tok = _warm_up()
    sampling = Sampling.from_settings({"max_completion_length": task.MAX_COMPLETION_CHARS + 3}, model=model,
                                      tokenizer=tok)
    problems = [task.problem(k) for k in KEYS]
    prompts = [tok(p.prompt)["input_ids"] for p in problems]
    ids = torch.tensor([p for p in prompts for _ in range(6)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=sampling.generation_config(sampling.max_completion_length))
    positions = []
    for i, row in enumerate(out):
        p, prompt_ids = problems[i // 6], prompts[i // 6]
        c = row[len(prompt_ids):].tolist()
        c = c[: c.index(tok.eos_token_id) + 1] if tok.eos_token_id in c else c
        text = tok.decode(c, skip_special_tokens=True)
        roles = task.roles(p.prompt, text, len(c))
        commas = [k for k, ch in enumerate(text) if ch == task.SEP]
        for pos in range(commas[1] + 1 if len(commas) >= 2 else len(c), len(c)):
            if roles[pos] != "off_path":
                positions.append(Position(tuple(prompt_ids), tuple(c), pos, p.prompt, stratum=roles[pos]))
    settings = ForkValueSettings(branches=3, rollouts=ROLLOUTS, other_mass=1.0, reward_range=(0.0, 1.0))
    m = measure(model, tok, positions, sampling=sampling, rewards=RewardFunctions.of([task.reward_fn]),
                settings=settings, seed=0)

    # the exact Q of every branch measured
    jobs, k = [], 0  # (position, branch token), in the order of the measurement's rows
    for i, e in enumerate(m.estimates):
        jobs += [(i, t) for t in m.columns["branch_token_id"][k: k + len(e.branches.q)]]
        k += len(e.branches.q)
    starts = [[*positions[i].prompt_ids, *positions[i].completion_ids[: positions[i].position], t] for i, t in jobs]
    budgets = [0 if t in sampling.eos_token_ids else sampling.max_completion_length - positions[i].position - 1
               for i, t in jobs]

    def text_of(j: int, tail: list[int]) -> str:
        i, t = jobs[j]
        return tok.decode([*positions[i].completion_ids[: positions[i].position], t, *tail], skip_special_tokens=True)

    def reward(js, tails):
        return np.array([task.score(positions[jobs[j][0]].prompt, text_of(j, t)) for j, t in zip(js, tails)])

    def settled(js, tails):  # a prefix that left every correct completion earns 0 whatever follows
        return np.array([0.0 if not task.valid_next(positions[jobs[j][0]].prompt, text_of(j, t)) else np.nan
                         for j, t in zip(js, tails)])

    ex = exact_q(model, starts, budgets, sampling=sampling, reward=reward, settled=settled, reward_range=(0.0, 1.0),
                 eps=1e-4)
    q_exact, q_err, k = [], [], 0
    for e in m.estimates:
        n = len(e.branches.q)
        q_exact.append(ex.q[k: k + n])
        q_err.append(ex.error[k: k + n])
        k += n
    return {"m": m, "positions": positions, "q": q_exact, "err": q_err}


def _chunked(case, m: int) -> dict[str, np.ndarray]:
    """Estimates from independent chunks of m rollouts, next to the exact values."""
    rng = np.random.default_rng(m)
    out = {k: [] for k in ("dq", "q_err", "q_cover", "q_trivial", "dv", "v_err", "v_cover", "dvalue", "value_se",
                           "value_cover")}
    for pi, rewards, qx, err in zip(case["m"].pi, case["m"].rewards, case["q"], case["err"], strict=True):
        w = weights(pi)
        vx, valx = float((w * qx).sum()), float(fork_value(w, qx))
        v_err, val_err = float((w * err).sum()), 2 * float((w * err).sum())  # the enumeration's own bound
        for c in range(ROLLOUTS // m):
            e = estimate_position(pi, rewards[:, c * m: (c + 1) * m], sampled=0, reward_range=(0.0, 1.0), rng=rng)
            out["dq"] += (e.branches.q - qx).tolist()
            out["q_err"] += err.tolist()
            out["q_cover"] += ((e.branches.lo <= qx + err) & (e.branches.hi >= qx - err)).tolist()
            out["q_trivial"] += ((qx < 0.02) | (qx > 0.98)).tolist()
            out["dv"].append(e.v - vx)
            out["v_err"].append(v_err)
            out["v_cover"].append(e.v_lo - v_err <= vx <= e.v_hi + v_err)
            out["dvalue"].append(e.value - valx)
            out["value_se"].append(e.value_se)
            out["value_cover"].append(abs(e.value - valx) <= Z95 * e.value_se + val_err)
    return {k: np.asarray(v) for k, v in out.items()}


def _at_least_nominal(cover: np.ndarray) -> bool:
    return cover.mean() >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / cover.size)


def test_the_case_covers_every_role_and_the_enumeration_is_tight(case):
    err = np.concatenate(case["err"])
    print(f"\n{len(case['positions'])} positions, {err.size} branches; exact Q to within {err.max():.4f} "
          f"(mean {err.mean():.4f})")
    roles = {p.stratum for p in case["positions"]}
    assert {"decision", "cosmetic", "confident_consequential", "forced"} <= roles
    assert len(case["positions"]) >= 60
    assert max(e.max() for e in case["err"]) < 0.03  # the exact values are exact to 0.03 at worst
    assert np.mean(np.concatenate(case["err"])) < 0.005


@pytest.mark.parametrize("m", [4, 8, 16])
def test_monte_carlo_fork_value_against_the_exact_one(case, m):
    r = _chunked(case, m)
    print(f"\nm={m}: Q bias {r['dq'].mean():+.4f} (n={r['dq'].size}), coverage {r['q_cover'].mean():.3f} "
          f"(non-trivial Q: {r['q_cover'][~r['q_trivial']].mean():.3f}, n={(~r['q_trivial']).sum()}); "
          f"V bias {r['dv'].mean():+.4f}, coverage {r['v_cover'].mean():.3f}; "
          f"fork value bias {r['dvalue'].mean():+.4f} (mean SE {r['value_se'].mean():.4f}), "
          f"coverage {r['value_cover'].mean():.3f} (n={r['dvalue'].size})")
    # Q and V: unbiased — their mean error is within 3 standard errors of that mean, plus the enumeration's bound
    assert abs(r["dq"].mean()) <= 3 * r["dq"].std() / math.sqrt(r["dq"].size) + r["q_err"].mean()
    assert abs(r["dv"].mean()) <= 3 * r["dv"].std() / math.sqrt(r["dv"].size) + r["v_err"].mean()
    # the fork value: biased only toward 0 by cross-fitting, by less than its standard error
    assert abs(r["dvalue"].mean()) <= r["value_se"].mean()
    # the stated 95 % intervals cover the exact values at least at the nominal rate
    assert _at_least_nominal(r["q_cover"]) and _at_least_nominal(r["q_cover"][~r["q_trivial"]])
    assert _at_least_nominal(r["v_cover"])
    assert _at_least_nominal(r["value_cover"])
