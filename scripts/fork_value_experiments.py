"""Fork value as the truth for every score and every selector: the demo over seeds and warm-ups, and SmolLM2.

    python scripts/fork_value_experiments.py demo --out OUT/demo                 # train + measure (resumable)
    python scripts/fork_value_experiments.py real --out OUT/real                 # SmolLM2-135M-Instruct, CPU: hours
    python scripts/fork_value_experiments.py report --out OUT/demo --out OUT/real  # the tables of docs/experiments.md

Each run is a plain `trl.GRPOTrainer` with forkwatch attached; after training its policy is saved and
`forkwatch forkvalue`'s code (plugin/fork_value_offline.py `measure_run`) measures a stratified sample of the
positions of a step with it:

- "step 0": step 1's completions (sampled by the initial policy) with the initial policy (the demo's warm-up model,
  or SmolLM2 as converted);
- "after": the last step's completions with the policy after that step's update (what the online measurement,
  `fork_value_every`, measures at a step end).

Then the reference JS (JS of the measuring policy against the initial one, at the sampling temperature, in each
measured position's own context) is computed at the measured positions of the "after" measurement (at step 0 it is
0 everywhere: the policy is its own reference).

demo: warm-up seeds `--warmups` (the demo's `WarmupSettings(seed=w)`, cached by its settings' hash), GRPO seeds
`--seeds` for plain GRPO (`grpo`, the `items` reward) and the designed collapse (`grpo_alphabetical`), both measured at
step 0 and after; then the selectors at warm-up seed 0, `--selector-seeds`, each measured after 50 steps.
real: SmolLM2 on the real-model demo's task (`yes_no`) and on its variant with a free-form opening (`opening`), plain
GRPO measured at step 0 and after; and the selectors on `yes_no`, each measured after its last step.
Run names: `w<warm-up seed>-<variant>-s<seed>` (demo), `<task>-<variant>-s<seed>` (real). A unit of work (train, save,
measure) is done when OUT/done/<run>.json exists; an unfinished run is trained again from the start, so a killed
process resumes where it stopped. The saved SmolLM2 policies are deleted once measured (540 MB each).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pkgutil
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

# variant -> (selector, select_options); None = plain GRPO (forkwatch only watches)
SELECTORS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "grpo": (None, {}),
    "high_entropy": ("high_entropy", {}),  # the authors' 20 % of the batch
    "high_entropy_c10": ("high_entropy", {"fraction": 0.1, "scope": "completion"}),  # ICT's budget
    "ict": ("ict", {}),  # against the siblings
    "ict_reference": ("ict", {"against": "reference"}),
    "random": ("random", {}),
    "oracle": ("oracle", {}),  # demo only: the task's ground truth at ICT's budget
}
DEMO_REWARDS = {"items": "forkwatch.demo.task:reward_fn", "items_alphabetical": "forkwatch.demo.task:alphabetical_reward_fn"}
REAL_REWARDS = {"yes_no": "forkwatch.demo.real_model:yes_no_reward",
                "opening": "forkwatch.demo.real_model:first_answer_reward"}
REAL_LENGTH = {"yes_no": 24, "opening": 32}  # the opening needs room before the answer
T_975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def _import_everything() -> None:
    """Import every forkwatch module now: a run of hours then keeps the code it started with, whatever the working
    tree becomes meanwhile (the dashboard is not needed)."""
    import forkwatch

    for sub in ("plugin", "store", "demo"):
        pkg = importlib.import_module(f"forkwatch.{sub}")
        for info in pkgutil.walk_packages(pkg.__path__, f"forkwatch.{sub}."):
            importlib.import_module(info.name)
    importlib.import_module("forkwatch.cli")
    del forkwatch


def _done(out: Path, name: str) -> Path:
    return out / "done" / f"{name}.json"


def _log(msg: str) -> None:
    sys.stdout.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------- measuring


def _measure(out: Path, name: str, *, checkpoint: Path, reward: str, step: int, args: argparse.Namespace,
             seed: int) -> dict[str, Any]:
    from forkwatch.plugin.fork_value import ForkValueSettings
    from forkwatch.plugin.fork_value_offline import measure_run

    t0 = time.perf_counter()
    settings = ForkValueSettings(branches=args.branches, rollouts=args.rollouts, batch_rows=args.batch_rows)
    result = measure_run(str(out / "logs"), name, checkpoint=checkpoint, rewards=[reward], steps=[step],
                         positions=args.positions, settings=settings, seed=seed)
    s = result.steps[0]
    return {"step": step, "checkpoint": str(checkpoint), "measurement": result.measurement_id,
            "positions": s.positions, "population": s.population, "consequential": s.consequential,
            "strata": s.strata, "reward_mismatches": list(result.reward_mismatches),
            "cost": vars(result.cost), "seconds": time.perf_counter() - t0}


def reference_js_at(out: Path, name: str, step: int, *, policy_dir: Path, reference_dir: Path,
                    load) -> pd.DataFrame:
    """JS(policy ‖ reference) at the measured positions of `name`'s `step`, in each position's own context, from
    softmax(z / T), T the run's sampling temperature. -> completion_id, position, reference_js."""
    import torch
    from forkwatch.plugin.fork_value_offline import rebuild_prompt
    from forkwatch.plugin.token_math import js_from_logits
    from forkwatch.store import connect, run_meta
    from forkwatch.store.fork_values import fork_value_positions
    from forkwatch.store.location import resolve

    log_dir = str(out / "logs")
    temperature = float((run_meta.read_run_json(resolve(log_dir), name).get("trainer") or {}).get("temperature")
                        or 1.0)
    con = connect(log_dir)
    measured = fork_value_positions(con, name, step)
    tokens = con.execute("SELECT completion_id, position, token_id FROM tokens WHERE run_id = ? AND step = ? "
                         "ORDER BY completion_id, position", [name, step]).df()
    prompts = dict(con.execute("SELECT completion_id, prompt FROM completions WHERE run_id = ? AND step = ?",
                               [name, step]).fetchall())
    con.close()
    policy, tok = load(policy_dir)
    reference, _ = load(reference_dir)
    rows = []
    with torch.no_grad():
        for cid, g in measured.groupby("completion_id"):
            prompt_ids, _ = rebuild_prompt(prompts[cid], tok)
            ids = tokens.loc[tokens["completion_id"] == cid, "token_id"].astype(int).tolist()
            wanted = sorted(int(p) for p in g["position"])
            seq = torch.tensor([[*prompt_ids, *ids[: max(wanted)]]])
            at = torch.tensor([len(prompt_ids) + p - 1 for p in wanted])
            zp = policy.eval()(input_ids=seq, logits_to_keep=at).logits[0]
            zq = reference.eval()(input_ids=seq, logits_to_keep=at).logits[0]
            js = js_from_logits(zp.float(), zq.float(), temperature)
            rows += [{"completion_id": int(cid), "position": p, "reference_js": float(v)}
                     for p, v in zip(wanted, js.tolist(), strict=True)]
    frame = pd.DataFrame(rows, columns=["completion_id", "position", "reference_js"])
    (out / "refjs").mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out / "refjs" / f"{name}-{step}.parquet")
    return frame


def _last_step(out: Path, name: str) -> int:
    from forkwatch.store import connect

    con = connect(str(out / "logs"))
    try:
        return int(con.execute("SELECT max(step) FROM tokens WHERE run_id = ?", [name]).fetchone()[0])
    finally:
        con.close()


# ---------------------------------------------------------------------------------------------------- the demo


def demo(args: argparse.Namespace) -> None:
    import torch
    from forkwatch.demo import oracle, runs, truth, warmup

    _import_everything()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "done").mkdir(parents=True, exist_ok=True)
    units = [(w, s, v) for w in args.warmups for s in args.seeds for v in ("grpo", "grpo_alphabetical")]
    units += [(0, s, v) for s in args.selector_seeds for v in args.selectors]
    seen = set()
    for w, s, variant in units:
        name = f"w{w}-{variant}-s{s}"
        if name in seen or _done(out, name).exists():
            continue
        seen.add(name)
        t0 = time.perf_counter()
        wsettings = replace(warmup.WarmupSettings(), seed=w)
        model_dir = warmup.cached_warmup(out, wsettings, progress=False)
        settings = replace(runs.GRPOSettings(), seed=s, on_alarm="log")
        if variant == "grpo_alphabetical":  # the demo's designed collapse, as `forkwatch demo` runs it
            spec = next(r for r in runs.demo_runs(runs.GRPOSettings()) if r.name == variant)
            spec, settings = replace(spec, name=name), replace(settings, on_alarm="stop")
        else:
            select, options = SELECTORS[variant]
            if variant == "oracle":
                options = {"labels": oracle.task_labels(warmup.load(model_dir)[1])}
            spec = runs.RunSpec(name, select, settings.stable_lr, variant, "healthy", select_options=options or None)
        _log(f"{name}: training")
        trainer = runs.train_run(spec, model_dir=model_dir, log_dir=out / "logs", settings=settings,
                                 work_dir=out / "trainer", progress=False)
        truth.annotate(out / "logs", name)
        policy_dir = out / "models" / name
        trainer.model.save_pretrained(policy_dir)
        trainer.processing_class.save_pretrained(policy_dir)
        del trainer
        reward = DEMO_REWARDS[spec.reward]
        record: dict[str, Any] = {"run": name, "warmup": wsettings.key(), "warmup_settings": vars(wsettings),
                                  "variant": variant, "seed": s, "task": spec.reward, "measurements": {}}
        if variant in ("grpo", "grpo_alphabetical"):
            _log(f"{name}: measuring step 1 with the warm-up model")
            record["measurements"]["step0"] = _measure(out, name, checkpoint=model_dir, reward=reward, step=1,
                                                       args=args, seed=s)
        last = _last_step(out, name)
        _log(f"{name}: measuring step {last} with the trained model")
        record["measurements"]["after"] = _measure(out, name, checkpoint=policy_dir, reward=reward, step=last,
                                                   args=args, seed=s)
        reference_js_at(out, name, last, policy_dir=policy_dir, reference_dir=model_dir, load=warmup.load)
        record["seconds"] = time.perf_counter() - t0
        _done(out, name).write_text(json.dumps(record, indent=1, default=str))
        _log(f"{name}: done in {record['seconds']:.0f} s")


# ---------------------------------------------------------------------------------------------------- SmolLM2


def real(args: argparse.Namespace) -> None:
    import torch
    from forkwatch.demo import real_model, smollm2
    from transformers import PrinterCallback, ProgressCallback

    from forkwatch import attach

    _import_everything()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "done").mkdir(parents=True, exist_ok=True)
    base = smollm2.model_dir(progress=False)
    for s in args.seeds:
        units = [("yes_no", "grpo"), ("opening", "grpo")] + [("yes_no", v) for v in args.selectors if v != "grpo"]
        for task, variant in units:
            name = f"{task}-{variant}-s{s}"
            if _done(out, name).exists():
                continue
            t0 = time.perf_counter()
            if (out / "logs" / name).exists():
                shutil.rmtree(out / "logs" / name)  # an unfinished run starts again
            select, options = SELECTORS[variant]
            settings = real_model.RealSettings(steps=args.steps, seed=s, task=task,
                                               max_completion_length=REAL_LENGTH[task])
            model, tok = smollm2.load(base)
            trainer = real_model.make_trainer(model, tok, settings=settings, output_dir=out / "trainer" / name)
            for cb in (PrinterCallback, ProgressCallback):
                trainer.remove_callback(cb)
            attach(trainer, log_dir=str(out / "logs"), run_name=name, seed=s, select=select, group_js=True,
                   record_completions_per_step=None, **({"select_options": options} if options else {}))
            _log(f"{name}: training {args.steps} steps")
            trainer.train()
            policy_dir = out / "models" / name
            trainer.model.save_pretrained(policy_dir)
            tok.save_pretrained(policy_dir)
            del trainer, model
            record: dict[str, Any] = {"run": name, "variant": variant, "seed": s, "task": task, "measurements": {}}
            reward = REAL_REWARDS[task]
            if variant == "grpo":
                _log(f"{name}: measuring step 1 with the initial model")
                record["measurements"]["step0"] = _measure(out, name, checkpoint=base, reward=reward, step=1,
                                                           args=args, seed=s)
            last = _last_step(out, name)
            _log(f"{name}: measuring step {last} with the trained model")
            record["measurements"]["after"] = _measure(out, name, checkpoint=policy_dir, reward=reward, step=last,
                                                       args=args, seed=s)
            reference_js_at(out, name, last, policy_dir=policy_dir, reference_dir=base, load=smollm2.load)
            shutil.rmtree(policy_dir)
            record["seconds"] = time.perf_counter() - t0
            _done(out, name).write_text(json.dumps(record, indent=1, default=str))
            _log(f"{name}: done in {record['seconds']:.0f} s")


# ---------------------------------------------------------------------------------------------------- the tables


def _interval(xs: list[float], fmt: str = ".2f") -> str:
    """Mean and 95 % t-interval over seeds ("0.81 [0.74, 0.88] (3)"); one seed: its value; none: n/a."""
    a = np.asarray([x for x in xs if x is not None and np.isfinite(x)], dtype=np.float64)
    if a.size == 0:
        return "n/a"
    if a.size == 1:
        return f"{a[0]:{fmt}} (1)"
    half = T_975.get(a.size, 1.96) * a.std(ddof=1) / math.sqrt(a.size)
    return f"{a.mean():{fmt}} [{a.mean() - half:{fmt}}, {a.mean() + half:{fmt}}] ({a.size})"


def _scored(con, out: Path, name: str, step: int) -> pd.DataFrame:
    from forkwatch.store.fork_values import scored_positions

    scored = scored_positions(con, name, step)
    path = out / "refjs" / f"{name}-{step}.parquet"
    if path.exists():
        scored = scored.merge(pd.read_parquet(path), on=["completion_id", "position"], how="left")
    elif step == 1:
        scored["reference_js"] = 0.0  # the initial policy is its own reference
    return scored


PREDICTORS = ("entropy", "renyi2", "group_js", "reference_js", "position", "lexical")


def report(args: argparse.Namespace) -> None:
    from forkwatch.store import connect
    from forkwatch.store.fork_values import detector_vs_value, population_mean, selector_vs_value

    for folder in args.out:
        out = Path(folder)
        done = [json.loads(p.read_text()) for p in sorted((out / "done").glob("*.json"))]
        if not done:
            sys.stdout.write(f"{out}: nothing measured yet\n")
            continue
        con = connect(str(out / "logs"))
        detector_rows, role_rows, selector_rows = [], [], []
        for d in done:
            group = d.get("warmup", "")[:6] if "warmup" in d else d["task"]
            for when, m in d["measurements"].items():
                scored = _scored(con, out, d["run"], m["step"])
                if scored.empty:
                    continue
                if d["variant"] in ("grpo", "grpo_alphabetical"):
                    table = detector_vs_value(scored, scores=("entropy", "renyi2", "group_js", "reference_js"))
                    for r in table.to_dict("records"):
                        detector_rows.append({"group": group, "variant": d["variant"], "when": when,
                                              "seed": d["seed"], **r})
                    if "role" in scored:
                        pass
                    roles = con.execute("SELECT completion_id, position, role FROM truth WHERE run_id = ? AND "
                                        "step = ?", [d["run"], m["step"]]).df() if "warmup" in d else None
                    if roles is not None and not roles.empty:
                        sr = scored.merge(roles, on=["completion_id", "position"], how="left")
                        for role, g in sr.groupby("role"):
                            p = g["inclusion_prob"].to_numpy(np.float64)
                            role_rows.append({"group": group, "variant": d["variant"], "when": when,
                                              "seed": d["seed"], "role": role, "measured": len(g),
                                              "consequential": population_mean(g["consequential"].to_numpy(float), p),
                                              "value": population_mean(g["value"].to_numpy(float), p)})
                if when == "after" and d["variant"] in SELECTORS:  # grpo_alphabetical trains on another reward
                    selector_rows.append({"group": group, "variant": d["variant"], "seed": d["seed"],
                                          **selector_vs_value(scored)})
        con.close()
        _print_tables(out, pd.DataFrame(detector_rows), pd.DataFrame(role_rows), pd.DataFrame(selector_rows))


def _print_tables(out: Path, det: pd.DataFrame, roles: pd.DataFrame, sel: pd.DataFrame) -> None:
    w = sys.stdout.write
    w(f"\n# {out}\n")
    if not det.empty:
        for (group, variant, when), g in det.groupby(["group", "variant", "when"], sort=True):
            share = g.drop_duplicates("seed")["consequential_share"].tolist()
            w(f"\n## {variant}, {when}, {group}: consequential share {_interval(share, '.3f')}, positions "
              f"{int(g.drop_duplicates('seed')['positions'].mean())} per seed\n\n")
            w("| score | AUROC | AP | Spearman |\n|---|---|---|---|\n")
            for pred in PREDICTORS:
                r = g[g["predictor"] == pred]
                if r.empty:
                    continue
                w(f"| {pred} | {_interval(r['auroc'].tolist())} | {_interval(r['average_precision'].tolist())} | "
                  f"{_interval(r['spearman'].tolist())} |\n")
    if not roles.empty:
        for (group, variant, when), g in roles.groupby(["group", "variant", "when"], sort=True):
            w(f"\n## per role: {variant}, {when}, {group}\n\n| role | measured per seed | consequential | value |\n"
              "|---|---|---|---|\n")
            for role, r in g.groupby("role"):
                w(f"| {role} | {r['measured'].mean():.0f} | {_interval(r['consequential'].tolist(), '.3f')} | "
                  f"{_interval(r['value'].tolist(), '.4f')} |\n")
    if not sel.empty:
        order = {v: i for i, v in enumerate(SELECTORS)}
        for group, g in sel.groupby("group"):
            w(f"\n## selectors after training, {group}\n\n| selector | kept share of tokens | kept tokens "
              "consequential | share of the total value kept | seeds |\n|---|---|---|---|---|\n")
            for variant, r in sorted(g.groupby("variant"), key=lambda kv: order.get(kv[0], 99)):
                w(f"| {variant} | {_interval(r['kept_share'].tolist(), '.3f')} | "
                  f"{_interval(r['kept_consequential'].tolist(), '.3f')} | "
                  f"{_interval(r['value_kept'].tolist(), '.3f')} | {len(r)} |\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, seeds, positions, rollouts in (("demo", [0, 1, 2], 192, 12), ("real", [0, 1, 2], 48, 8)):
        s = sub.add_parser(name)
        s.add_argument("--out", required=True)
        s.add_argument("--seeds", type=int, nargs="+", default=seeds)
        s.add_argument("--positions", type=int, default=positions)
        s.add_argument("--branches", type=int, default=5 if name == "demo" else 4)
        s.add_argument("--rollouts", type=int, default=rollouts)
        s.add_argument("--batch-rows", type=int, default=256)
        s.add_argument("--threads", type=int, default=1)
        default_selectors = [v for v in SELECTORS if name == "demo" or v != "oracle"]
        s.add_argument("--selectors", nargs="+", default=default_selectors, choices=list(SELECTORS))
    sub.choices["demo"].add_argument("--warmups", type=int, nargs="+", default=[0, 1])
    sub.choices["demo"].add_argument("--selector-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    sub.choices["real"].add_argument("--steps", type=int, default=50)
    r = sub.add_parser("report")
    r.add_argument("--out", action="append", required=True)
    args = p.parse_args(argv)
    {"demo": demo, "real": real, "report": report}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
