"""Selector comparisons on the demo task: several seeds of plain GRPO and of token-selection methods.

    python scripts/experiments.py train --log-dir experiments/selectors --seeds 0 1 2 3 4
    python scripts/experiments.py report --log-dir experiments/selectors --img docs/img/selectors

`train` uses the demo's warm-up model and GRPO settings (demo/runs.py), changing only the method and the seed, and
after each run scores the trained policy on 256 fresh samples (heldout.json: accuracy, and where its entropy
sits: at decision points or at forced tokens). `report` draws entropy and reward curves (mean over seeds of a
rolling mean, with the seeds' range shaded) and prints a Markdown table. Plotting needs matplotlib
(`pip install -e ".[experiments]"`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

METHODS = {"grpo": None, "high_entropy": "high_entropy", "ict": "ict", "random": "random"}  # run prefix -> selector
WINDOW = 10  # steps in the rolling mean of the curves (one step holds only a few prompts: noisy)
EDGE = 20  # steps averaged for the "first" and "last" columns of the table


def train(args: argparse.Namespace) -> None:
    from forkwatch.demo import evaluate, runs, warmup

    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    settings = runs.GRPOSettings(steps=args.steps)
    lr = args.lr or settings.stable_lr
    model_dir = warmup.cached_warmup(args.cache, warmup.WarmupSettings())
    scores_path = log_dir / "heldout.json"
    scores = json.loads(scores_path.read_text()) if scores_path.exists() else {}
    model, tok = warmup.load(model_dir)
    scores["warmup"] = evaluate.heldout(model, tok)
    for seed in args.seeds:
        for method in args.methods:
            spec = runs.RunSpec(f"{method}-s{seed}", METHODS[method], lr, f"{method}, seed {seed}", "healthy")
            trainer = runs.train_run(spec, model_dir=model_dir, log_dir=log_dir, settings=replace(settings, seed=seed),
                                     work_dir=log_dir / ".trainer")
            scores[spec.name] = evaluate.heldout(trainer.model, tok)
            scores_path.write_text(json.dumps(scores, indent=2))
            print(spec.name, scores[spec.name], flush=True)


def _series(con, run_id: str) -> dict[str, np.ndarray]:
    rows = con.sql(
        "SELECT step, entropy_mean, reward_mean FROM steps WHERE run_id = ? ORDER BY step", params=[run_id]
    ).fetchall()
    a = np.asarray(rows, dtype=np.float64)
    return {"step": a[:, 0], "entropy": a[:, 1], "reward": a[:, 2]}


def _rolling(x: np.ndarray, w: int) -> np.ndarray:
    c = np.cumsum(np.insert(x, 0, 0.0))
    out = np.empty_like(x)
    for i in range(x.size):  # trailing window, shorter at the start
        lo = max(0, i + 1 - w)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def report(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from forkwatch.store import connect
    from forkwatch.store.check import check_runs

    log_dir = Path(args.log_dir)
    con = connect(log_dir)
    run_ids = [r[0] for r in con.sql("SELECT DISTINCT run_id FROM steps ORDER BY run_id").fetchall()]
    verdicts = {r["run_id"]: r["report"].verdict for r in check_runs(log_dir)}
    heldout = json.loads((log_dir / "heldout.json").read_text()) if (log_dir / "heldout.json").exists() else {}
    groups = {m: [r for r in run_ids if r.rsplit("-s", 1)[0] == m] for m in METHODS}
    groups = {m: rs for m, rs in groups.items() if rs}

    img = Path(args.img)
    img.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for (method, rs), color in zip(groups.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False):
        series = [_series(con, r) for r in rs]
        n = min(s["step"].size for s in series)
        steps = series[0]["step"][:n]
        for ax, key in zip(axes, ("entropy", "reward"), strict=True):
            curves = np.stack([_rolling(s[key][:n], WINDOW) for s in series])
            ax.plot(steps, curves.mean(0), color=color, label=f"{method} ({len(rs)} seeds)")
            ax.fill_between(steps, curves.min(0), curves.max(0), color=color, alpha=0.15, linewidth=0)
    axes[0].set(title="mean token entropy (nats)", xlabel="GRPO step")
    axes[1].set(title="mean reward (1 = every item once)", xlabel="GRPO step")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{log_dir.name}: rolling mean over {WINDOW} steps, mean over seeds, seeds' range shaded", fontsize=9)
    fig.tight_layout()
    fig.savefig(f"{img}_curves.png")
    print(f"wrote {img}_curves.png\n")

    print("| run | entropy first / last (ratio) | reward first / last | accuracy (fresh samples) | entropy at "
          "decisions / forced | check |")
    print("|---|---|---|---|---|---|")

    def held(h: dict | None) -> str:
        if not h:
            return "n/a | n/a"
        return f"{h['accuracy']:.3f} | {h['decision_entropy']:.3f} / {h['forced_entropy']:.4f}"

    if "warmup" in heldout:
        print(f"| warm-up model | | | {held(heldout['warmup'])} | |")
    for rs in groups.values():
        for r in rs:
            s = _series(con, r)
            e0, e1 = s["entropy"][:EDGE].mean(), s["entropy"][-EDGE:].mean()
            r0, r1 = s["reward"][:EDGE].mean(), s["reward"][-EDGE:].mean()
            print(f"| {r} | {e0:.3f} / {e1:.3f} ({e1 / e0:.2f}) | {r0:.3f} / {r1:.3f} | {held(heldout.get(r))} | "
                  f"{verdicts.get(r)} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train seeds x methods into a log dir")
    t.add_argument("--log-dir", required=True)
    t.add_argument("--cache", default="demo_runs", help="folder of the cached warm-up model (shared with the demo)")
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    t.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: the demo's stable one)")
    t.set_defaults(func=train)
    r = sub.add_parser("report", help="curves (PNG) and a Markdown table from a log dir")
    r.add_argument("--log-dir", required=True)
    r.add_argument("--img", required=True, help="path prefix of the PNG, e.g. docs/img/stable")
    r.set_defaults(func=report)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
