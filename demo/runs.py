"""The demo's run matrix: several GRPO runs of the warm-up model, each with forkwatch attached, into one log dir.

Each run is a plain `trl.GRPOTrainer` plus the one-line `forkwatch.attach(...)`, exactly what a user writes. Only the
learning rate and the token selector differ between runs, so the dashboard compares like with like.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from forkwatch.demo import task, warmup
from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from forkwatch import attach

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GRPOSettings:
    # The whole demo at 80 steps: 54 s on 2 quiet cores, ~5-6 min when other jobs load them (100 steps took 6 min 1 s
    # there). The collapse is flagged at step 22.
    steps: int = 80
    # 8 prompts x 4 rollouts: with 4 x 8 the step-to-step entropy swings with how easy the few prompts happen to be
    prompts_per_step: int = 8  # x num_generations completions per optimizer step
    num_generations: int = 4
    max_completion_length: int = task.MAX_COMPLETION_CHARS + 3  # room for EOS; longer means the format broke
    # Tuned on 2 CPU cores (docs/experiments.md): at 3e-4 reward rises while entropy stays near its early level;
    # 2e-3 is past what the tiny model tolerates.
    stable_lr: float = 3e-4
    collapse_lr: float = 2e-3
    # A constant rate: the first N steps of a run do not depend on its length, so `--quick` replays the start of
    # the default runs.
    lr_scheduler: str = "constant"
    n_prompts: int = 2000
    # The high rate ends in an alarm at every seed we tried, but which one is chaotic: at seed 1 mean entropy
    # collapses (flagged at step 22), at seed 0 it explodes (docs/experiments.md has the tally).
    seed: int = 1


@dataclass(frozen=True)
class RunSpec:
    name: str  # run id and folder name under the log dir
    select: str | None  # forkwatch selector; None = plain GRPO, forkwatch only watches
    learning_rate: float
    note: str


def demo_runs(s: GRPOSettings) -> list[RunSpec]:
    """The five runs of `forkwatch demo`: two plain GRPO learning rates, then three selectors at the stable one."""
    return [
        RunSpec("grpo_lr_high", None, s.collapse_lr, "plain GRPO at a learning rate that collapses entropy"),
        RunSpec("grpo", None, s.stable_lr, "plain GRPO at a stable learning rate"),
        RunSpec("high_entropy", "high_entropy", s.stable_lr, "gradient only on the top 20 % entropy tokens"),
        RunSpec("ict", "ict", s.stable_lr, "ICT: gradient on the top 10 % group-JS tokens per completion"),
        RunSpec("random", "random", s.stable_lr, "control: gradient on a random 10 % of tokens"),
    ]


class _Bar(TrainerCallback):
    """One compact progress bar per run (TRL's own prints a dict per logged step, too much for five runs)."""

    def __init__(self, desc: str, total: int, position: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, desc=desc, position=position, leave=False, unit="step", disable=not enabled)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

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
) -> GRPOTrainer:
    """Train one GRPO run from the warm-up model with forkwatch attached; overwrites an earlier run of that name."""
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
        max_steps=settings.steps,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        report_to="none",
        use_cpu=True,
        seed=settings.seed,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        args=args,
        reward_funcs=task.reward_fn,
        train_dataset=Dataset.from_dict({"prompt": [p.prompt for p in problems]}),
        processing_class=tok,
    )
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    trainer.add_callback(_Bar(spec.name, settings.steps, bar_position, progress))
    attach(trainer, log_dir=str(log_dir), run_name=spec.name, select=spec.select, seed=settings.seed)
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
) -> None:
    """Train `specs` one after the other (a tiny model gains nothing from sharing 2 cores between runs)."""
    outer = tqdm(specs, desc="GRPO runs", unit="run", position=0, disable=not progress)
    for spec in outer:
        outer.set_postfix_str(spec.name)
        train_run(spec, model_dir=model_dir, log_dir=log_dir, settings=settings, work_dir=work_dir,
                  progress=progress, bar_position=1)
    outer.close()

