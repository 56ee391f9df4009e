"""Which plugin files one watched step passes through, in order: a structural measure of the plugin (no timing).

A tiny real GRPOTrainer (tests/conftest.py) trains 3 steps with forkwatch attached (the defaults, or `--select`);
during the third step every Python call into a file of plugin/ is recorded (`sys.setprofile`; decorator wrappers such
as `no_grad` are skipped). The sequence of files those calls enter, with consecutive repeats collapsed, is the path
of one step (loops count once per pass: the decode steps, the columns copied out):

    files   distinct plugin files the step enters
    hops    moves from one plugin file to another (calls into another file; returns are not counted)
    back    hops into a file the step had already entered and left before
    edges   distinct (from file, to file) pairs among the hops: the file-to-file links a reader follows

    .venv/bin/python benchmarks/step_trace.py [--select ict] [--path]

docs/architecture.md quotes its output before and after the plugin's layout changed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
PLUGIN = str(ROOT / "plugin") + "/"


def trace_step(select: str | None) -> list[str]:
    """The plugin files entered during step 3 of a 3-step run, in call order, consecutive repeats collapsed."""
    import conftest
    from transformers import TrainerCallback

    import forkwatch

    torch.set_num_threads(1)
    calls: list[str] = []

    def profile(frame, event, arg):
        # a decorator's wrapper (token_math.no_grad) is not a place a reader goes: its callee is
        if event == "call" and frame.f_code.co_name != "wrapper":
            f = frame.f_code.co_filename
            if f.startswith(PLUGIN) and (not calls or calls[-1] != f):
                calls.append(f)

    class Window(TrainerCallback):  # from the end of step 2 to the end of step 3
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                sys.setprofile(profile)
            elif state.global_step == 3:
                sys.setprofile(None)

    with tempfile.TemporaryDirectory() as tmp:
        make = conftest.make_trainer.__wrapped__(Path(tmp))
        trainer = make(max_steps=3)
        options = {} if select is None else dict(select=select, warmup_steps=0)
        forkwatch.attach(trainer, log_dir=str(Path(tmp) / "runs"), handoff_interval_s=0, **options)
        trainer.add_callback(Window())  # after forkwatch's callback: the window opens after its step-2 end
        try:
            trainer.train()
        finally:
            sys.setprofile(None)
    return [c[len(str(ROOT)) + 1 :] for c in calls]


def summarise(path: list[str]) -> dict[str, int]:
    seen: set[str] = set()
    back = 0
    for i, f in enumerate(path):
        if i and f in seen:
            back += 1
        seen.add(f)
    edges = len(set(zip(path, path[1:], strict=False)))
    return {"files": len(seen), "hops": max(len(path) - 1, 0), "back": back, "edges": edges}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--select", default=None, help="a selector name (warm-up 0); default: monitoring only")
    p.add_argument("--path", action="store_true", help="also print the sequence of files")
    args = p.parse_args(argv)
    path = trace_step(args.select)
    s = summarise(path)
    print(f"select={args.select}: {s['files']} plugin files, {s['hops']} hops ({s['edges']} distinct links), "
          f"{s['back']} back into a file left")
    print("files:", ", ".join(sorted(set(path))))
    if args.path:
        print(" -> ".join(Path(f).name for f in path))


if __name__ == "__main__":
    main()
