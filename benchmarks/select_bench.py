"""Per-micro-batch cost of each selector and of the selection diagnostics, on synthetic tensors (no model).

    .venv/bin/python benchmarks/select_bench.py --batch 16 --length 1024 --reps 50

Each selector and `token_math.selection_diagnostics` (plus its one `.tolist()`, what `Capture.select` adds per
micro-batch) run on the same micro-batch: entropies lognormal with a heavy tail, log-probs, Rényi-2 and group-JS
derived from them, ragged completion lengths. Median over `--reps` calls after 3 warm-up calls; torch threads fixed
by `--threads` so a shared machine's other load changes less. The figures are the selection's own cost; the step
it sits in (forward, backward, optimizer) is measured by overhead.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _batch(b: int, t: int, device: str, seed: int = 0):
    from forkwatch.plugin.selection.registry import SelectionInput

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=gen)
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).float()  # (B, T)
    entropy = torch.exp(torch.randn(b, t, generator=gen) * 2 - 5).clamp(max=4.0)  # mostly tiny, a heavy tail
    logprob = -entropy * torch.rand(b, t, generator=gen) * 2
    renyi2 = entropy * 0.8  # H2 <= H1
    group_js = (entropy / 8).clamp(max=0.69) * (torch.rand(b, t, generator=gen) > 0.2)
    adv = torch.randn(b, generator=gen)
    to = dict(device=device)
    inp = SelectionInput(
        mask=mask.to(**to), entropy=entropy.to(**to), logprob=logprob.to(**to), old_logprob=logprob.to(**to),
        advantages=adv.to(**to), group_ids=(torch.arange(b) // 8).to(**to), group_js=group_js.to(**to), step=100,
        generator=torch.Generator(device=device).manual_seed(0), epsilon_low=0.2, epsilon_high=0.28,
        loss_type="grpo",
    )
    return inp, renyi2.to(**to)


def _median_ms(fn, reps: int, device: str) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    from forkwatch.plugin.selection.registry import get_selector, selector_names
    from forkwatch.plugin.token_math import selection_diagnostics

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    inp, renyi2 = _batch(a.batch, a.length, a.device)
    out: dict[str, float] = {}
    for name in selector_names():
        bound = get_selector(name)
        out[name] = _median_ms(lambda bound=bound: bound(inp), a.reps, a.device)
    weights = get_selector("high_entropy")(inp).weights

    def diagnostics() -> list[float]:
        return selection_diagnostics(weights, inp.mask, inp.logprob, inp.entropy, renyi2, inp.advantages).tolist()

    out["diagnostics (+ one .tolist())"] = _median_ms(diagnostics, a.reps, a.device)
    print(json.dumps({"batch": a.batch, "length": a.length, "device": a.device, "threads": a.threads,
                      "median_ms": {k: round(v, 3) for k, v in out.items()}}, indent=1))


if __name__ == "__main__":
    main()
