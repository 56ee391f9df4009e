"""GRPO step time with the collapse lenses off, at their defaults, and due on every step (the worst case).

    .venv/bin/python benchmarks/lens_overhead.py --config tiny --rounds 3 --steps 10
    .venv/bin/python benchmarks/lens_overhead.py --config bigvocab --rounds 2 --warmup 1 --steps 3

Same method as benchmarks/overhead.py (one trainer at a time on a copy of the same weights, rotated rounds, warm-up
steps dropped, medians): it reuses its trainer builder and timer. Variants: plain TRL; `lenses off`
(effective_rank_every=0, probe_every=0: what forkwatch costs without them, the entropy spectrum included, which is
always on); `defaults` (effective rank and probes every 10 steps: 4 completions, 4 probes); `every step`
(effective_rank_every=1, probe_every=1). The effective rank's and the probes' cost per occurrence is `every step`
minus `lenses off`; at the defaults a step pays a tenth of it on average.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import CONFIGS, base_model, run_variant  # noqa: E402

VARIANTS: dict[str, dict | None] = {
    "plain": None,
    "lenses off": dict(group_js=False, effective_rank_every=0, probe_every=0),
    "defaults": dict(group_js=False),
    "every step": dict(group_js=False, effective_rank_every=1, probe_every=1),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=list(CONFIGS), default="tiny")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    opts = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(opts.threads)
    tmp = Path(tempfile.mkdtemp(prefix="fw-lens-bench-"))
    model = base_model(opts.config, opts.device)
    times: dict[str, list[float]] = {n: [] for n in VARIANTS}
    names = list(VARIANTS)
    t0 = time.perf_counter()
    for r in range(opts.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            timer = run_variant(opts.config, opts.device, model, VARIANTS[name], opts.warmup + opts.steps,
                                tmp / f"r{r}-{name.replace(' ', '_')}")
            times[name].extend(timer.times[opts.warmup:])
    print(f"config={opts.config} device={opts.device} threads={opts.threads} rounds={opts.rounds} "
          f"warmup={opts.warmup} timed steps/round={opts.steps} wall={time.perf_counter() - t0:.0f}s")
    med = {n: statistics.median(ts) for n, ts in times.items()}
    mean = {n: statistics.fmean(ts) for n, ts in times.items()}
    print(f"{'variant':<14}{'median ms':>10}{'mean ms':>9}{'x plain':>9}{'x lenses off':>14}{'(mean)':>8}")
    for n in VARIANTS:
        print(f"{n:<14}{1000 * med[n]:>10.1f}{1000 * mean[n]:>9.1f}{med[n] / med['plain']:>9.3f}"
              f"{med[n] / med['lenses off']:>14.3f}{mean[n] / mean['lenses off']:>8.3f}")


if __name__ == "__main__":
    main()
