"""Selector comparisons on the demo task: several seeds of plain GRPO and of token-selection methods.

    python scripts/experiments.py train --log-dir experiments/selectors --seeds 0 1 2 3 4
    python scripts/experiments.py train --log-dir experiments/selectors --seeds 0 1 2 3 4 --lr 1e-4 \
        --variants grpo ict
    python scripts/experiments.py report --log-dir experiments/selectors --img docs/img/selectors

`train` uses the demo's warm-up model and GRPO settings (demo/runs.py), changing only the variant (plain GRPO or a
selector with its options), the seed and, optionally, the learning rate. All seeds share the one cached warm-up model
(the demo's, `WarmupSettings()`): the seed changes the GRPO prompts, the sampling and the selectors' draws. Runs are
attached with `on_alarm="log"`, so an alarm is recorded but never ends a run early. After each run the trained policy
is scored on 256 fresh samples (`heldout/<run>.json`: accuracy, and where its entropy sits: at decision points or at
forced tokens). A run whose heldout file exists is skipped, so an interrupted grid resumes, and two processes may
share a log dir if they train different runs. Run names are `<variant>-lr<rate>-s<seed>`.

`report` prints, per variant and rate, a Markdown table over seeds (mean ± standard deviation): reward and entropy
over the first and last steps, held-out accuracy, and the selection diagnostics of the steps table; and draws entropy
and reward curves (mean over seeds of a rolling mean, seeds' range shaded). Plotting needs matplotlib
(`pip install -e ".[experiments]"`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

# variant -> (selector, its select_options); None = plain GRPO, forkwatch only watches
VARIANTS: dict[str, tuple[str | None, dict]] = {
    "grpo": (None, {}),
    "high_entropy": ("high_entropy", {}),
    "ict": ("ict", {}),  # against="siblings": group-JS, the reading secondary sources give
    "ict_reference": ("ict", {"against": "reference"}),  # JS against the initial policy in the same context
    "random": ("random", {}),
    # the ground truth's own selection at ICT's budget (demo only): "labels" is filled in with the task's label source
    "oracle": ("oracle", {"labels": None}),
    # ICT with TRL's normaliser (weights 0/1) instead of the mean over kept tokens: tests whether the kept-token
    # normalisation is what makes ICT lose this task.
    "ict_norm_all": ("ict", {"normalize": "all"}),
}
WINDOW = 10  # steps in the rolling mean of the curves (one step holds only a few prompts: noisy)
EDGE = 20  # steps averaged for the "first" and "last" columns of the table


def run_name(variant: str, lr: float, seed: int) -> str:
    return f"{variant}-lr{lr:g}-s{seed}"


def train(args: argparse.Namespace) -> None:
    import torch
    from forkwatch.demo import evaluate, oracle, runs, warmup

    # The tiny model gains nothing from more threads, and the grid runs two processes on a shared 2-core machine.
    torch.set_num_threads(args.threads)
    log_dir = Path(args.log_dir)
    held_dir = log_dir / "heldout"
    held_dir.mkdir(parents=True, exist_ok=True)
    settings = replace(runs.GRPOSettings(steps=args.steps), on_alarm="log")
    lr = args.lr or settings.stable_lr
    model_dir = warmup.cached_warmup(args.cache, warmup.WarmupSettings(), progress=False)
    if not (held_dir / "warmup.json").exists():
        model, tok = warmup.load(model_dir)
        (held_dir / "warmup.json").write_text(json.dumps(evaluate.heldout(model, tok), indent=2))
    _, tok = warmup.load(model_dir)
    for seed in args.seeds:
        for variant in args.variants:
            name = run_name(variant, lr, seed)
            out = held_dir / f"{name}.json"
            if out.exists():
                continue
            select, options = VARIANTS[variant]
            if "labels" in options:
                options = {**options, "labels": oracle.task_labels(tok)}
            spec = runs.RunSpec(name, select, lr, f"{variant}, lr {lr:g}, seed {seed}", "healthy",
                                select_options=options or None)
            trainer = runs.train_run(spec, model_dir=model_dir, log_dir=log_dir, settings=replace(settings, seed=seed),
                                     work_dir=log_dir / ".trainer", progress=False)
            scores = evaluate.heldout(trainer.model, tok)
            out.write_text(json.dumps(scores, indent=2))
            sys.stdout.write(f"{name} accuracy {scores['accuracy']:.3f}\n")
            sys.stdout.flush()


_SERIES = ("entropy_mean", "reward_mean", "select_grad_share", "select_kept_p_mean", "select_kept_entropy_mean",
           "select_entropy_overlap", "select_warmup")


def _series(con, name: str) -> dict[str, np.ndarray]:
    """One run's per-step columns, by run name (NaN where a column is null: plain GRPO has no diagnostics)."""
    rows = con.sql(
        f"SELECT s.step, {', '.join('s.' + c for c in _SERIES)} FROM steps s JOIN runs r USING (run_id) "
        "WHERE r.name = ? ORDER BY s.step",
        params=[name],
    ).fetchall()
    a = np.asarray([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)
    return {"step": a[:, 0], **{c: a[:, i + 1] for i, c in enumerate(_SERIES)}}


def _rolling(x: np.ndarray, w: int) -> np.ndarray:
    c = np.cumsum(np.insert(x, 0, 0.0))
    out = np.empty_like(x)
    for i in range(x.size):  # trailing window, shorter at the start
        lo = max(0, i + 1 - w)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def _ms(xs: list[float], fmt: str = ".2f") -> str:
    """Mean ± standard deviation over seeds (n - 1 in the denominator), or n/a."""
    a = np.asarray([x for x in xs if x is not None and np.isfinite(x)], dtype=np.float64)
    if a.size == 0:
        return "n/a"
    sd = a.std(ddof=1) if a.size > 1 else 0.0
    return f"{a.mean():{fmt}} ± {sd:{fmt}}"


def _groups(names: list[str]) -> dict[tuple[str, str], list[str]]:
    """(variant, rate) -> run names, in VARIANTS order then rate."""
    out: dict[tuple[str, str], list[str]] = {}
    for n in sorted(names, key=lambda n: (list(VARIANTS).index(n.split("-lr")[0]), n)):
        variant, rest = n.split("-lr", 1)
        out.setdefault((variant, rest.rsplit("-s", 1)[0]), []).append(n)
    return out


def _plot(con, groups: dict[tuple[str, str], list[str]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=90)
    for ((variant, lr), rs), color in zip(groups.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"],
                                          strict=False):
        series = [_series(con, r) for r in rs]
        n = min(s["step"].size for s in series)
        steps = series[0]["step"][:n]
        for ax, key in zip(axes, ("entropy_mean", "reward_mean"), strict=True):
            curves = np.stack([_rolling(s[key][:n], WINDOW) for s in series])
            ax.plot(steps, curves.mean(0), color=color, label=f"{variant}, lr {lr} ({len(rs)} seeds)")
            ax.fill_between(steps, curves.min(0), curves.max(0), color=color, alpha=0.15, linewidth=0)
    axes[0].set(title="mean token entropy (nats)", xlabel="GRPO step")
    axes[1].set(title="mean reward (1 = every item once)", xlabel="GRPO step")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: rolling mean over {WINDOW} steps, mean over seeds, seeds' range shaded", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    sys.stdout.write(f"wrote {path}\n")


# Where a run's kept tokens sit, against the task's ground truth (demo/task.py `roles`), in completions with a
# non-zero advantage (the only ones with a gradient) after the sparse selectors' warm-up. For plain GRPO every token is
# kept: its row is the base rate.
ROLES = ("decision", "cosmetic", "confident_consequential", "forced", "mistake", "off_path")
_KEPT_SQL = f"""
WITH t AS (
    SELECT t.selected > 0 AS kept, x.role
    FROM tokens t
    JOIN truth x USING (run_id, step, completion_id, position)
    JOIN completions c USING (run_id, step, completion_id)
    JOIN steps s USING (run_id, step)
    WHERE t.run_id = ? AND c.advantage <> 0 AND s.select_warmup IS DISTINCT FROM true
)
SELECT {", ".join(f"avg((role = '{r}')::INT) FILTER (kept)" for r in ROLES)},
       avg(kept::INT) FILTER (role = 'decision'), avg(kept::INT) FILTER (role = 'cosmetic'),
       avg(kept::INT) FILTER (role = 'mistake')
FROM t
"""
_KEPT_COLS = (*ROLES, "decisions kept", "cosmetic kept", "mistakes kept")

# Shannon (H1) and Rényi-2 (H2) entropy per step of all response tokens and of the kept ones (nats): ICT's claim is
# that its selection lowers H1 while holding H2 (the dual-entropy reading), measured here for every selector.
_DUAL_SQL = """
SELECT t.step, avg(t.entropy), avg(t.renyi2), avg(t.entropy) FILTER (t.selected > 0),
       avg(t.renyi2) FILTER (t.selected > 0)
FROM tokens t JOIN steps s USING (run_id, step)
WHERE t.run_id = ? AND s.select_warmup IS DISTINCT FROM true
GROUP BY t.step ORDER BY t.step
"""
_DUAL_COLS = ("H1 all", "H2 all", "H1 kept", "H2 kept")


def _annotated(con, log_dir: Path, name: str) -> None:
    from forkwatch.demo import truth
    from forkwatch.store.ground_truth import TRUTH_DIR

    if not (log_dir / name / TRUTH_DIR / "part-0.parquet").exists():
        truth.annotate(log_dir, name)
        from forkwatch.store.views import refresh_views

        refresh_views(con, log_dir)


def _kept_where(con, log_dir: Path, name: str) -> tuple[float, ...]:
    _annotated(con, log_dir, name)
    return tuple(np.nan if v is None else v for v in con.execute(_KEPT_SQL, [name]).fetchone())


def _dual(con, name: str) -> np.ndarray:
    """(steps, 4): H1 all, H2 all, H1 kept, H2 kept per step after the warm-up (NaN where nothing was kept)."""
    rows = con.execute(_DUAL_SQL, [name]).fetchall()
    return np.asarray([[np.nan if v is None else v for v in r[1:]] for r in rows], dtype=np.float64).reshape(-1, 4)


def _detector(con, name: str) -> dict[str, tuple[float, float]]:
    """AUROC for consequential decisions of entropy, Rényi-2 and group-JS over the first and the last EDGE steps."""
    from forkwatch.store.ground_truth import detector_by_step

    m = detector_by_step(con, name)
    m = m[m["target"] == "decision"]
    out = {}
    for p in ("entropy", "renyi2", "group_js", "position"):
        g = m[m["predictor"] == p].sort_values("step")
        out[p] = (g["auroc"].head(EDGE).mean(), g["auroc"].tail(EDGE).mean()) if not g.empty else (np.nan, np.nan)
    return out


def report(args: argparse.Namespace) -> None:
    from forkwatch.store import connect
    from forkwatch.store.check import check_runs

    log_dir = Path(args.log_dir)
    con = connect(log_dir)
    names = [r[0] for r in con.sql("SELECT DISTINCT name FROM runs ORDER BY name").fetchall()]
    verdicts = {r["name"]: r["report"].verdict for r in check_runs(log_dir)}
    held_dir = log_dir / "heldout"
    held = {p.stem: json.loads(p.read_text()) for p in held_dir.glob("*.json")}
    groups = _groups([n for n in names if n in held])  # finished runs only

    if args.img:
        rates = [lr for _, lr in groups]
        main_lr = max(set(rates), key=rates.count)  # the rate of the full grid; ablation rates have fewer variants
        for lr in sorted(set(rates), key=float, reverse=True):
            # An ablation rate's figure also shows its variants at the main rate, for reference.
            ablated = {v for v, r in groups if r == lr}
            chosen = {k: rs for k, rs in groups.items() if k[1] == lr or (lr != main_lr and k[1] == main_lr
                                                                          and k[0] in ablated)}
            _plot(con, chosen, Path(f"{args.img}_lr{lr}.png"), f"{log_dir.name}, lr {lr}")

    w = sys.stdout.write
    w(f"\nMean ± s.d. over seeds. First / last: mean over steps 1-{EDGE} / the last {EDGE}. Selection diagnostics: "
      f"mean over the steps after the sparse selectors' dense warm-up (steps 11+ for ict and random).\n\n")
    w("| variant | lr | seeds | reward first | reward last | accuracy (256 fresh) | entropy first | entropy last | "
      "entropy at decisions / forced (fresh) | grad share | kept p(y) | kept entropy | overlap top-entropy | "
      "verdicts |\n")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    if "warmup" in held:
        h = held["warmup"]
        w(f"| warm-up model | | | | | {h['accuracy']:.2f} | | | {h['decision_entropy']:.2f} / "
          f"{h['forced_entropy']:.4f} | | | | | |\n")
    for (variant, lr), rs in groups.items():
        ss = [_series(con, r) for r in rs]
        late = [s["select_warmup"] != 1.0 for s in ss]  # ict and random train densely for 10 steps first

        def col(key: str, part: str, ss=ss, late=late) -> list[float]:
            if part == "first":
                return [s[key][:EDGE].mean() for s in ss]
            if part == "last":
                return [s[key][-EDGE:].mean() for s in ss]
            return [np.nanmean(s[key][m]) if np.isfinite(s[key][m]).any() else np.nan for s, m in zip(ss, late,
                                                                                                    strict=True)]

        hs = [held[r] for r in rs]
        vs = [verdicts.get(r, "?") for r in rs]
        vtext = ", ".join(f"{v} {vs.count(v)}" for v in sorted(set(vs)))
        w(f"| {variant} | {lr} | {len(rs)} | {_ms(col('reward_mean', 'first'))} | {_ms(col('reward_mean', 'last'))} | "
          f"{_ms([h['accuracy'] for h in hs])} | {_ms(col('entropy_mean', 'first'), '.3f')} | "
          f"{_ms(col('entropy_mean', 'last'), '.3f')} | {_ms([h['decision_entropy'] for h in hs])} / "
          f"{_ms([h['forced_entropy'] for h in hs], '.3f')} | {_ms(col('select_grad_share', 'late'))} | "
          f"{_ms(col('select_kept_p_mean', 'late'))} | {_ms(col('select_kept_entropy_mean', 'late'))} | "
          f"{_ms(col('select_entropy_overlap', 'late'))} | {vtext} |\n")

    w("\nWhere the kept tokens are (completions with a non-zero advantage, after the warm-up): shares of the kept "
      "tokens by role, then the share of all decisions / cosmetic forks / mistakes that are kept.\n\n")
    w(f"| variant | lr | {' | '.join(_KEPT_COLS)} |\n|---|---|{'---|' * len(_KEPT_COLS)}\n")
    for (variant, lr), rs in groups.items():
        rows = np.asarray([_kept_where(con, log_dir, r) for r in rs], dtype=np.float64)  # (seeds, columns)
        w(f"| {variant} | {lr} | {' | '.join(_ms(list(rows[:, j])) for j in range(rows.shape[1]))} |\n")

    w(f"\nShannon (H1) and Rényi-2 (H2) entropy, nats, mean over the first / last {EDGE} steps after the warm-up, of "
      "all response tokens and of the kept ones.\n\n")
    w(f"| variant | lr | {' | '.join(f'{c} first → last' for c in _DUAL_COLS)} |\n|---|---|{'---|' * 4}\n")
    for (variant, lr), rs in groups.items():
        duals = [_dual(con, r) for r in rs]
        cells = [f"{_ms([np.nanmean(d[:EDGE, j]) for d in duals], '.3f')} → "
                 f"{_ms([np.nanmean(d[-EDGE:, j]) for d in duals], '.3f')}" for j in range(4)]
        w(f"| {variant} | {lr} | {' | '.join(cells)} |\n")

    w(f"\nFork detection per run: AUROC of each score for consequential decisions, mean over the first / last {EDGE} "
      "recorded steps (position: the position-only baseline, fitted on the same step).\n\n")
    names = ("entropy", "renyi2", "group_js", "position")
    w(f"| variant | lr | {' | '.join(names)} |\n|---|---|{'---|' * len(names)}\n")
    for (variant, lr), rs in groups.items():
        dets = [_detector(con, r) for r in rs]
        cells = [f"{_ms([d[p][0] for d in dets])} → {_ms([d[p][1] for d in dets])}" for p in names]
        w(f"| {variant} | {lr} | {' | '.join(cells)} |\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train seeds x variants into a log dir")
    t.add_argument("--log-dir", required=True)
    t.add_argument("--cache", default="demo_runs", help="folder of the cached warm-up model (shared with the demo)")
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    t.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["grpo", "high_entropy", "ict", "ict_reference", "random", "oracle"])
    t.add_argument("--steps", type=int, default=150)
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads of this process")
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: the demo's stable one)")
    t.set_defaults(func=train)
    r = sub.add_parser("report", help="curves (PNG) and a Markdown table from a log dir")
    r.add_argument("--log-dir", required=True)
    r.add_argument("--img", default=None, help="path prefix of the PNGs, e.g. docs/img/selectors (none: no plots)")
    r.set_defaults(func=report)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
