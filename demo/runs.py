"""The demo's run matrix: several GRPO runs of the warm-up model, each with forkwatch attached, into one log dir.

Each run is a plain `trl.GRPOTrainer` plus the one-line `forkwatch.attach(...)`, exactly what a user writes. Each run
changes one thing from plain GRPO at the stable rate (the reward and rate, the entropy bonus, or the token selector),
so the dashboard compares like with like and each verdict has one cause.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from datasets import Dataset
from forkwatch.demo import task, warmup
from forkwatch.store.writer import FLUSH_INTERVAL_ENV
from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from forkwatch import attach

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GRPOSettings:
    steps: int = 50  # every run but the collapse
    # Preference-driven collapse is gradual: at the stable rate every decision point has lost its entropy after
    # 90-120 steps (its alarm fired at steps 98-123 in docs/experiments.md); this cap leaves a margin, and the run
    # stops at its alarm (on_alarm).
    collapse_steps: int = 200
    # The explosion run's cap, also kept by --quick: its alarm fires at step ~23 and the run stops there.
    explosion_steps: int = 50
    # forkwatch ends a run when a collapse or explosion alarm fires, as a user watching for them would set it: the
    # alarmed runs stop within a step or two of their alarm instead of training on for nothing.
    on_alarm: str = "stop"
    prompts_per_step: int = 8  # x num_generations completions per optimizer step
    num_generations: int = 4
    max_completion_length: int = task.MAX_COMPLETION_CHARS + 3  # room for EOS; longer means the format broke
    # Every run uses this rate: each verdict then has one cause. At 1e-3 and above this tiny model breaks within a
    # few steps whatever the reward (docs/experiments.md).
    stable_lr: float = 3e-4
    # TRL's entropy bonus (GRPOConfig.entropy_coef) at 1.0: as heavy as the policy loss itself, where 0.001-0.01 is
    # the usual range.
    explosion_entropy_coef: float = 1.0
    # A short linear warm-up, then a constant rate: the first N steps of a run do not depend on its length, so
    # `--quick` replays the start of the default runs. Without the warm-up, Adam's first step moves every weight by
    # the full rate (its update is the gradient's sign), which at 1e-3 broke the model in one step.
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 10
    n_prompts: int = 2000
    seed: int = 0
    # forkwatch writes its buffered records every this many seconds (store/writer.py, FLUSH_INTERVAL_ENV; a user's
    # default is 30 s): a demo run lasts seconds, and the dashboard shows it growing as the parts land.
    flush_interval_s: float = 2.0


REWARDS = {"items": task.reward_fn, "items_alphabetical": task.alphabetical_reward_fn}


@dataclass(frozen=True)
class RunSpec:
    name: str  # run id and folder name under the log dir
    select: str | None  # forkwatch selector; None = plain GRPO, forkwatch only watches
    learning_rate: float
    note: str  # one sentence: what the run shows
    expect: str  # the verdict the run is designed to get from `forkwatch check`
    reward: str = "items"  # a key of REWARDS
    entropy_coef: float = 0.0
    steps: int | None = None  # None: GRPOSettings.steps
    select_options: dict | None = None  # keyword options of the selector (attach's select_options)


def demo_runs(s: GRPOSettings) -> list[RunSpec]:
    """The runs of `forkwatch demo`: one designed collapse, one designed explosion, plain GRPO, three selectors."""
    return [
        RunSpec(
            "grpo_alphabetical", None, s.stable_lr,
            "a reward that slightly prefers one correct path (up to +0.1 for alphabetical order, +0.025 per "
            "canonical name): GRPO divides by each group's reward spread, so the small bonus is a full-size signal; "
            "every decision point and cosmetic fork converges on one choice and entropy collapses",
            "collapse", reward="items_alphabetical", steps=s.collapse_steps,
        ),
        RunSpec(
            "grpo_entropy_bonus", None, s.stable_lr,
            f"TRL's entropy bonus set too high (entropy_coef={s.explosion_entropy_coef:g}): the bonus outweighs "
            "the reward, the forced tokens lose their certainty and entropy explodes",
            "explosion", entropy_coef=s.explosion_entropy_coef, steps=s.explosion_steps,
        ),
        RunSpec("grpo", None, s.stable_lr, "plain GRPO at a stable learning rate, every correct order rewarded alike",
                "healthy"),
        RunSpec("high_entropy", "high_entropy", s.stable_lr, "gradient only on the top 20 % entropy tokens",
                "healthy"),
        RunSpec("ict", "ict", s.stable_lr, "ICT: gradient on the top 10 % group-JS tokens per completion", "healthy"),
        RunSpec("random", "random", s.stable_lr, "control: gradient on a random 10 % of tokens", "healthy"),
    ]


class _Bar(TrainerCallback):
    """One compact progress bar per run (TRL's own prints a dict per logged step, too much for five runs);
    `on_step(step, total)` after each step."""

    def __init__(self, desc: str, total: int, position: int, enabled: bool,
                 on_step: Callable[[int, int], None] | None = None) -> None:
        self.bar = tqdm(total=total, desc=desc, position=position, leave=False, unit="step", disable=not enabled)
        self.on_step = on_step

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)
        if self.on_step is not None:
            self.on_step(state.global_step, self.bar.total)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "entropy" in logs:
            self.bar.set_postfix(entropy=f"{logs['entropy']:.3f}", reward=f"{logs.get('reward', float('nan')):.2f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def train_run(
    spec: RunSpec,
    *,
    model_dir: str | Path,
    log_dir: str | Path,
    settings: GRPOSettings,
    work_dir: str | Path,
    progress: bool = True,
    bar_position: int = 1,
    on_step: Callable[[int, int], None] | None = None,
) -> GRPOTrainer:
    """Train one GRPO run from the warm-up model with forkwatch attached; overwrites an earlier run of that name.
    `on_step(step, total)` after each step."""
    run_dir = Path(log_dir) / spec.name
    if (run_dir / "run.json").is_file():
        # A restarted run of the same name would append to the old parts and repeat steps: start it afresh.
        logger.info("replacing the earlier run %s", run_dir)
        shutil.rmtree(run_dir)
    model, tok = warmup.load(model_dir)
    problems = task.make_problems(settings.n_prompts, seed=10_000 + settings.seed)
    args = GRPOConfig(
        output_dir=str(Path(work_dir) / spec.name),
        per_device_train_batch_size=settings.prompts_per_step * settings.num_generations,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        max_steps=spec.steps or settings.steps,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.lr_warmup_steps,
        report_to="none",
        use_cpu=True,
        seed=settings.seed,
        entropy_coef=spec.entropy_coef,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        # TRL turns activation checkpointing on by default, under transformers' deprecated name (a FutureWarning per
        # run) and toggles it around every generation (two more per step); a 0.3 M-parameter model has no memory to
        # save, and checkpointing would only recompute the forward in the backward.
        activation_checkpointing=False,
    )
    trainer = GRPOTrainer(
        model=model,
        args=args,
        reward_funcs=REWARDS[spec.reward],
        train_dataset=Dataset.from_dict({"prompt": [p.prompt for p in problems]}),
        processing_class=tok,
    )
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    trainer.add_callback(_Bar(spec.name, spec.steps or settings.steps, bar_position, progress, on_step))
    # group_js on every run (not only ICT's): the detector metrics judge it next to entropy (demo/truth.py)
    attach(trainer, log_dir=str(log_dir), run_name=spec.name, select=spec.select, seed=settings.seed,
           on_alarm=settings.on_alarm, group_js=True,
           **({"select_options": spec.select_options} if spec.select_options else {}))
    trainer.train()
    return trainer


def train_all(
    specs: list[RunSpec],
    *,
    model_dir: str | Path,
    log_dir: str | Path,
    settings: GRPOSettings,
    work_dir: str | Path,
    progress: bool = True,
    on_step: Callable[[int, RunSpec, int, int], None] | None = None,
) -> None:
    """Train `specs` one after the other (a tiny model gains nothing from sharing 2 cores between runs).
    `on_step(i, spec, step, total)` after each step of the i-th run (0-based), and once with step 0 as it starts."""
    outer = tqdm(specs, desc="GRPO runs", unit="run", position=0, disable=not progress)
    with _environ(FLUSH_INTERVAL_ENV, str(settings.flush_interval_s)):
        for i, spec in enumerate(outer):
            outer.set_postfix_str(spec.name)
            report = None if on_step is None else partial(on_step, i, spec)
            if report is not None:
                report(0, spec.steps or settings.steps)
            train_run(spec, model_dir=model_dir, log_dir=log_dir, settings=settings, work_dir=work_dir,
                      progress=progress, bar_position=1, on_step=report)
    outer.close()


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """`name=value` in this process's environment inside, restored after (the writer reads it when a run starts)."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous

