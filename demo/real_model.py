"""`forkwatch demo --model smollm2`: GRPO on a real pretrained model (SmolLM2-135M-Instruct) with forkwatch attached.

One plain GRPO run, chat-formatted, on a task the model partly solves: "Is A greater than B? Answer yes or no."
Before training, at temperature 1 with 8 samples per prompt, about a fifth of its answers are right and most groups
of 8 hold both right and wrong answers (harder tasks tried, such as single-digit addition or repeating a word, gave
reward 0 nearly everywhere), so GRPO's advantages are not all zero. Its verdict comes from the same health rules as
every run (`forkwatch check`). The designed toy demo (demo/pipeline.py) stays the default.

A second task, "opening" (scripts/fork_value_real.py measures fork value on both), asks for one sentence before the
answer and rewards the first "yes" / "no" word wherever it comes: the reply's opening is free text that the reward
does not read, so the real model has uncertain tokens there that change nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model comes from the package index (smollm2.py), never the Hub
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

logger = logging.getLogger(__name__)
RUN_NAME = "smollm2_grpo"


@dataclass(frozen=True)
class RealSettings:
    steps: int = 20  # at least the health rules' min_steps (8), so that `forkwatch check` gives a verdict
    prompts_per_step: int = 2
    num_generations: int = 4  # 8 completions per step
    max_completion_length: int = 24  # a right answer is 1-3 tokens; the rest is room to ramble
    learning_rate: float = 1e-5
    temperature: float = 1.0
    seed: int = 0
    n_prompts: int = 400
    task: str = "yes_no"  # a key of TASKS


# task -> the instruction after the question
INSTRUCTIONS = {"yes_no": "Answer yes or no.", "opening": "Explain in one sentence, then answer yes or no."}
_QUESTION = re.compile(r"Is (\d+) greater than (\d+)\?")


def make_prompts(n: int, *, seed: int, task: str = "yes_no") -> list[dict]:
    """`n` rows {"prompt": chat messages, "answer": "yes" | "no"}: two different numbers from 1 to 19."""
    if task not in INSTRUCTIONS:
        raise ValueError(f"task={task!r}: choose one of {', '.join(INSTRUCTIONS)}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.sample(range(1, 20), 2)
        rows.append({"prompt": [{"role": "user", "content": f"Is {a} greater than {b}? {INSTRUCTIONS[task]}"}],
                     "answer": "yes" if a > b else "no"})
    return rows


def _text(completion) -> str:
    # Conversational prompts give completions as [{"role": "assistant", "content": ...}]; plain ones as str.
    return completion if isinstance(completion, str) else completion[-1]["content"]


def _answers(answer: list[str] | None, prompts: list | None, n: int) -> list[str]:
    """The dataset's `answer` column when TRL passes it; else read from the question in each prompt (a recorded run
    keeps the prompt's text but not its extra columns: `forkwatch forkvalue` calls the reward this way)."""
    if answer is not None:
        return list(answer)
    if prompts is None or len(prompts) != n:
        raise ValueError("pass answer= (the dataset column) or prompts= holding the questions")
    out = []
    for p in prompts:
        found = _QUESTION.search(p if isinstance(p, str) else " ".join(m["content"] for m in p))
        if found is None:
            raise ValueError(f"no 'Is A greater than B?' question in the prompt {str(p)[:80]!r}")
        out.append("yes" if int(found[1]) > int(found[2]) else "no")
    return out


def yes_no_reward(completions: list, answer: list[str] | None = None, prompts: list | None = None,
                  **kwargs) -> list[float]:
    """1 when the reply starts with the right "yes" / "no" (any case, leading spaces ignored), else 0."""
    return [float(_text(c).strip().lower().startswith(a))
            for c, a in zip(completions, _answers(answer, prompts, len(completions)), strict=True)]


def first_answer_reward(completions: list, answer: list[str] | None = None, prompts: list | None = None,
                        **kwargs) -> list[float]:
    """The "opening" task's reward: 1 when the first whole word "yes" or "no" of the reply (any case, anywhere) is
    the right one, else 0 (also when neither word appears)."""
    out = []
    for c, a in zip(completions, _answers(answer, prompts, len(completions)), strict=True):
        found = re.search(r"\b(yes|no)\b", _text(c).lower())
        out.append(float(found is not None and found[1] == a))
    return out


TASKS = {"yes_no": yes_no_reward, "opening": first_answer_reward}  # task -> its reward function


def make_trainer(model, tok, *, settings: RealSettings, output_dir: str | Path, callbacks: list | None = None,
                 peft_config=None, **grpo):
    """A plain `trl.GRPOTrainer` on the yes/no task; `grpo`: further GRPOConfig fields (the tests' variants)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    options = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.prompts_per_step * settings.num_generations,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        max_steps=settings.steps,
        learning_rate=settings.learning_rate,
        temperature=settings.temperature,
        report_to="none",
        use_cpu=True,
        bf16=False,  # TRL's default turns bf16 autocast on, which on most CPUs is slower than float32
        seed=settings.seed,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    options.update(grpo)
    rows = make_prompts(settings.n_prompts, seed=10_000 + settings.seed, task=settings.task)
    return GRPOTrainer(
        model=model,
        args=GRPOConfig(**options),
        reward_funcs=TASKS[settings.task],
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=callbacks,
        peft_config=peft_config,
    )


@dataclass
class RealDemoResult:
    log_dir: Path
    model_dir: Path
    seconds: float  # wall time of loading (and converting, when not cached) and training
    cpu_seconds: float
    verdict_lines: list[str] = field(default_factory=list)
    groups_varied: tuple[int, int] = (0, 0)  # (groups whose rewards differ, recorded groups)


def run(settings: RealSettings, out: str | Path, *, cache: str | Path | None = None, progress: bool = True,
        threads: int | None = None) -> RealDemoResult:
    """Fetch/convert the model when not cached, train one GRPO run with forkwatch attached into `out`/logs, and
    check it. Raises KeyboardInterrupt through: the steps written so far stay readable."""
    import torch
    from forkwatch.demo import pipeline, smollm2
    from forkwatch.demo.runs import _Bar
    from transformers import PrinterCallback, ProgressCallback

    from forkwatch import attach

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads {threads}: pass 1 or more")
        torch.set_num_threads(threads)
    out = Path(out)
    log_dir = out / "logs"
    if (log_dir / RUN_NAME / "run.json").is_file():
        shutil.rmtree(log_dir / RUN_NAME)  # a rerun starts afresh rather than appending to the old parts
    t0, c0 = time.perf_counter(), time.process_time()
    folder = smollm2.model_dir(cache, progress=progress)
    model, tok = smollm2.load(folder)
    trainer = make_trainer(model, tok, settings=settings, output_dir=out / "trainer")
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    trainer.add_callback(_Bar(RUN_NAME, settings.steps, 0, progress))
    attach(trainer, log_dir=str(log_dir), run_name=RUN_NAME, seed=settings.seed)
    trainer.train()
    result = RealDemoResult(log_dir, folder, time.perf_counter() - t0, time.process_time() - c0)
    _, result.verdict_lines = pipeline.verdicts(log_dir, [RUN_NAME])
    result.groups_varied = groups_varied(log_dir)
    return result


def groups_varied(log_dir: Path) -> tuple[int, int]:
    """(groups of the run whose rewards are not all equal, recorded groups): GRPO learns only from the first."""
    from forkwatch.store import connect

    con = connect(str(log_dir))
    try:
        varied, total = con.sql(
            "SELECT count(*) FILTER (WHERE hi > lo), count(*) FROM (SELECT max(reward) hi, min(reward) lo "
            "FROM completions WHERE run_id = ? GROUP BY step, group_id)", params=[RUN_NAME]).fetchall()[0]
    finally:
        con.close()
    return int(varied), int(total)


def main(args: argparse.Namespace, *, echo: Callable[[str], None], serve: Callable[[argparse.Namespace], int]) -> int:
    """The CLI's `demo --model smollm2`: `echo` writes a terminal line, `serve` starts the dashboard."""
    from forkwatch.demo import smollm2

    settings = RealSettings()
    if args.steps is not None:
        if args.steps < 1:
            echo(f"forkwatch demo: --steps {args.steps}: pass a positive number of GRPO steps")
            return 2
        settings = RealSettings(steps=args.steps, seed=settings.seed if args.seed is None else args.seed)
    elif args.seed is not None:
        settings = RealSettings(seed=args.seed)
    echo(f"forkwatch demo: SmolLM2-135M-Instruct, {settings.steps} GRPO steps of "
         f"{settings.prompts_per_step * settings.num_generations} completions (<= {settings.max_completion_length} "
         f"tokens) on yes/no comparisons, CPU; writing to {args.out}")
    try:
        result = run(settings, args.out, threads=args.threads)
    except KeyboardInterrupt:
        echo(f"\nforkwatch demo: interrupted; the steps written so far stay readable in {args.out}/logs")
        return 130
    except (ValueError, ConnectionError, smollm2.ModelFileError) as e:
        echo(f"forkwatch demo: {e}")
        return 2
    varied, total = result.groups_varied
    echo(f"model: {result.model_dir}")
    echo(f"trained in {result.seconds:.0f} s ({result.cpu_seconds:.0f} s CPU); {varied} of {total} groups had "
         f"rewards that differ. Health (forkwatch check {result.log_dir}):")
    echo("\n".join(result.verdict_lines))
    if args.no_dashboard:
        echo(f"dashboard: forkwatch dashboard {result.log_dir}")
        return 0
    try:
        return serve(argparse.Namespace(log_dir=str(result.log_dir), host=args.host, port=args.port))
    except KeyboardInterrupt:
        return 0
