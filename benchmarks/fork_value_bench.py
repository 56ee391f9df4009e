"""Cost of one fork-value measurement (plugin/fork_value.py): P positions x K branches x m rollouts, on the demo's
tiny model or on SmolLM2-135M-Instruct, counted (forwards, generate calls, token positions processed) and timed.

    .venv/bin/python benchmarks/fork_value_bench.py --model tiny --positions 64 --branches 5 --rollouts 8
    .venv/bin/python benchmarks/fork_value_bench.py --model smollm2 --positions 64 --branches 5 --rollouts 8
    .venv/bin/python benchmarks/fork_value_bench.py --model smollm2 --device cuda --positions 64 --rollouts 8 --batch-rows 1024

The positions are drawn uniformly from completions the model samples first (the demo's prompts, or the real-model
demo's yes/no questions through the chat template), at the run's settings: temperature 1, the demo's or the
real-model demo's completion-length limit. Reward: the demo's `items` reward, or the real-model demo's yes/no reward.
Reported: the counts of `Measurement.cost`, and the median wall time of `--reps` measurements after one untimed one
(different seeds). Times only mean something on a quiet machine: say which, with the load, in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def _case(name: str, n_completions: int, device: str):
    """(model, tokenizer, sampling settings, reward functions, sampled completions as positions' material)."""
    from forkwatch.plugin.fork_value import RewardFunctions, Sampling

    if name == "tiny":
        import tempfile

        from forkwatch.demo import task
        from forkwatch.demo.warmup import WarmupSettings, cached_warmup, load

        model, tok = load(cached_warmup(os.environ.get("FORKWATCH_BENCH_CACHE", tempfile.gettempdir()),
                                        WarmupSettings(), progress=False))
        prompts = [p.prompt for p in task.make_problems(n_completions, seed=1)]
        prompt_ids = [tok(p)["input_ids"] for p in prompts]
        rewards, limit, shown = RewardFunctions.of([task.reward_fn]), task.MAX_COMPLETION_CHARS + 3, prompts
        columns = [{} for _ in prompts]
    else:
        from forkwatch.demo import real_model, smollm2

        model, tok = smollm2.load(smollm2.model_dir(progress=False))
        rows = real_model.make_prompts(n_completions, seed=1)
        prompt_ids = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                              return_dict=False) for r in rows]
        prompt_ids = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompt_ids]
        rewards = RewardFunctions.of([real_model.yes_no_reward])
        limit, shown = real_model.RealSettings().max_completion_length, [r["prompt"] for r in rows]
        columns = [{"answer": r["answer"]} for r in rows]
    model = model.to(device).eval()
    sampling = Sampling.from_settings({"max_completion_length": limit}, model=model, tokenizer=tok)
    return model, tok, sampling, rewards, prompt_ids, shown, columns


def main() -> None:
    from forkwatch.plugin.fork_value import ForkValueSettings, Position, measure

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    p.add_argument("--positions", type=int, default=64)
    p.add_argument("--branches", type=int, default=5)
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--batch-rows", type=int, default=256)
    p.add_argument("--completions", type=int, default=32, help="sampled completions the positions are drawn from")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, tok, sampling, rewards, prompt_ids, shown, columns = _case(a.model, a.completions, a.device)
    width = max(map(len, prompt_ids))
    ids = torch.full((len(prompt_ids), width), sampling.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(prompt_ids):
        ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        out = model.generate(input_ids=ids.to(a.device), attention_mask=mask.to(a.device),
                             generation_config=sampling.generation_config(sampling.max_completion_length))
    candidates = []
    eos = set(sampling.eos_token_ids)
    for i, row in enumerate(out[:, width:].tolist()):
        stop = next((k for k, t in enumerate(row) if t in eos), None)
        completion = tuple(row if stop is None else row[: stop + 1])
        candidates += [Position(tuple(prompt_ids[i]), completion, pos, shown[i], columns=columns[i], completion_id=i)
                       for pos in range(len(completion))]
    rng = torch.Generator().manual_seed(0)
    chosen = [candidates[int(i)] for i in torch.randperm(len(candidates), generator=rng)[: a.positions]]
    settings = ForkValueSettings(branches=a.branches, rollouts=a.rollouts, batch_rows=a.batch_rows)
    times, cost = [], None
    for rep in range(a.reps + 1):
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        m = measure(model, tok, chosen, sampling=sampling, rewards=rewards, settings=settings, seed=rep)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        if rep:
            times.append(time.perf_counter() - t0)
        cost = m.cost
    print(json.dumps({"model": a.model, "device": a.device, "threads": a.threads, "positions": len(chosen),
                      "branches": a.branches, "rollouts": a.rollouts, "batch_rows": a.batch_rows,
                      "cost_last_rep": vars(cost), "seconds_median": statistics.median(times) if times else None,
                      "seconds": times}, indent=1))


if __name__ == "__main__":
    main()
