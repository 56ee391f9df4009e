"""Fork value on the demo, offline, for one seed: the dry run of the detector-against-fork-value comparison.

1. The demo's warm-up model (demo/warmup.py, cached under OUT/warmup/).
2. One GRPO step of `grpo` (plain reward) and of `grpo_alphabetical` from it, with forkwatch attached (demo/runs.py),
   and the ground truth of their recorded tokens (demo/truth.py).
3. `forkwatch forkvalue` on step 1 of each, with the warm-up model as the checkpoint: step 1's completions were
   sampled by exactly that policy.
4. Per role: the share of positions that are consequential and the mean fork value, for all positions of the step
   (Horvitz–Thompson, store/fork_values.py); then entropy, Rényi-2, group-JS and the lexical rule against
   "consequential" (AUROC, AP) and against the value (Spearman's ρ).

    python scripts/fork_value_demo.py --out fork_value_demo --seed 0 --positions 240 --rollouts 16

One seed, one step: a dry run, not a result (docs/experiments.md, "Fork value").
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

RUNS = {"grpo": "forkwatch.demo.task:reward_fn", "grpo_alphabetical": "forkwatch.demo.task:alphabetical_reward_fn"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="fork_value_demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--positions", type=int, default=240)
    p.add_argument("--branches", type=int, default=5)
    p.add_argument("--rollouts", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from forkwatch.demo import truth
    from forkwatch.demo.runs import GRPOSettings, demo_runs, train_run
    from forkwatch.demo.warmup import WarmupSettings, cached_warmup
    from forkwatch.store import connect
    from forkwatch.store.fork_values import detector_vs_value, population_mean, scored_positions

    from forkwatch.cli import main as cli

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    log_dir = out / "logs"
    model_dir = cached_warmup(out, WarmupSettings(), progress=True)
    settings = replace(GRPOSettings(), seed=args.seed, steps=1, collapse_steps=1)
    specs = {s.name: s for s in demo_runs(settings)}
    for name, reward in RUNS.items():
        if not (log_dir / name / "run.json").is_file():
            train_run(replace(specs[name], steps=1), model_dir=model_dir, log_dir=log_dir, settings=settings,
                      work_dir=out / "trainer", progress=True)
            truth.annotate(log_dir, name)
        code = cli(["forkvalue", str(log_dir / name), "--model", str(model_dir), "--reward", reward, "--steps", "1",
                    "--positions", str(args.positions), "--branches", str(args.branches), "--rollouts",
                    str(args.rollouts), "--seed", str(args.seed), "--threads", str(args.threads)])
        if code:
            return code
    con = connect(log_dir)
    for name in RUNS:
        scored = scored_positions(con, name, 1)
        roles = con.execute("SELECT completion_id, position, role FROM truth WHERE run_id = ? AND step = 1",
                            [name]).df()
        scored = scored.merge(roles, on=["completion_id", "position"], how="left")
        p = scored["inclusion_prob"].to_numpy(np.float64)
        print(f"\n{name} (seed {args.seed}, step 1, {len(scored)} positions measured): per role, for all positions")
        print(f"  {'role':<24} {'measured':>8} {'consequential':>13} {'mean value':>10} {'max value':>9}")
        for role, g in scored.groupby("role"):
            gp = g["inclusion_prob"].to_numpy(np.float64)
            print(f"  {role:<24} {len(g):8d} {population_mean(g['consequential'].to_numpy(float), gp):13.3f} "
                  f"{population_mean(g['value'].to_numpy(float), gp):10.4f} {g['value'].max():9.3f}")
        print(f"  {'all':<24} {len(scored):8d} {population_mean(scored['consequential'].to_numpy(float), p):13.3f} "
              f"{population_mean(scored['value'].to_numpy(float), p):10.4f} {scored['value'].max():9.3f}")
        table = detector_vs_value(scored)
        print(f"  {'score':<10} {'AUROC':>6} {'AP':>6} {'Spearman':>8}  (target: consequential, "
              f"{table['consequential_share'].iloc[0]:.3f} of positions)" if len(table) else "  no detector rows")
        for r in table.itertuples(index=False):
            print(f"  {r.predictor:<10} {r.auroc:6.3f} {r.average_precision:6.3f} {r.spearman:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
